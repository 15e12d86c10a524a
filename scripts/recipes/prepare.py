#!/usr/bin/env python3
"""Prepare one of the paper's datasets for fairseq: raw release -> normalised, Moses-tokenised
text (sacremoses) -> length/ratio cleaning -> joint sentencepiece vocabulary -> fairseq-preprocess
--joined-dictionary.

    python scripts/recipes/prepare.py DATASET OUT [--raw PATH ...] [--valid-sets S,...] [--test-sets S,...]
        [--style ott2018|wmt14] [--smoke] [--force]

DATASET is one of iwslt14 (de-en), iwslt15 (en-vi), iwslt16 (en-fr), wmt16 (en-de). --raw takes
the release as downloaded: archives (.tgz/.tar.gz/.zip), plain or .gz files, or directories holding
them (searched recursively, archives inside are opened); repeat it for several. Without --raw the
public sources are downloaded into OUT.download/ (when online). ``--help-files DATASET`` lists the
files each dataset needs. --valid-sets / --test-sets pick the release's sets by name (IWSLT: e.g.
tst2013 or dev2010,tst2010; the defaults are below). --style (WMT'16): ott2018 (default) prepares the data
as Ott et al. (2018) / Google's wmt16_en_de archive (Moses tokenisation without -a, no punctuation
normalisation, clean 1-80 tokens with clean-corpus-n.perl's default ratio 9, joint 32k BPE pieces) and
takes Google's archive itself when given; wmt14 is the earlier pipeline (fairseq's prepare-wmt14en2de.sh:
normalise punctuation, -a, clean 1-250, ratio 1.5).

After preparing, the sizes are printed beside the paper's Table 4 (where we have its numbers) and a
WARNING names every split that differs: BLEU on another test set is not comparable with the paper's.

OUT, written atomically (built in OUT.tmp-*, renamed when complete; OUT/COMPLETE marks it):
  text/{train,valid,test}.{src,tgt}   tokenised text (what fairseq's prepare-*.sh scripts produce)
  spm/{train,valid,test}.{src,tgt}    sentencepiece pieces (the input of fairseq-preprocess)
  ref/test.{src,tgt}                  the untokenised test references (for detokenised sacreBLEU)
  spm.model, spm.vocab                the joint sentencepiece model
  bin/                                fairseq-preprocess --joined-dictionary output (both directions)
  manifest.json                       dataset, languages, counts, sets, release sizes, Table 4 check,
                                      options (lowercase, vocab size, style)
A missing, truncated or misaligned input stops with a message and a non-zero exit status, and
leaves no OUT behind.
"""

import argparse
import gzip
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile

# --------------------------------------------------------------------------------------------
# dataset layouts

# talk metadata lines of train.tags.* (fairseq drops url/talkid/keywords; the others are names, not text)
IWSLT_DROP = re.compile(r"^<(url|talkid|keywords|speaker|reviewer|translator|doc|/doc|\?xml|mteval|/mteval)\b")

