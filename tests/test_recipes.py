"""The dataset recipes (scripts/prepare-*.sh, train-*.sh, evaluate.sh, configs/recipes/*.yaml), end to
end in --smoke mode on miniature releases that the tests build in each release's real layout, the
real IWSLT'14 test sets beside the checkout, failure on truncated / missing inputs, resume, and the
YAML-vs-shell equivalence of the effective fairseq config."""

import html
import io
import json
import math
import os
import random
import re
import sys
import tarfile

import pytest

from . import utils

SCRIPTS = os.path.join(utils.REPO, "scripts")
# one thread: tiny models on 2 shared cores are many times slower with torch's default threads
ENV = dict(os.environ, PYTHONWARNINGS="ignore", ARCH_SKIP_INSTALL="1", OMP_NUM_THREADS="1")
ENV.pop("ARCH_SMOKE", None)
ENV.pop("ARCH_NUM_GPUS", None)
IWSLT14_PARTIAL = os.path.join(utils.SHARED_DATA, "iwslt14-deen-partial")
IWSLT14_TEST_ORDER = ["TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012"]



# the test's own archives: tarfile's "data" filter where this Python has it (3.11.4+)
EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

def run(script, *args, env=None, cwd=None):
    return utils.run(["bash", os.path.join(SCRIPTS, script), *map(str, args)], env=env or ENV,
                          capture_output=True, text=True, cwd=cwd)


def ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# miniature releases


def raw_pairs(n, seed=1):
    """(src, tgt) raw sentences: cased, punctuation attached, an apostrophe now and then."""
    import toy_corpus

    rng = random.Random(seed)
    lex = toy_corpus.lexicon(random.Random(12345))
    out = []
    while len(out) < n:
        s, t = toy_corpus.sentence_pair(rng, lex)
        s, t = (x[:-2] + "." for x in (s, t))
        if rng.random() < 0.2:
            s, t = s[:-1] + ", isn't it?", t[:-1] + ", n'est-ce pas?"
        out.append((s[0].upper() + s[1:], t[0].upper() + t[1:]))
    return out


def train_tags(lines, lang, talks=4):
    """train.tags.* with TED markup: a metadata block before each talk's lines."""
    out, per = [], max(1, len(lines) // talks)
    for i, line in enumerate(lines):
        if i % per == 0:
            k = i // per
            out += [f"<url>http://www.ted.com/talks/talk_{k}.html</url>",
                    f"<keywords>talks, science, {lang}</keywords>", f"<speaker>Speaker {k}</speaker>",
                    f"<talkid>{100 + k}</talkid>", f"<title>Title {k} ({lang})</title>",
                    f"<description>TED talk {k} described in {lang}</description>",
                    "<reviewer href=\"\">Reviewer Name</reviewer>", "<translator href=\"\">T. Name</translator>"]
        out.append(line)
    return "\n".join(out) + "\n"


def xml_set(lines, lang, setid, ref):
    kind = "refset" if ref else "srcset"
    attr = f'trglang="{lang}"' if ref else f'srclang="{lang}"'
    body = [f'<seg id="{i}"> {html.escape(l, quote=False)} </seg>' for i, l in enumerate(lines, 1)]
    return "\n".join(['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<{kind} setid="{setid}" {attr}>',
                      '<doc docid="1" genre="lectures">', "<url>http://www.ted.com/talks/x.html</url>",
                      "<talkid>1</talkid>", "<title>A title</title>", *body, "</doc>", f"</{kind}>", "</mteval>"]) + "\n"


def add(tf, name, text):
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def iwslt_release(path, year, s, t, train, sets):
    """{s}-{t}.tgz as the IWSLT TED releases: {s}-{t}/train.tags.* and IWSLT{yy}.TED*.xml."""
    pair = f"{s}-{t}"
    with tarfile.open(path, "w:gz") as tf:
        for j, l in enumerate((s, t)):
            add(tf, f"{pair}/train.tags.{pair}.{l}", train_tags([p[j] for p in train], l))
            for name, pairs in sets.items():
                add(tf, f"{pair}/IWSLT{year}.{name}.{pair}.{l}.xml",
                    xml_set([p[j] for p in pairs], l, name, ref=(l == t)))
    return path


def iwslt14_release(tmp, n_train=340, n_set=12):
    pairs = raw_pairs(n_train + 5 * n_set)
    sets = {name: pairs[n_train + i * n_set:n_train + (i + 1) * n_set] for i, name in enumerate(IWSLT14_TEST_ORDER)}
    return iwslt_release(os.path.join(tmp, "de-en.tgz"), 14, "de", "en", pairs[:n_train], sets), sets


@pytest.fixture(scope="module")
def iwslt14(tmp_path_factory):
    """The IWSLT'14 recipe's smoke data dir, prepared from a miniature de-en.tgz."""
    tmp = tmp_path_factory.mktemp("iwslt14")
    tgz, sets = iwslt14_release(str(tmp))
    out = tmp / "data"
    res = run("prepare-iwslt14.sh", out, "--raw", tgz, "--smoke")
    return out, sets, res


# ---------------------------------------------------------------------------------------------
# prepare


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def check_data_dir(out, s, t):
    assert (out / "COMPLETE").exists()
    m = json.load(open(out / "manifest.json"))
    for split in ("train", "valid", "test"):
        for d in ("text", "spm"):
            assert len(lines(out / d / f"{split}.{s}")) == len(lines(out / d / f"{split}.{t}")) == m["counts"][split]
        assert (out / "bin" / f"{split}.{s}-{t}.{s}.bin").exists()
    assert (out / "bin" / f"dict.{s}.txt").read_text() == (out / "bin" / f"dict.{t}.txt").read_text()  # joined
    assert len(lines(out / "ref" / f"test.{t}")) == m["counts"]["test"]
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]
    return m


def test_prepare_iwslt14_from_a_release_archive(iwslt14):
    out, sets, res = iwslt14
    log = ok(res)
    m = check_data_dir(out, "de", "en")
    assert "287 train, 13 valid, 50 test pairs" in log
    train = lines(out / "text" / "train.en")
    # valid = every 23rd line of the (cleaned) first 300 lines, train = the rest; TED metadata dropped,
    # <title>/<description> text kept (fairseq's prepare-iwslt14.sh); lowercased, Moses-tokenised
    assert m["counts"]["valid"] == 300 // 23 and m["counts"]["train"] == 300 - 300 // 23
    text = "\n".join(train)
    assert "<" not in text and "speaker" not in text and "reviewer" not in text and "ted.com" not in text
    assert "title 0 ( en )" in text
    assert text == text.lower() and "n &apos;est-ce pas ?" in text
    # test = dev2010, TEDX.dev2012, tst2010, tst2011, tst2012 in fairseq's order (first 50 in smoke mode)
    want = [p[1] for name in IWSLT14_TEST_ORDER for p in sets[name]][:50]
    assert lines(out / "ref" / "test.en") == want  # untokenised, cased references for sacreBLEU
    assert lines(out / "text" / "test.en")[0] == want[0].lower()[:-1] + " ."
    assert m["lowercase"] is True and m["spm_vocab"] <= 500


def test_prepare_iwslt15_stanford_files(tmp_path):
    raw = tmp_path / "iwslt15"
    raw.mkdir()
    pairs = raw_pairs(300, seed=2)
    splits = {"train": pairs[:240], "tst2012": pairs[240:270], "tst2013": pairs[270:]}
    for name, ps in splits.items():
        for j, l in enumerate(("en", "vi")):  # Stanford's files are tokenised already, with &apos; escapes
            (raw / f"{name}.{l}").write_text("\n".join(p[j].replace("'", " &apos;").replace(".", " .")
                                                       for p in ps) + "\n")
    out = tmp_path / "data"
    res = run("prepare-iwslt15.sh", out, "--raw", raw, "--smoke")
    ok(res)
    m = check_data_dir(out, "en", "vi")
    assert m["counts"] == {"train": 240, "valid": 30, "test": 30}
    # Table 4's valid has 768 pairs, Stanford's tst2012 (here 30): printed side by side, and a warning
    assert re.search(r"^  valid +30 +768  DIFFERS$", res.stdout, re.M), res.stdout
    assert "WARNING: iwslt15 valid has 30 pairs, the paper's Table 4 768" in res.stderr
    assert m["sets"] == {"valid": ["tst2012"], "test": ["tst2013"]} and len(m["table4_warnings"]) == 1
    assert lines(out / "text" / "test.vi") == lines(raw / "tst2013.vi")  # not re-tokenised
    assert "&apos;" not in (out / "ref" / "test.vi").read_text()  # detokenised reference