DATASETS = {
    "iwslt14": {
        "pair": ("de", "en"),
        "kind": "iwslt_xml",
        "lowercase": True,  # fairseq's prepare-iwslt14.sh lowercases
        "vocab": 10000,
        "train": "train.tags.de-en.{l}",
        # valid: every 23rd line of the cleaned train set (fairseq's prepare-iwslt14.sh)
        "valid": None,
        "valid_every": 23,
        # test: fairseq's order
        "test": ["IWSLT14.TED.dev2010.de-en.{l}.xml", "IWSLT14.TEDX.dev2012.de-en.{l}.xml",
                 "IWSLT14.TED.tst2010.de-en.{l}.xml", "IWSLT14.TED.tst2011.de-en.{l}.xml",
                 "IWSLT14.TED.tst2012.de-en.{l}.xml"],
        "set_pattern": "IWSLT14.{name}.de-en.{l}.xml",
        "release_sets": ["TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012"],
        "urls": ["http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"],
        "release": "de-en.tgz (IWSLT 2014 TED release, as fairseq's prepare-iwslt14.sh downloads it)",
    },
    "iwslt15": {
        "pair": ("en", "vi"),
        "kind": "plain",  # Stanford NMT's preprocessed (tokenised, cased) files
        "lowercase": False,
        "vocab": 10000,
        "train": ["train.{l}"],
        # Table 4 has 768 valid pairs; Stanford's files hold only tst2012 (1553) and tst2013 (1268), so the
        # paper's valid set cannot be rebuilt from them (docs/recipes.md)
        "valid": ["tst2012.{l}"],
        "test": ["tst2013.{l}"],
        "set_pattern": "{name}.{l}",
        "release_sets": ["tst2012", "tst2013"],
        "pretokenised": True,
        "urls": [f"https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/{s}.{l}"
                 for s in ("train", "tst2012", "tst2013") for l in ("en", "vi")],
        "release": "Stanford NMT's IWSLT'15 English-Vietnamese files (already tokenised)",
    },
    "iwslt16": {
        "pair": ("en", "fr"),
        "kind": "iwslt_xml",
        "lowercase": False,
        "vocab": 10000,
        "train": "train.tags.en-fr.{l}",
        # Table 4 has 1080 valid / 1133 test pairs, which no set (or union of sets) of this release gives
        # (docs/recipes.md); our choice: one set each, tst2013 valid and tst2014 test (torchtext's IWSLT2016
        # defaults), pick others with --valid-sets / --test-sets
        "valid": ["IWSLT16.TED.tst2013.en-fr.{l}.xml"],
        "test": ["IWSLT16.TED.tst2014.en-fr.{l}.xml"],
        "set_pattern": "IWSLT16.{name}.en-fr.{l}.xml",
        "release_sets": ["TED.dev2010", "TED.tst2010", "TED.tst2011", "TED.tst2012", "TED.tst2013", "TED.tst2014"],
        "urls": ["https://wit3.fbk.eu/archive/2016-01//texts/en/fr/en-fr.tgz"],
        "release": "en-fr.tgz (IWSLT 2016-01 TED release)",
    },
    "wmt16": {
        "pair": ("en", "de"),
        "kind": "wmt",
        "lowercase": False,
        "vocab": 32000,
        "spm_type": "bpe",  # Ott et al. / Google: 32k joint BPE (sentencepiece's BPE on the tokenised text)
        "train": ["europarl-v7.de-en.{l}", "commoncrawl.de-en.{l}", "news-commentary-v11.de-en.{l}"],
        # Google's preprocessed wmt16_en_de.tar.gz (what Ott et al. 2018 / fairseq's scaling_nmt train on)
        "google": {"train": "train.tok.clean.{l}", "valid": "newstest2013.tok.{l}",
                   "test": "newstest2014.tok.{l}", "ref": "newstest2014.{l}"},
        "valid": ["newstest2013.{l}"],
        # newstest2014 (fairseq's prepare-wmt14en2de.sh / the paper): sgm, src side and ref side
        "test": {"de": "newstest2014-deen-{side}.de.sgm", "en": "newstest2014-deen-{side}.en.sgm"},
        "urls": ["http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
                 "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
                 "http://data.statmt.org/wmt16/translation-task/training-parallel-nc-v11.tgz",
                 "http://data.statmt.org/wmt16/translation-task/dev.tgz",
                 "http://statmt.org/wmt14/test-full.tgz"],
        "release": "the WMT'16 archives training-parallel-europarl-v7.tgz, training-parallel-commoncrawl.tgz, "
                   "training-parallel-nc-v11.tgz, dev.tgz (newstest2013) and WMT'14 test-full.tgz (newstest2014)",
    },
}
MAX_LEN, MAX_RATIO = 175, 1.5  # clean-corpus-n.perl -ratio 1.5 ... 1 175 (prepare-iwslt14.sh)
MAX_LEN_WMT = 250              # prepare-wmt14en2de.sh: clean-corpus-n -ratio 1.5 ... 1 250 (--style wmt14)
MAX_LEN_OTT, RATIO_OTT = 80, 9.0  # Google's wmt16_en_de.sh: clean-corpus-n.perl ... 1 80 (its default ratio 9)
STYLES = ("ott2018", "wmt14")

# The paper's Table 4 (pairs per split), as quoted in issue 12; the cells we could not read (the paper
# was not at hand) are absent and printed as "?". Checked against the prepared sizes after every prepare.
TABLE4 = {
    "iwslt15": {"valid": 768},
    "iwslt16": {"valid": 1080, "test": 1133},
}