def test_prepare_iwslt16_release_archive_and_table4_counts(tmp_path):
    """The split-count logic on a miniature en-fr.tgz whose tst2013 has Table 4's 1080 valid pairs and
    whose tst2014 has 1134 (Table 4: 1133 test): valid matches, test is printed as differing and warned
    about; the counts are the release sets' (before the smoke cut to 50 pairs)."""
    pairs = raw_pairs(330, seed=3)
    names = ["TED.dev2010", "TED.tst2010", "TED.tst2011", "TED.tst2012", "TED.tst2013", "TED.tst2014"]
    sets = {n: pairs[270 + 10 * i:280 + 10 * i] for i, n in enumerate(names)}
    sets["TED.tst2013"] = [pairs[(7 * i) % 330] for i in range(1080)]
    sets["TED.tst2014"] = [pairs[(11 * i) % 330] for i in range(1134)]
    tgz = iwslt_release(str(tmp_path / "en-fr.tgz"), 16, "en", "fr", pairs[:270], sets)
    out = tmp_path / "data"
    res = run("prepare-iwslt16.sh", out, "--raw", tgz, "--smoke")
    ok(res)
    m = check_data_dir(out, "en", "fr")
    assert m["sets"] == {"valid": ["IWSLT16.TED.tst2013"], "test": ["IWSLT16.TED.tst2014"]}
    assert m["counts"]["valid"] == m["counts"]["test"] == 50 and m["lowercase"] is False  # smoke cut
    assert m["release_counts"]["valid"] == 1080 and m["release_counts"]["test"] == 1134
    assert re.search(r"^  valid +1080 +1080  = Table 4$", res.stdout, re.M), res.stdout
    assert re.search(r"^  test +1134 +1133  DIFFERS$", res.stdout, re.M), res.stdout
    assert "WARNING: iwslt16 test has 1134 pairs, the paper's Table 4 1133: BLEU is not comparable" in res.stderr
    assert "valid has" not in res.stderr and len(m["table4_warnings"]) == 1
    assert lines(out / "ref" / "test.fr") == [p[1] for p in sets["TED.tst2014"][:50]]
    assert any(c.isupper() for c in (out / "text" / "train.en").read_text())  # cased
    # other sets by name; a set the release does not have is refused before anything is read
    res = run("prepare-iwslt16.sh", tmp_path / "d2", "--raw", tgz, "--smoke", "--valid-sets", "tst2017")
    assert res.returncode == 2 and "no set 'TED.tst2017'" in res.stderr and not (tmp_path / "d2").exists()


# WMT'16 lines that tell the preparation styles apart (at the head of europarl, inside the smoke cut):
# a hyphenated compound (-a splits it only in --style wmt14), a 100-token pair (Ott et al.'s clean keeps
# 1-80 tokens, wmt14 1-250) and a 1:2 length ratio (wmt14's -ratio 1.5 drops it, clean-corpus-n's default 9 not)
WMT_SPECIAL = [("Die E-Mail-Adresse ist neu.", "The e-mail address is new."),
               (" ".join(["Wort"] * 100), " ".join(["word"] * 100)),
               ("Ja danke", "Yes , thank you very much")]


def wmt16_release(d):
    d.mkdir()
    pairs = WMT_SPECIAL + raw_pairs(357, seed=4)

    def tgz(name, files):
        with tarfile.open(d / name, "w:gz") as tf:
            for member, text in files.items():
                add(tf, member, text)

    def side(ps, j):
        return "\n".join(p[j] for p in ps) + "\n"

    for name, member, ps in (("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en.{l}", pairs[:100]),
                             ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en.{l}", pairs[100:200]),
                             ("training-parallel-nc-v11.tgz", "training-parallel-nc-v11/news-commentary-v11.de-en.{l}",
                              pairs[200:300])):
        tgz(name, {member.format(l=l): side(ps, j) for j, l in ((0, "de"), (1, "en"))})
    tgz("dev.tgz", {f"dev/newstest2013.{l}": side(pairs[300:330], j) for j, l in ((0, "de"), (1, "en"))})
    tgz("test-full.tgz", {"test-full/newstest2014-deen-src.de.sgm": xml_set([p[0] for p in pairs[330:]], "de", "nt14", False),
                          "test-full/newstest2014-deen-ref.en.sgm": xml_set([p[1] for p in pairs[330:]], "en", "nt14", True)})
    return pairs


def test_prepare_wmt16_archives(tmp_path):
    """--style ott2018 (the default) from the WMT archives: Moses tokenisation without -a and without
    punctuation normalisation, clean 1-80 tokens at ratio 9, sentencepiece BPE."""
    pairs = wmt16_release(tmp_path / "wmt")
    out = tmp_path / "data"
    ok(run("prepare-wmt16.sh", out, "--raw", tmp_path / "wmt", "--smoke"))
    m = check_data_dir(out, "en", "de")
    assert m["counts"]["valid"] == 30 and m["counts"]["test"] == 30 and 250 < m["counts"]["train"] <= 300
    assert lines(out / "ref" / "test.de") == [p[0] for p in pairs[330:]]  # the src-side sgm, unescaped
    assert (m["style"], m["clean"], m["spm_model_type"]) == ("ott2018", {"max_len": 80, "ratio": 9.0}, "bpe")
    de, en = lines(out / "text" / "train.de"), lines(out / "text" / "train.en")
    assert "Die E-Mail-Adresse ist neu ." in de and "@-@" not in "\n".join(de)  # no -a
    assert "Ja danke" in de and "Yes , thank you very much" in en  # ratio 2 kept (ratio 9)
    assert max(len(x.split()) for x in de + en) <= 80  # the 100-token pair dropped
    assert m["counts"]["train"] == 299