class PrepError(Exception):
    pass


def fail(msg):
    raise PrepError(msg)


def set_files(name, names):
    """--valid-sets / --test-sets names ("tst2013", "TED.tst2013", "TEDX.dev2012") -> file patterns."""
    d = DATASETS[name]
    if "set_pattern" not in d:
        fail(f"{name}: --valid-sets / --test-sets are for the IWSLT datasets (WMT'16 uses newstest2013/2014)")
    out = []
    for n in names:
        n = n.strip()
        if d["kind"] == "iwslt_xml" and "." not in n:
            n = "TED." + n
        if n not in d["release_sets"]:
            fail(f"{name}: no set {n!r} in this release; its sets: {', '.join(d['release_sets'])}")
        out.append(d["set_pattern"].replace("{name}", n))
    return out


def resolve(name, valid_sets=None, test_sets=None, style="ott2018"):
    """DATASETS[name] with the command line's choices applied."""
    d = dict(DATASETS[name])
    if valid_sets:
        if d.get("valid_every"):
            d.pop("valid_every")
        d["valid"] = set_files(name, valid_sets)
    if test_sets:
        d["test"] = set_files(name, test_sets)
    if d["kind"] == "wmt":
        if style not in STYLES:
            fail(f"--style is one of {', '.join(STYLES)}")
        d["style"] = style
        if style == "wmt14":
            d.pop("spm_type", None)
    elif style != "ott2018":
        fail("--style is for wmt16")
    return d


def set_names(d, split):
    """Human names of the sets a split is made of."""
    pats = d.get(split)
    if pats is None:
        return [f"one training line in {d['valid_every']}"] if split == "valid" else []
    if isinstance(pats, dict):
        return ["newstest2014"]
    return [re.sub(r"\.\{l\}(\.xml)?$", "", p).replace(".de-en", "").replace(".en-fr", "") for p in pats]


def expected_files(name):
    d = DATASETS[name]
    s, t = d["pair"]
    names = []
    if d["kind"] == "iwslt_xml":
        names += [d["train"].format(l=l) for l in (s, t)]
        for key in ("valid", "test"):
            names += [p.format(l=l) for p in (d[key] or []) for l in (s, t)]
    elif d["kind"] == "plain":
        names += [p.format(l=l) for key in ("train", "valid", "test") for p in d[key] for l in (s, t)]
    else:
        names += [p.format(l=l) for key in ("train", "valid") for p in d[key] for l in (s, t)]
        names += ["newstest2014-deen-src.de.sgm", "newstest2014-deen-ref.en.sgm",
                  "newstest2014-deen-src.en.sgm", "newstest2014-deen-ref.de.sgm"]
    return names