def test_prepare_wmt16_google_archive(tmp_path):
    """Google's preprocessed wmt16_en_de.tar.gz (what Ott et al. 2018 train on) is taken as is: its
    tokenised text (not re-tokenised) and newstest2014.de as the untokenised reference."""
    pairs = raw_pairs(120, seed=5)
    tok = {"en": [p[1][:-1] + " ." for p in pairs], "de": [p[0][:-1] + " ." for p in pairs]}
    with tarfile.open(tmp_path / "wmt16_en_de.tar.gz", "w:gz") as tf:
        for l, j in (("en", 1), ("de", 0)):
            add(tf, f"wmt16_de_en/train.tok.clean.{l}", "\n".join(tok[l][:80]) + "\n")
            add(tf, f"wmt16_de_en/newstest2013.tok.{l}", "\n".join(tok[l][80:100]) + "\n")
            add(tf, f"wmt16_de_en/newstest2014.tok.{l}", "\n".join(tok[l][100:]) + "\n")
            add(tf, f"wmt16_de_en/newstest2014.{l}", "\n".join(p[j] for p in pairs[100:]) + "\n")
    out = tmp_path / "data"
    res = run("prepare-wmt16.sh", out, "--raw", tmp_path / "wmt16_en_de.tar.gz", "--smoke")
    assert "Google preprocessed archive" in ok(res)
    m = check_data_dir(out, "en", "de")
    assert m["source"] == "google" and m["counts"] == {"train": 80, "valid": 20, "test": 20}
    assert lines(out / "text" / "train.de") == tok["de"][:80] and lines(out / "text" / "test.de") == tok["de"][100:]
    assert lines(out / "ref" / "test.de") == [p[0] for p in pairs[100:]]