def describe(name):
    d = DATASETS[name]
    lines = [f"{name} ({'-'.join(d['pair'])}): {d['release']}.",
             "Pass --raw with the archive(s), or a directory holding them or these files (any depth):"]
    lines += ["  " + f for f in expected_files(name)]
    if name == "wmt16":
        lines.append("  (newstest2014: either the -src.de/-ref.en pair or the -src.en/-ref.de pair is enough;"
                     " WMT'14 test-full.tgz or WMT'16 dev.tgz)")
        lines.append("or, for --style ott2018, Google's preprocessed wmt16_en_de.tar.gz (Ott et al. 2018): "
                     "train.tok.clean.{en,de}, newstest2013.tok.{en,de}, newstest2014.tok.{en,de}, "
                     "newstest2014.{en,de}")
    elif d.get("release_sets"):
        lines.append(f"Sets of this release (--valid-sets / --test-sets): {', '.join(d['release_sets'])}")
    lines.append("Downloaded from: " + " ".join(d["urls"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# finding and reading the raw files


def safe_extract(tf: "tarfile.TarFile", dest: str, path: str) -> None:
    """Extract a release archive refusing members that would land outside ``dest`` or are
    not plain files/directories: tarfile's "data" filter where Python has it (3.11.4+,
    3.12), the same check by hand on older 3.11 releases (Debian's 3.11.2)."""
    if hasattr(tarfile, "data_filter"):
        tf.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    for m in tf.getmembers():
        target = os.path.realpath(os.path.join(dest, m.name))
        if not (m.isfile() or m.isdir()) or os.path.commonpath([root, target]) != root:
            fail(f"{path}: member {m.name!r} is not a plain file inside the archive's folder; refusing to extract it")
    tf.extractall(dest)


class RawIndex:
    """basename -> path of every file under the --raw inputs, archives opened into a temp dir."""

    def __init__(self, inputs, workdir):
        self.files = {}
        self.workdir = workdir
        self.n_archives = 0
        for p in inputs:
            if not os.path.exists(p):
                fail(f"--raw {p} does not exist")
            self._add(os.path.abspath(p))

    def _add(self, path):
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    self._add_file(os.path.join(root, f))
        else:
            self._add_file(path)

    def _add_file(self, path):
        base = os.path.basename(path)
        if base.endswith((".tgz", ".tar.gz", ".tar", ".zip")):
            self.n_archives += 1
            dest = os.path.join(self.workdir, f"archive{self.n_archives}")
            os.makedirs(dest)
            try:
                if base.endswith(".zip"):
                    with zipfile.ZipFile(path) as z:
                        bad = z.testzip()
                        if bad:
                            fail(f"{path}: corrupt member {bad}")
                        z.extractall(dest)
                else:
                    with tarfile.open(path) as tf:
                        safe_extract(tf, dest, path)
            except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, gzip.BadGzipFile) as e:
                fail(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download it again")
            self._add(dest)
        else:
            key = base[:-3] if base.endswith(".gz") else base
            self.files.setdefault(key, path)

    def find(self, name):
        return self.files.get(name)

    def need(self, name, dataset):
        p = self.find(name)
        if p is None:
            fail(f"missing input file {name}\n{describe(dataset)}")
        return p


def read_text(path):
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        fail(f"{path} is truncated or corrupt ({type(e).__name__}: {e})")
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


SEG = re.compile(r"<seg id=\"?\d+\"?>\s*(.*?)\s*</seg>", re.I)


def read_xml_segments(path):
    """<seg id="N">text</seg> lines of an IWSLT .xml / WMT .sgm file (prepare-iwslt14.sh's grep/sed)."""
    lines = read_text(path)
    segs = []
    for l in lines:
        m = SEG.search(l)
        if m:
            segs.append(html.unescape(m.group(1)).replace("\u2019", "'"))
    if not segs:
        fail(f"{path} has no <seg id=...> lines")
    if not any("</refset>" in l or "</srcset>" in l or "</mteval>" in l for l in lines[-5:]):
        fail(f"{path} does not end with </srcset>, </refset> or </mteval>: truncated file?")
    return segs


def read_train_tags(path):
    """train.tags.* of an IWSLT release: drop the talk metadata lines, keep the text of
    <title>/<description> (as fairseq's prepare-iwslt14.sh does)."""
    out = []
    for l in read_text(path):
        s = l.strip()
        if IWSLT_DROP.match(s):
            continue
        s = re.sub(r"</?(title|description)>", "", s)
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------
# text processing


class Normaliser:
    def __init__(self, lang, lowercase, pretokenised, wmt14):
        """wmt14: fairseq's prepare-wmt14en2de.sh (punctuation normalisation, -a); otherwise Moses
        tokenisation as tokenizer.perl's defaults (what prepare-iwslt14.sh and Google's WMT'16 script do)."""
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        wmt = wmt14
        self.tok = MosesTokenizer(lang=lang)
        self.norm = MosesPunctNormalizer(lang=lang) if wmt else None
        self.lowercase = lowercase
        self.pretokenised = pretokenised
        self.wmt = wmt

    def __call__(self, line):
        line = line.strip()
        if self.pretokenised:
            return line.lower() if self.lowercase else line
        if self.norm is not None:
            line = self.norm.normalize(line)
            line = "".join(c for c in line if c.isprintable() or c in "\t ")  # remove-non-printing-char
        # -a (aggressive hyphen splitting) for --style wmt14 as prepare-wmt14en2de.sh; escape as the perl script
        line = self.tok.tokenize(line, aggressive_dash_splits=self.wmt, escape=True, return_str=True)
        return line.lower() if self.lowercase else line


_WORKER = {}


def _init_worker(args):
    _WORKER["norm"] = Normaliser(*args)


def _norm_chunk(lines):
    return [_WORKER["norm"](x) for x in lines]


def normalise(lines, args, workers):
    """Normaliser(*args) over lines, in `workers` processes for big inputs (sacremoses is pure Python)."""
    if workers <= 1 or len(lines) < 20000:
        n = Normaliser(*args)
        return [n(x) for x in lines]
    import multiprocessing as mp

    chunks = [lines[i:i + 5000] for i in range(0, len(lines), 5000)]
    with mp.get_context("fork").Pool(workers, _init_worker, (args,)) as pool:
        return [x for c in pool.imap(_norm_chunk, chunks) for x in c]


def clean_pairs(src, tgt, max_len, ratio=MAX_RATIO):
    """clean-corpus-n.perl: drop empty, longer than max_len tokens, or length ratio > ratio."""
    keep_s, keep_t = [], []
    for s, t in zip(src, tgt):
        ns, nt = len(s.split()), len(t.split())
        if ns < 1 or nt < 1 or ns > max_len or nt > max_len:
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        keep_s.append(s)
        keep_t.append(t)
    return keep_s, keep_t


def check_parallel(what, s, t, sl, tl):
    if len(s) != len(t):
        fail(f"{what}: {len(s)} {sl} lines but {len(t)} {tl} lines (truncated or misaligned input)")
    if not s:
        fail(f"{what}: no lines")


def load_splits(name, idx, smoke, d=None):
    """raw (untokenised) {split: (src_lines, tgt_lines)}; valid may be None (split off train). For WMT'16
    with Google's archive, the text is tokenised already and raw["ref"] holds the untokenised test target."""
    d = d or DATASETS[name]
    s, t = d["pair"]
    raw = {}
    g = d.get("google")
    if d["kind"] == "wmt" and d.get("style") == "ott2018" and all(
            idx.find(g["train"].format(l=l)) for l in (s, t)):
        for split in ("train", "valid", "test"):
            sides = [read_text(idx.need(g[split].format(l=l), name)) for l in (s, t)]
            check_parallel(f"{split} ({g[split].format(l='*')}, Google's archive)", *sides, s, t)
            raw[split] = tuple(x[:smoke] for x in sides) if smoke and split == "train" else tuple(sides)
        raw["ref"] = read_text(idx.need(g["ref"].format(l=t), name))
        if len(raw["ref"]) != len(raw["test"][1]):
            fail(f"{g['ref'].format(l=t)}: {len(raw['ref'])} lines but {len(raw['test'][1])} in "
                 f"{g['test'].format(l=t)} (truncated or misaligned input)")
        raw["source"] = "google"
        return raw
    if d["kind"] == "iwslt_xml":
        tr = [read_train_tags(idx.need(d["train"].format(l=l), name)) for l in (s, t)]
        check_parallel(f"train ({d['train']})", *tr, s, t)
        raw["train"] = tuple(tr)
        for split in ("valid", "test"):
            if d[split] is None:
                raw[split] = None
                continue
            sides = []
            for l in (s, t):
                lines = []
                for pat in d[split]:
                    lines += read_xml_segments(idx.need(pat.format(l=l), name))
                sides.append(lines)
            check_parallel(f"{split} ({', '.join(p.format(l='*') for p in d[split])})", *sides, s, t)
            raw[split] = tuple(sides)
    elif d["kind"] == "plain":
        for split in ("train", "valid", "test"):
            sides = [sum((read_text(idx.need(p.format(l=l), name)) for p in d[split]), []) for l in (s, t)]
            check_parallel(f"{split} ({', '.join(p.format(l='*') for p in d[split])})", *sides, s, t)
            raw[split] = tuple(sides)
    else:  # wmt
        tr_s, tr_t = [], []
        for pat in d["train"]:
            a, b = (read_text(idx.need(pat.format(l=l), name)) for l in (s, t))
            check_parallel(pat.format(l="*"), a, b, s, t)
            if smoke:
                a, b = a[:smoke], b[:smoke]
            tr_s += a
            tr_t += b
        raw["train"] = (tr_s, tr_t)
        va = [read_text(idx.need(d["valid"][0].format(l=l), name)) for l in (s, t)]
        check_parallel("valid (newstest2013)", *va, s, t)
        raw["valid"] = tuple(va)
        pair = None
        for src_l, ref_l in (("de", "en"), ("en", "de")):
            a = idx.find(f"newstest2014-deen-src.{src_l}.sgm")
            b = idx.find(f"newstest2014-deen-ref.{ref_l}.sgm")
            if a and b:
                pair = {src_l: a, ref_l: b}
                break
        if pair is None:
            fail(f"missing input file newstest2014-deen-src.de.sgm / newstest2014-deen-ref.en.sgm\n{describe(name)}")
        te = [read_xml_segments(pair[l]) for l in (s, t)]
        check_parallel("test (newstest2014)", *te, s, t)
        raw["test"] = tuple(te)
    return raw


# --------------------------------------------------------------------------------------------
# download


def download(name, dest):
    d = DATASETS[name]
    os.makedirs(dest, exist_ok=True)
    for url in d["urls"]:
        target = os.path.join(dest, url.rstrip("/").split("/")[-1])
        if os.path.exists(target):
            continue
        print(f"prepare: downloading {url}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(target + ".part", "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
                want = r.headers.get("Content-Length")
            if want is not None and os.path.getsize(target + ".part") != int(want):
                fail(f"download of {url} stopped at {os.path.getsize(target + '.part')} of {want} bytes")
            os.replace(target + ".part", target)
        except (OSError, ValueError) as e:
            if os.path.exists(target + ".part"):
                os.remove(target + ".part")
            fail(f"could not download {url} ({type(e).__name__}: {e}).\n"
                 f"Offline? Download it elsewhere and pass the local copy instead:\n{describe(name)}")
    return dest


# --------------------------------------------------------------------------------------------
# main


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for l in lines:
            f.write(l + "\n")


def table4_check(name, counts, release_counts, smoke):
    """(lines to print, warnings): the prepared sizes beside the paper's Table 4. Valid/test are compared
    as the release's sets are (before a --smoke cut); train only outside smoke mode."""
    paper = TABLE4.get(name, {})
    lines = [f"prepare: sizes (pairs) beside the paper's Table 4{' (smoke: the release sets, uncut)' if smoke else ''}:",
             f"  {'split':<6} {'here':>9} {'Table 4':>9}"]
    warnings = []
    for split in ("train", "valid", "test"):
        here = release_counts.get(split) if smoke or split != "train" else counts[split]
        if smoke and split == "train":
            here = None
        want = paper.get(split)
        if here is None:
            note = "(smoke run: not compared)"
        elif want is None:
            note = "(Table 4 not quoted here)"
        elif here == want:
            note = "= Table 4"
        else:
            note = "DIFFERS"
            what = ("checkpoint choice differs from the paper's" if split == "valid"
                    else "BLEU is not comparable with the paper's" if split == "test" else "training data differ")
            warnings.append(f"prepare: WARNING: {name} {split} has {here} pairs, the paper's Table 4 {want}: {what}")
        lines.append(f"  {split:<6} {'-' if here is None else here:>9} {'?' if want is None else want:>9}  {note}")
    return lines, warnings


def prepare(name, out, raw_inputs, smoke=0, vocab=0, workers=2, valid_sets=None, test_sets=None, style="ott2018"):
    d = resolve(name, valid_sets, test_sets, style)
    s, t = d["pair"]
    wmt14 = d.get("style") == "wmt14"
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    t0 = time.time()
    try:
        if not raw_inputs:
            raw_inputs = [download(name, os.path.abspath(out) + ".download")]
        idx = RawIndex(raw_inputs, os.path.join(tmp, "raw"))
        raw = load_splits(name, idx, smoke, d)
        source = raw.pop("source", "release")
        raw_ref = raw.pop("ref", None)
        print(f"prepare: read {name} from {', '.join(raw_inputs)}"
              f"{' (Google preprocessed archive)' if source == 'google' else ''}", flush=True)
        # the sizes of the release's sets, before a smoke cut (compared with Table 4)
        release_counts = {k: len(v[0]) for k, v in raw.items() if v is not None and k != "train"}
        if smoke:
            n_eval = max(20, smoke // 6)
            raw = {k: (v if v is None else (v[0][:smoke], v[1][:smoke]) if k == "train" else (v[0][:n_eval], v[1][:n_eval]))
                   for k, v in raw.items()}
            if raw_ref is not None:
                raw_ref = raw_ref[:n_eval]

        pretok = d.get("pretokenised", False) or source == "google"
        nargs = {l: (l, d["lowercase"], pretok, wmt14) for l in (s, t)}
        norm = {l: (lambda lines, l=l: normalise(lines, nargs[l], workers)) for l in (s, t)}
        tok = {}
        if d["kind"] == "wmt":
            max_len, ratio = (MAX_LEN_WMT, MAX_RATIO) if wmt14 else (MAX_LEN_OTT, RATIO_OTT)
        else:
            max_len, ratio = MAX_LEN, MAX_RATIO
        ts, tt = norm[s](raw["train"][0]), norm[t](raw["train"][1])
        if d["kind"] != "plain":
            ts, tt = clean_pairs(ts, tt, max_len, ratio)
        if raw.get("valid") is None:  # IWSLT'14: valid = every 23rd line of the cleaned train set
            n = d["valid_every"]
            tok["valid"] = ([x for i, x in enumerate(ts, 1) if i % n == 0], [x for i, x in enumerate(tt, 1) if i % n == 0])
            ts, tt = [x for i, x in enumerate(ts, 1) if i % n], [x for i, x in enumerate(tt, 1) if i % n]
            release_counts["valid"] = None if smoke else len(tok["valid"][0])
        else:
            tok["valid"] = tuple(norm[l](side) for l, side in zip((s, t), raw["valid"]))
        tok["train"] = (ts, tt)
        tok["test"] = tuple(norm[l](side) for l, side in zip((s, t), raw["test"]))
        for split, (a, b) in tok.items():
            check_parallel(f"{split} after cleaning", a, b, s, t)

        for sub in ("text", "spm", "ref"):
            os.makedirs(os.path.join(tmp, sub))
        for split, (a, b) in tok.items():
            write_lines(os.path.join(tmp, "text", f"{split}.{s}"), a)
            write_lines(os.path.join(tmp, "text", f"{split}.{t}"), b)
        # the untokenised references (Stanford's en-vi has none: its tokenised test side, Moses-detokenised;
        # Google's archive: newstest2014.TGT for the target side)
        for l, side in zip((s, t), raw["test"]):
            if raw_ref is not None:
                if l != t:
                    continue
                side = raw_ref
            elif d.get("pretokenised") or source == "google":
                from sacremoses import MosesDetokenizer

                md = MosesDetokenizer(lang=l)
                side = [md.detokenize(x.split()) for x in side]
            write_lines(os.path.join(tmp, "ref", f"test.{l}"), [x.strip() for x in side])

        import sentencepiece as spm

        vocab = vocab or (min(d["vocab"], 500) if smoke else d["vocab"])
        model_type = d.get("spm_type", "unigram")
        joint = os.path.join(tmp, "spm_train.txt")
        write_lines(joint, tok["train"][0] + tok["train"][1])
        # identity normalisation: the pieces decode to the prepared text exactly (no NFKC), so hypotheses
        # are scored against text/test.* character for character
        spm.SentencePieceTrainer.train(
            input=joint, model_prefix=os.path.join(tmp, "spm"), vocab_size=vocab, character_coverage=1.0,
            model_type=model_type, normalization_rule_name="identity",
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
            hard_vocab_limit=not smoke, input_sentence_size=10_000_000, shuffle_input_sentence=True,
            num_threads=workers)
        os.remove(joint)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(tmp, "spm.model"))
        for split, (a, b) in tok.items():
            for l, lines in ((s, a), (t, b)):
                write_lines(os.path.join(tmp, "spm", f"{split}.{l}"),
                            [" ".join(sp.encode(x, out_type=str)) for x in lines])

        cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", s, "--target-lang", t,
               "--trainpref", os.path.join(tmp, "spm", "train"), "--validpref", os.path.join(tmp, "spm", "valid"),
               "--testpref", os.path.join(tmp, "spm", "test"), "--destdir", os.path.join(tmp, "bin"),
               "--joined-dictionary", "--workers", str(workers)]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore"))
        with open(os.path.join(tmp, "preprocess.log"), "w") as f:
            f.write(res.stdout + res.stderr)
        if res.returncode != 0:
            fail("fairseq-preprocess failed:\n" + (res.stdout + res.stderr)[-3000:])

        shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)
        counts = {split: len(a) for split, (a, b) in tok.items()}
        release_counts["train"] = counts["train"]
        report, warnings = table4_check(name, counts, release_counts, smoke)
        manifest = {"dataset": name, "pair": [s, t], "lowercase": d["lowercase"], "spm_vocab": vocab,
                    "spm_model_type": model_type, "counts": counts, "smoke": bool(smoke),
                    "sets": {split: set_names(d, split) for split in ("valid", "test")},
                    "release_counts": release_counts, "table4": TABLE4.get(name, {}),
                    "table4_warnings": warnings,
                    "raw": [os.path.abspath(p) for p in raw_inputs], "source": source,
                    "seconds": round(time.time() - t0, 1)}
        if d["kind"] == "wmt":
            manifest["style"] = d["style"]
            manifest["clean"] = {"max_len": max_len, "ratio": ratio}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok\n")
        os.rename(tmp, out)  # atomic: OUT appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"prepare: wrote {out} ({counts['train']} train, {counts['valid']} valid, {counts['test']} test "
          f"pairs, {s}-{t}, joint sentencepiece {model_type} {vocab}, lowercase={d['lowercase']}"
          f"{', style ' + d['style'] if d['kind'] == 'wmt' else ''}) in {time.time() - t0:.0f}s")
    print(f"prepare: valid = {' + '.join(manifest['sets']['valid'])}; test = {' + '.join(manifest['sets']['test'])}")
    print("\n".join(report))
    for w in warnings:
        print(w, file=sys.stderr)
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("out", nargs="?", help="output dir (default: data/DATASET, data/DATASET-smoke with --smoke)")
    ap.add_argument("--raw", action="append", default=[], help="local release archive / file / dir (repeatable)")
    ap.add_argument("--smoke", action="store_true", help="first 300 training pairs, 50 valid/test, 500 pieces")
    ap.add_argument("--smoke-lines", type=int, default=300)
    ap.add_argument("--spm-vocab", type=int, default=0, help="override the joint sentencepiece size")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="replace an existing complete OUT")
    ap.add_argument("--valid-sets", help="IWSLT: comma-separated sets of the release for valid (e.g. tst2013)")
    ap.add_argument("--test-sets", help="IWSLT: comma-separated sets of the release for test (e.g. tst2014)")
    ap.add_argument("--style", default="ott2018", choices=STYLES,
                    help="WMT'16: ott2018 (Ott et al. 2018 / Google's data, default) or wmt14 (the earlier pipeline)")
    ap.add_argument("--help-files", action="store_true", help="list the files DATASET needs and exit")
    a = ap.parse_args(argv)
    if a.help_files:
        print(describe(a.dataset))
        return 0
    split = (lambda v: [x for x in v.split(",") if x.strip()] if v else None)
    try:  # option errors before anything is read
        resolve(a.dataset, split(a.valid_sets), split(a.test_sets), a.style)
    except PrepError as e:
        print(f"prepare {a.dataset}: ERROR: {e}", file=sys.stderr)
        return 2
    if os.environ.get("ARCH_SMOKE") == "1":
        a.smoke = True
    out = a.out or os.path.join("data", a.dataset + ("-smoke" if a.smoke else ""))
    if os.path.exists(out):
        if os.path.exists(os.path.join(out, "COMPLETE")) and not a.force:
            print(f"prepare: {out} is already complete (--force to rebuild)")
            return 0
        if not a.force:
            print(f"prepare: {out} exists but is not a complete data dir (no COMPLETE); pass --force to replace it",
                  file=sys.stderr)
            return 2
        shutil.rmtree(out)
    try:
        prepare(a.dataset, out, a.raw, smoke=a.smoke_lines if a.smoke else 0, vocab=a.spm_vocab, workers=a.workers,
                valid_sets=split(a.valid_sets), test_sets=split(a.test_sets), style=a.style)
    except PrepError as e:
        print(f"prepare {a.dataset}: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