def test_prepare_fails_cleanly_on_truncated_missing_or_misaligned_input(tmp_path):
    tgz, _ = iwslt14_release(str(tmp_path))
    data = open(tgz, "rb").read()
    cut = tmp_path / "cut" / "de-en.tgz"
    cut.parent.mkdir()
    cut.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    res = run("prepare-iwslt14.sh", out, "--raw", cut, "--smoke")
    assert res.returncode != 0 and "truncated or corrupt" in res.stderr, res.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

    # unpacked release with one test set missing: the message names it and lists what is expected
    rel = tmp_path / "rel"
    with tarfile.open(tgz) as tf:
        tf.extractall(rel, **EXTRACT)
    os.remove(rel / "de-en" / "IWSLT14.TED.tst2011.de-en.en.xml")
    res = run("prepare-iwslt14.sh", out, "--raw", rel, "--smoke")
    assert res.returncode != 0 and "missing input file IWSLT14.TED.tst2011.de-en.en.xml" in res.stderr
    assert "train.tags.de-en.de" in res.stderr  # the list of expected files
    assert not out.exists()

    # a train side cut short
    with tarfile.open(tgz) as tf:
        tf.extractall(rel, **EXTRACT)
    p = rel / "de-en" / "train.tags.de-en.en"
    p.write_text("\n".join(lines(p)[:-7]) + "\n")
    res = run("prepare-iwslt14.sh", out, "--raw", rel, "--smoke")
    assert res.returncode != 0 and "truncated or misaligned" in res.stderr, res.stderr
    assert not out.exists() and not [q for q in os.listdir(tmp_path) if ".tmp-" in q]

    # a test .xml cut off in the middle
    with tarfile.open(tgz) as tf:
        tf.extractall(rel, **EXTRACT)
    x = rel / "de-en" / "IWSLT14.TED.tst2012.de-en.de.xml"
    x.write_text("\n".join(lines(x)[:8]) + "\n")
    res = run("prepare-iwslt14.sh", out, "--raw", rel, "--smoke")
    assert res.returncode != 0 and "truncated" in res.stderr, res.stderr

    # no --raw and no network: a clean failure that says which local files to pass
    res = run("prepare-iwslt16.sh", out, env=dict(ENV, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9"))
    assert res.returncode != 0 and "could not download" in res.stderr and "en-fr.tgz" in res.stderr
    assert not out.exists()

    # an existing incomplete OUT is never taken for a finished one
    out.mkdir()
    res = run("prepare-iwslt14.sh", out, "--raw", tgz, "--smoke")
    assert res.returncode == 2 and "not a complete data dir" in res.stderr
    res = utils.run([sys.executable, os.path.join(SCRIPTS, "recipes", "train.py"), "iwslt14", "--data", str(out)],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "not a complete prepared data dir" in res.stderr


def test_prepare_iwslt14_on_real_ted_text(tmp_path):
    """A miniature de-en.tgz from the real TED text beside the checkout (its train sample, de-BPE'd,
    and the five test sets, Moses-detokenised): the recipe's tokenised test side matches fairseq's prepare-iwslt14.sh
    output (tok/test.*) line for line, in the same order."""
    utils.require_shared("iwslt14-deen-partial")
    from sacremoses import MosesDetokenizer

    def part(name, l, n):
        return lines(os.path.join(IWSLT14_PARTIAL, "tok_test_parts", f"IWSLT14.{name}.de-en.{l}"))[:n]

    # the raw release is not here: Moses-detokenise the tokenised (lowercased) text to stand in for
    # it, with a capital after a full stop (the tokeniser splits "word." only before a sentence start)
    detok = {l: MosesDetokenizer(lang=l) for l in ("de", "en")}

    def raw(l, xs):
        out = []
        for x in xs:
            w = x.split()
            w = [t[:1].upper() + t[1:] if i and w[i - 1] in ".?!" else t for i, t in enumerate(w)]
            out.append(detok[l].detokenize(w))
        return out

    train = [raw(l, [x.replace("@@ ", "") for x in
                     lines(os.path.join(IWSLT14_PARTIAL, "train_sample_bpe10k", f"train.{l}"))[:400]]) for l in ("de", "en")]
    sets = {name: list(zip(*(raw(l, part(name, l, 12)) for l in ("de", "en")))) for name in IWSLT14_TEST_ORDER}
    tgz = iwslt_release(str(tmp_path / "de-en.tgz"), 14, "de", "en", list(zip(*train)), sets)
    out = tmp_path / "data"
    ok(run("prepare-iwslt14.sh", out, "--raw", tgz, "--smoke"))
    check_data_dir(out, "de", "en")
    for l in ("de", "en"):
        want = [x for name in IWSLT14_TEST_ORDER for x in part(name, l, 12)][:50]
        got = lines(out / "text" / f"test.{l}")
        same = sum(a == b for a, b in zip(got, want))
        assert len(got) == 50 and same >= 0.9 * 50, [(a, b) for a, b in zip(got, want) if a != b][:5]
        # ... and they are the lines of fairseq's own test set, in its order
        full = lines(os.path.join(IWSLT14_PARTIAL, "tok", f"test.{l}"))
        assert want[:12] == full[:12] and want[12:24] == full[887:899]


# ---------------------------------------------------------------------------------------------
# train (resume), evaluate


def test_train_iwslt14_smoke_then_resume_then_evaluate(iwslt14, tmp_path):
    out, _, res = iwslt14
    ok(res)
    save = tmp_path / "ckpt"
    first = ok(run("train-iwslt14.sh", "--smoke", "--data", out, "--save-dir", save, "--", "--max-epoch", "1"))
    assert "new run in" in first and "--cpu" in (save / "command.txt").read_text()
    assert "effective batch 1000 tokens x 1 device(s) x update-freq 1 = 1000 tokens" in first
    # the updates per epoch printed at start are fairseq's own count
    upe = re.search(r"train: (\d+) updates per epoch at this batch", first).group(1)
    assert re.search(rf"epoch 001: +{upe} / {upe} ", first), first[-3000:]
    # checkpoint choice by validation BLEU (Table 7 decoding: beam 9, lenpen 1.5 for De-En)
    assert re.search(r"\| valid \| epoch 001 \|.*\| bleu [0-9.]+ \|", first), first[-3000:]
    assert re.search(r"Saved checkpoint .*checkpoint_best\.pt \(epoch 1 @ \d+ updates, score [0-9.]+\)", first)
    assert json.load(open(save / "recipe.json"))["seed"] == 1
    assert (save / "checkpoint_last.pt").exists() and (save / "arch_cache" / "state.json").exists()
    assert "adv_fwd_per_batch 5" in first  # epoch 1 is a refresh: S=3 ascent steps
    second = ok(run("train-iwslt14.sh", "--smoke", "--data", out, "--save-dir", save))
    assert "resuming from" in second
    # fairseq continues with epoch 2 from checkpoint_last.pt, ARCH from the cache epoch 1 wrote
    m = re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch 2 @ (\d+) updates\)", second)
    assert m and int(m.group(1)) > 0, second[-3000:]
    assert "begin training epoch 2" in second and "begin training epoch 1\n" not in second
    assert "generation of epoch 1 complete" in second
    summary = re.search(r"\| train \| epoch 002 \|.*", second).group(0)
    assert "adv_fwd_per_batch 2 " in summary  # a reuse epoch: clean + cached forwards only
    assert int(re.search(r"arch_cached (\d+)", summary).group(1)) > 0
    assert int(re.search(r"arch_rebuilt (\d+)", summary).group(1)) > 0
    assert json.load(open(save / "arch_cache" / "state.json"))["current"]["epoch"] == 1

    ev = ok(run("evaluate.sh", "iwslt14", "--smoke", "--data", out, "--save-dir", save))
    assert "beam 9, lenpen 1.5 (Table 7)" in ev
    # tokenised BLEU against the prepared text/test.en (not the reference rebuilt from bin/)
    assert re.search(rf"^BLEU \(tokenised, vs {re.escape(str(out))}/text/test.en; .*\) [0-9.]+", ev, re.M), ev
    assert re.search(r"^sacreBLEU \(detokenised, vs .*/ref/test.en\) [0-9.]+", ev, re.M), ev
    assert "signature: nrefs:1|case:lc|eff:no|tok:13a" in ev
    assert re.search(r"^fairseq-generate's BLEU4 .*BLEU4 = [0-9.]+", ev, re.M), ev
    n = json.load(open(out / "manifest.json"))["counts"]["test"]
    assert len(lines(save / "eval-test" / "hyp.detok.en")) == n
    sc = json.load(open(save / "eval-test" / "scores.json"))
    import score  # scripts/score.py: the BLEU of the hypotheses written, recomputed independently
    assert sc["bleu"] == round(score.tokenized_bleu(lines(save / "eval-test" / "hyp.tok.en"),
                                                    lines(out / "text" / "test.en")).score, 2)
    assert sc["recipe"]["seed"] == 1 and isinstance(sc["at_length_limit"], int) and "bleu_compound_split" not in sc
    export_folder_translates_plain_text(out, save, tmp_path)


def export_folder_translates_plain_text(data, save, tmp_path):
    """scripts/export_checkpoint.py --folder on a recipe run: the folder holds the dictionaries and the
    prepare step's sentencepiece model, model.pt names the Moses tokenizer (the recipe's text is
    Moses-tokenised), and from_pretrained(folder) alone, in a process without the plugin, translates
    untokenised text."""
    folder = tmp_path / "export"
    res = utils.run([sys.executable, os.path.join(SCRIPTS, "export_checkpoint.py"), str(save / "checkpoint_best.pt"),
                     str(folder), "--folder"], env=ENV, capture_output=True, text=True)
    log = ok(res)
    # a recipe run's checkpoint keeps --eval-bleu's numpy meters: the export turns them into tensors
    assert "loads with torch.load(weights_only=True)" in log, log
    assert sorted(os.listdir(folder)) == ["README.md", "dict.de.txt", "dict.en.txt", "model.pt",
                                          "sentencepiece.bpe.model"], log
    assert (folder / "sentencepiece.bpe.model").read_bytes() == (data / "spm.model").read_bytes()
    assert "lowercase the input" in log  # IWSLT'14 is lowercased by its recipe
    sources = [l.lower() for l in lines(data / "ref" / "test.de")[:3]]  # untokenised text
    code = ("import json, sys\n"
            "from fairseq.models.transformer import TransformerModel\n"
            "m = TransformerModel.from_pretrained(sys.argv[1])\n"
            "assert type(m.tokenizer).__name__ == 'MosesTokenizer' and type(m.bpe).__name__ == 'SentencepieceBPE'\n"
            "print('OUT ' + json.dumps(m.translate(json.loads(sys.argv[2]), beam=2)))\n"
            "assert not [k for k in sys.modules if k.startswith('fairseq_arch')], 'plugin imported'\n")
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    res = utils.run([sys.executable, "-c", code, str(folder), json.dumps(sources)], env=env, capture_output=True,
                    text=True, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    hyps = json.loads(next(l[4:] for l in res.stdout.splitlines() if l.startswith("OUT ")))
    assert len(hyps) == 3 and all(isinstance(h, str) for h in hyps) and any(h.strip() for h in hyps), hyps
    assert not [h for h in hyps if "\u2581" in h]  # sentencepiece pieces decoded


def test_hydra_yaml_run_dir_resumes_and_evaluate_finds_it(iwslt14, tmp_path):
    """fairseq-hydra-train with the YAML's own hydra.run.dir (checkpoints/iwslt14-de-en-arch-seed1 under
    the launch dir): the checkpoints land there, the same command again resumes from them, and
    evaluate.sh's default checkpoint is that dir's checkpoint_best.pt."""
    out, _, res = iwslt14
    ok(res)
    env = dict(ENV, ARCH_NUM_GPUS="0")
    smoke = utils.run([sys.executable, os.path.join(SCRIPTS, "recipes", "train.py"), "iwslt14", "--hydra", "--smoke",
                       "--data", str(out), "--print-args"], env=env, capture_output=True, text=True)
    cmd = [x for x in json.loads(smoke.stdout) if not x.startswith("hydra.run.dir=")] + ["optimization.max_epoch=1"]
    first = utils.run(cmd, env=env, capture_output=True, text=True, cwd=str(tmp_path))
    run_dir = tmp_path / "checkpoints" / "iwslt14-de-en-arch-seed1"
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / "checkpoint_last.pt").exists() and (run_dir / "checkpoint_best.pt").exists()
    assert (run_dir / "arch_cache" / "state.json").exists() and not (tmp_path / "outputs").exists()
    again = utils.run(cmd, env=env, capture_output=True, text=True, cwd=str(tmp_path))
    log = again.stdout + again.stderr
    assert again.returncode == 0 and re.search(r"Loaded checkpoint \./checkpoint_last\.pt \(epoch 2 @ \d+ updates\)",
                                               log), log[-3000:]
    ev = utils.run([sys.executable, os.path.join(SCRIPTS, "recipes", "evaluate.py"), "iwslt14", "--data", str(out),
                    "--print-args"], env=env, capture_output=True, text=True, cwd=str(tmp_path))
    path = json.loads(ev.stdout)[json.loads(ev.stdout).index("--path") + 1]
    assert (tmp_path / path) == run_dir / "checkpoint_best.pt"


def test_train_and_evaluate_print_paper_settings():
    def args(script, *a, gpus="0"):
        res = utils.run([sys.executable, os.path.join(SCRIPTS, "recipes", script), "--print-args", *a],
                             env=dict(ENV, ARCH_NUM_GPUS=gpus), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        cmd = json.loads(res.stdout)
        return {k: v for k, v in zip(cmd, cmd[1:] + [""]) if k.startswith("--")}, cmd

    a, cmd = args("train.py", "iwslt14")
    assert a["--arch"] == "transformer_iwslt_de_en" and a["--update-freq"] == "16" and "--cpu" in cmd
    assert a["--max-epoch"] == "150" and "--max-update" not in a and a["--warmup-updates"] == "4000"
    assert a["--save-dir"] == "checkpoints/iwslt14-de-en-arch-seed1" and a["--seed"] == "1"
    assert a["--ddp-backend"] == "legacy_ddp"
    assert a["--adam-betas"] == "(0.9, 0.98)" and a["--lr"] == "1e-3" and a["--label-smoothing"] == "0.1"
    assert (a["--adv-eps"], a["--adv-steps"], a["--adv-step-size"], a["--arch-refresh-interval"], a["--arch-ema"],
            a["--arch-cache-fraction"], a["--arch-neighbors"]) == ("0.1", "3", "0.1", "15", "0.01", "0.1", "1")
    a, cmd = args("train.py", "wmt16", "--adv-method", "smart", "--", "--max-update", "7", gpus="8")
    assert a["--arch"] == "transformer_vaswani_wmt_en_de_big" and a["--adv-method"] == "smart"
    assert int(a["--max-tokens"]) * 8 * int(a["--update-freq"]) >= 450000 and "--fp16" in cmd
    assert cmd[-2:] == ["--max-update", "7"] and cmd[cmd.index("--max-update") + 1] == "30000"
    assert "--max-epoch" not in a  # WMT'16: an update budget (the `--` argument, last, overrides it)
    for ds, d, beam, lp in (("iwslt15", "en-vi", "10", "1.0"), ("iwslt15", "vi-en", "15", "0.3"),
                            ("iwslt14", "en-de", "10", "1.5"), ("iwslt14", "de-en", "9", "1.5"),
                            ("iwslt16", "en-fr", "10", "0.2"), ("iwslt16", "fr-en", "10", "2.0"),
                            ("wmt16", "en-de", "4", "0.6")):
        a, cmd = args("evaluate.py", ds, "--direction", d, "--seed", "3")
        assert (a["--beam"], a["--lenpen"]) == (beam, lp)
        assert a["--path"] == f"checkpoints/{ds}-{d}-arch-seed3/checkpoint_best.pt"
        assert "--max-len-a" not in cmd and "--max-len-b" not in cmd
        # the checkpoint is chosen by validation BLEU with the same decoding, tokenised BLEU
        t, cmd = args("train.py", ds, "--direction", d)
        assert json.loads(t["--eval-bleu-args"]) == {"beam": float(beam) if "." in beam else int(beam),
                                                     "lenpen": float(lp)}
        assert (t["--best-checkpoint-metric"], t["--eval-bleu-detok"], t["--eval-bleu-remove-bpe"]) == (
            "bleu", "space", "sentencepiece")
        assert {"--eval-bleu", "--eval-tokenized-bleu", "--maximize-best-checkpoint-metric"} <= set(cmd)
    for script in ("prepare-iwslt14.sh", "prepare-iwslt15.sh", "prepare-iwslt16.sh", "prepare-wmt16.sh",
                   "train-iwslt14.sh", "train-iwslt15.sh", "train-iwslt16.sh", "train-wmt16.sh", "evaluate.sh",
                   "train-seeds.sh"):
        assert "--smoke" in ok(run(script, "--help")), script


# ---------------------------------------------------------------------------------------------
# YAML == shell recipe


def effective(mode, args, cwd):
    res = utils.run([sys.executable, os.path.join(SCRIPTS, "recipes", "effective_config.py"), mode, *args,
                          "--build-model"], env=ENV, capture_output=True, text=True, cwd=cwd)
    m = re.search(r"^EFFECTIVE_CONFIG (.*)$", res.stdout, re.M)
    assert m, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(m.group(1))


@pytest.mark.parametrize("name,gpus,computed", [("iwslt14_de_en", 1, False), ("iwslt15_vi_en", 3, True),
                                                ("wmt16_en_de", 8, False), ("iwslt14_de_en_official", 1, False)])
def test_yaml_and_shell_recipe_give_the_same_effective_settings(name, gpus, computed, tmp_path):
    """The YAML as written (the GPU count its update_freq assumes: 1 for IWSLT, 8 for WMT'16) and, for 3
    GPUs, with the overrides that `train.py --hydra` computes, against the shell recipe for as many GPUs.
    ``*_official``: the official code's run.sh (`train.py --official`)."""
    ds, s, t = name.split("_")[:3]
    official = name.endswith("_official")
    data, save = str(tmp_path / "data"), str(tmp_path / "ckpt")

    def recipe(*extra):
        res = utils.run([sys.executable, os.path.join(SCRIPTS, "recipes", "train.py"), ds, "--direction", f"{s}-{t}",
                         "--data", data, "--save-dir", save, "--print-args", *(["--official"] if official else []),
                         *extra],
                        env=dict(ENV, ARCH_NUM_GPUS=str(gpus)), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    shell = effective("train", recipe()[1:], str(tmp_path))
    if computed:
        hydra_cmd = recipe("--hydra")
        assert f"optimization.update_freq=[{math.ceil(64000 / (4096 * gpus))}]" in hydra_cmd
        args = hydra_cmd[1:] + [f"checkpoint.save_dir={save}"]
    else:
        args = ["--config-dir", os.path.join(utils.REPO, "configs", "recipes"), "--config-name", name,
                f"task.data={data}/bin", f"common.user_dir={utils.USER_DIR}", f"checkpoint.save_dir={save}",
                f"hydra.run.dir={tmp_path / 'hydra'}"]
    yaml = effective("hydra", args, str(tmp_path))
    # the model as fairseq builds it from each (the YAML goes through hydra's defaults, the shell
    # through the named architecture's function)
    assert shell["built"] == yaml["built"]
    # every other section, field by field
    diffs = []
    for sec in ("common", "distributed_training", "dataset", "optimization", "checkpoint", "task", "criterion",
                "optimizer", "lr_scheduler", "generation", "ema", "bmuf"):
        a, b = shell[sec] or {}, yaml[sec] or {}
        diffs += [(sec, k, a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b))
                  if a.get(k, "<unset>") != b.get(k, "<unset>")]
    assert not diffs, diffs
    # and what the paper fixes, spelled out
    c, tk = yaml["criterion"], yaml["task"]
    ball = (0.3, 2, 0.0001) if official else (0.1, 3, 0.1)
    assert (c["adv_method"], c["adv_eps"], c["adv_steps"], c["adv_step_size"], c["adv_norm"], c["adv_granularity"],
            c["adv_sides"], c["label_smoothing"]) == ("arch", *ball, "l2", "sentence", "both", 0.1)
    assert (tk["arch_refresh_interval"], tk["arch_ema"], tk["arch_cache_fraction"], tk["arch_neighbors"]) == (15, 0.01, 0.1, 1)
    assert (tk["arch_recipe"], c["adv_kl"]) == (("code", "symmetric") if official else ("text", None))
    assert yaml["optimizer"]["adam_betas"] == "(0.9, 0.98)" and yaml["optimization"]["lr"] == [0.001]
    batch = yaml["dataset"]["max_tokens"] * gpus * yaml["optimization"]["update_freq"][0]
    assert batch >= (450000 if ds == "wmt16" else 4096 if official else 64000)
    assert (yaml["checkpoint"]["best_checkpoint_metric"], yaml["checkpoint"]["maximize_best_checkpoint_metric"],
            tk["eval_bleu"], tk["eval_tokenized_bleu"]) == ("bleu", True, True, True)
    assert yaml["distributed_training"]["ddp_backend"] == "legacy_ddp"
