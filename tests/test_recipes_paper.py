"""The recipes' bookkeeping for reproducing Tables 2-3, without training: seeds in save dirs (and the
refusals that keep a 3-seed mean from being one model), the seeds loop's mean/std, the Table 4 size
check, the WMT'16 preparation styles and Ott et al.'s compound-split BLEU. Seconds in all; the end-to-end
runs (prepare, train, resume, hydra, evaluate) are in tests/test_recipes.py."""

import json
import os
import re
import sys

import pytest

from . import utils

SCRIPTS = os.path.join(utils.REPO, "scripts")
RECIPES = os.path.join(SCRIPTS, "recipes")
# no GPU probe (ARCH_NUM_GPUS=0): these commands never train
ENV = dict(os.environ, PYTHONWARNINGS="ignore", ARCH_SKIP_INSTALL="1", OMP_NUM_THREADS="1", ARCH_NUM_GPUS="0")
ENV.pop("ARCH_SMOKE", None)
sys.path.insert(0, RECIPES)


def recipe(script, *args, cwd=None):
    return utils.run([sys.executable, os.path.join(RECIPES, script), *map(str, args)], env=ENV,
                     capture_output=True, text=True, cwd=cwd)


def flags(cmd):
    return {k: v for k, v in zip(cmd, cmd[1:] + [""]) if k.startswith("--")}


def test_seed_names_the_save_dir_and_other_runs_are_not_resumed(tmp_path):
    for seed in (1, 2):
        res = recipe("train.py", "iwslt15", "--direction", "vi-en", "--adv-method", "none", "--seed", seed,
                     "--print-args")
        a = flags(json.loads(res.stdout))
        assert a["--seed"] == str(seed) and a["--save-dir"] == f"checkpoints/iwslt15-vi-en-none-seed{seed}"
    # the old way round (`-- --seed 2`) kept seed 1's save dir and resumed its finished run: refused
    for extra in (["--seed", "2"], ["--seed=2"], ["--save-dir", "x"], ["--adv-method", "none"]):
        res = recipe("train.py", "iwslt14", "--print-args", "--", *extra)
        assert res.returncode == 2 and "not after `--`" in res.stderr, (extra, res.stderr)
    # a save dir that holds another seed's (or method's) run is refused before anything starts
    data = tmp_path / "data"
    data.mkdir()
    (data / "COMPLETE").write_text("ok\n")
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "recipe.json").write_text(json.dumps({"dataset": "iwslt14", "direction": "de-en", "method": "arch",
                                                  "seed": 1}))
    for args, why in ((["--seed", "2"], "seed 1 there, 2 asked"), (["--adv-method", "none"], "method 'arch' there")):
        res = recipe("train.py", "iwslt14", "--data", data, "--save-dir", save, *args)
        assert res.returncode == 2 and "holds another run" in res.stderr and why in res.stderr, res.stderr
    # ... and so is a checkpoint without recipe.json (an older run: its seed is unknown)
    (save / "recipe.json").unlink()
    (save / "checkpoint_last.pt").write_bytes(b"")
    res = recipe("train.py", "iwslt14", "--data", data, "--save-dir", save)
    assert res.returncode == 2 and "no recipe.json" in res.stderr


def test_seeds_loop_commands_and_mean_std(tmp_path):
    res = recipe("seeds.py", "iwslt14", "--seeds", "1,2,3", "--print-args", "--", "--max-epoch", "3")
    plan = json.loads(res.stdout)
    assert plan["save_dirs"] == {str(s): f"checkpoints/iwslt14-de-en-arch-seed{s}" for s in (1, 2, 3)}
    trains, evals = plan["commands"][::2], plan["commands"][1::2]
    for s, t, e in zip((1, 2, 3), trains, evals):
        assert t[1].endswith("train.py") and flags(t)["--seed"] == str(s) and t[-2:] == ["--max-epoch", "3"]
        assert e[1].endswith("evaluate.py") and flags(e)["--seed"] == str(s)
    assert recipe("seeds.py", "iwslt14", "--seeds", "1,1", "--print-args").returncode == 2

    # the report: scores of 3 seeds -> mean and sample standard deviation (n-1), written beside them
    bleus = {1: 30.0, 2: 31.0, 3: 35.0}
    for s, b in bleus.items():
        d = tmp_path / "checkpoints" / f"iwslt14-de-en-arch-seed{s}" / "eval-test"
        d.mkdir(parents=True)
        (d / "scores.json").write_text(json.dumps({"direction": "de-en", "bleu": b, "sacrebleu": b - 1}))
        (d / "hyp.tok.en").write_text(f"hypotheses of seed {s}\n")
    res = recipe("seeds.py", "iwslt14", "--report-only", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.load(open(tmp_path / "checkpoints" / "iwslt14-de-en-arch-seeds.json"))
    assert out["n"] == 3 and out["mean"]["bleu"] == 32.0 and out["std"]["bleu"] == 2.65  # sqrt(7)
    assert out["mean"]["sacrebleu"] == 31.0 and "bleu 32.00 +- 2.65" in res.stdout
    # two "seeds" that are one model (identical hypotheses) are named, and the exit status says so
    (tmp_path / "checkpoints" / "iwslt14-de-en-arch-seed3" / "eval-test" / "hyp.tok.en").write_text(
        "hypotheses of seed 1\n")
    res = recipe("seeds.py", "iwslt14", "--report-only", cwd=tmp_path)
    assert res.returncode == 1 and "seeds 1 and 3 gave identical test hypotheses" in res.stdout


def test_table4_size_check():
    import prepare

    assert prepare.TABLE4["iwslt16"] == {"valid": 1080, "test": 1133} and prepare.TABLE4["iwslt15"]["valid"] == 768
    lines, warn = prepare.table4_check("iwslt16", {"train": 9, "valid": 1080, "test": 1305},
                                       {"train": 9, "valid": 1080, "test": 1305}, smoke=False)
    text = "\n".join(lines)
    assert re.search(r"^  valid +1080 +1080  = Table 4$", text, re.M), text
    assert re.search(r"^  test +1305 +1133  DIFFERS$", text, re.M), text
    assert re.search(r"^  train +9 +\?  \(Table 4 not quoted here\)$", text, re.M), text
    assert warn == ["prepare: WARNING: iwslt16 test has 1305 pairs, the paper's Table 4 1133: "
                    "BLEU is not comparable with the paper's"]
    # smoke: the release's sets before the cut are compared, the cut training set is not
    lines, warn = prepare.table4_check("iwslt15", {"train": 240, "valid": 20, "test": 20},
                                       {"train": 240, "valid": 768, "test": 1268}, smoke=True)
    assert not warn and re.search(r"^  valid +768 +768  = Table 4$", "\n".join(lines), re.M)
    assert "(smoke run: not compared)" in lines[2]
    lines, warn = prepare.table4_check("wmt16", {"train": 5, "valid": 3000, "test": 3003}, {}, smoke=False)
    assert not warn  # no Table 4 cell quoted for WMT'16: nothing to compare


def test_wmt16_styles_and_compound_split_bleu():
    import prepare
    import score

    line = "Die „E-Mail-Adresse“ ist neu."
    ott = prepare.Normaliser("de", False, False, False)(line)  # --style ott2018: tokenizer.perl, no -a
    wmt14 = prepare.Normaliser("de", False, False, True)(line)  # --style wmt14: normalised, -a
    assert "E-Mail-Adresse" in ott and "„" in ott and "@-@" not in ott
    assert "E @-@ Mail @-@ Adresse" in wmt14 and "„" not in wmt14
    pair = (["ja danke"], ["yes , thank you"])  # length ratio 2
    assert prepare.clean_pairs(*pair, prepare.MAX_LEN_OTT, prepare.RATIO_OTT) == pair
    assert prepare.clean_pairs(*pair, prepare.MAX_LEN_WMT, prepare.MAX_RATIO) == ([], [])
    assert prepare.resolve("wmt16", style="wmt14").get("spm_type") is None
    with pytest.raises(prepare.PrepError):
        prepare.resolve("iwslt14", style="wmt14")

    # fairseq's scripts/compound_split_bleu.sh (perl s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g, left to right)
    assert score.compound_split("Café-Liebhaber a-b-c x - y") == "Café ##AT##-##AT## Liebhaber a ##AT##-##AT## b-c x - y"
    hyp, ref = ["das ist ein Café-Besuch heute"], ["das ist ein Café-Liebhaber heute"]
    plain, split = score.tokenized_bleu(hyp, ref), score.tokenized_bleu(hyp, ref, compound=True)
    assert (plain.counts[0], plain.totals[0]) == (4, 5) and (split.counts[0], split.totals[0]) == (6, 7)
    assert score.tokenized_bleu(["a b c d"], ["a b c d"]).score == pytest.approx(100.0)


def test_evaluate_scores_against_the_prepared_text(tmp_path, capsys):
    """The reported BLEU is the hypotheses against DATA/text/test.TGT (the prepared, tokenised
    reference), not fairseq-generate's T- lines (rebuilt from bin/: <<unk>>, normalised); WMT'16 (ott2018)
    adds the compound-split BLEU; sacreBLEU uses the untokenised DATA/ref/test.TGT."""
    import evaluate

    data = tmp_path / "data"
    (data / "text").mkdir(parents=True)
    (data / "ref").mkdir()
    refs = ["das ist ein Café-Besuch heute .", "wir gehen nach Hause , sagte sie .", "gut ."]
    (data / "text" / "test.de").write_text("\n".join(refs) + "\n")
    (data / "ref" / "test.de").write_text("\n".join(r.replace(" .", ".").replace(" ,", ",") for r in refs) + "\n")
    hyps = ["das ist ein Café-Liebhaber heute .", "wir gehen nach Hause , sagte sie .", "gut ."]
    log = []
    for i, (h, r) in enumerate(zip(hyps, refs)):
        log += [f"S-{i}\tsource", f"T-{i}\t<<unk>> {r}", f"H-{i}\t-0.5\t{h}", f"D-{i}\t-0.5\t{h}",
                f"P-{i}\t" + " ".join(["-0.1"] * (len(h.split()) + 1))]
    log.append("Generate test with beam=4: BLEU4 = 1.00, 1/1/1/1 (BP=1.000, ratio=1.000, syslen=1, reflen=1)")
    import score

    sc = evaluate.score_log("\n".join(log), str(data), "test", "de", {"style": "ott2018"}, str(tmp_path / "out"))
    assert sc["bleu"] == round(score.tokenized_bleu(hyps, refs).score, 2) != 100.0
    assert sc["bleu_compound_split"] == round(score.tokenized_bleu(hyps, refs, compound=True).score, 2)
    assert sc["bleu_compound_split"] > sc["bleu"] and sc["at_length_limit"] == 0 and sc["n"] == 3
    assert sc["fairseq_bleu4"].startswith("Generate test") and "text/test.de" in capsys.readouterr().out
    assert (tmp_path / "out" / "hyp.tok.de").read_text().splitlines() == hyps
    # hypotheses that end at the length limit are counted
    capped = [l if not l.startswith("P-0") else "P-0\t" + " ".join(["-0.1"] * 10) for l in log]
    assert evaluate.score_log("\n".join(capped), str(data), "test", "de", {}, str(tmp_path / "o2"),
                              max_len=9)["at_length_limit"] == 1
    with pytest.raises(ValueError):  # a hypothesis missing
        evaluate.score_log("\n".join(l for l in log if not l.startswith("D-2")), str(data), "test", "de", {},
                           str(tmp_path / "o3"))


def test_rdrop_is_a_recipe_method_with_its_own_weight():
    """rdrop trains with R-Drop's alpha (--adv-lambda 5, Liang et al. 2021's IWSLT'14 De-En setting), set
    once in the command, and through --hydra as an override; the other methods keep --adv-lambda 1."""
    import train

    from fairseq_arch.methods import method_names

    assert "rdrop" in train.METHODS and set(train.METHODS) <= set(method_names())
    for method, weight in (("rdrop", "5"), ("arch", "1.0"), ("none", "1.0")):
        cmd = json.loads(recipe("train.py", "iwslt14", "--adv-method", method, "--print-args").stdout)
        assert cmd.count("--adv-lambda") == 1 and flags(cmd)["--adv-lambda"] == weight, method
        assert flags(cmd)["--adv-method"] == method
        assert flags(cmd)["--save-dir"] == f"checkpoints/iwslt14-de-en-{method}-seed1"
    hydra = json.loads(recipe("train.py", "iwslt14", "--adv-method", "rdrop", "--hydra", "--print-args").stdout)
    assert "criterion.adv_method=rdrop" in hydra and "criterion.adv_lambda=5" in hydra
    hydra = json.loads(recipe("train.py", "iwslt14", "--hydra", "--print-args").stdout)
    assert not [x for x in hydra if x.startswith("criterion.adv_lambda")]
    # the wrappers' --help and the docs name it
    for script in ("train-iwslt14.sh", "train-iwslt15.sh", "train-iwslt16.sh", "train-wmt16.sh"):
        res = utils.run(["bash", os.path.join(SCRIPTS, script), "--help"], env=ENV, capture_output=True, text=True)
        assert "rdrop" in res.stdout and "--adv-method" in res.stdout, script
    assert "rdrop" in open(os.path.join(utils.REPO, "docs", "recipes.md")).read()


# (script, new spelling, old spelling, value) of every renamed recipe flag
RENAMED = [("train.py", "--adv-method", "--method", "none"),
           ("train.py", "--arch-neighbor-embeddings", "--neighbor-checkpoint", "random"),
           ("seeds.py", "--adv-method", "--method", "smart"),
           ("evaluate.py", "--adv-method", "--method", "r3f"),
           ("evaluate.py", "--save-dir", "--checkpoint-dir", "ckpt/x"),
           ("evaluate.py", "--gen-subset", "--subset", "valid"),
           ("evaluate.py", "--results-path", "--out", "results/x")]


@pytest.mark.parametrize("script,new,old,value", RENAMED, ids=lambda x: x if str(x).startswith("--") else None)
def test_recipe_flags_keep_fairseqs_names_and_the_old_ones_still_work(script, new, old, value, tmp_path):
    """The documented flag is fairseq's (or the plugin's) name; the recipe's former name gives the same
    command, with a deprecation note naming the new flag, and is not listed in --help."""
    with_new = recipe(script, "iwslt14", new, value, "--print-args", cwd=tmp_path)
    with_old = recipe(script, "iwslt14", old, value, "--print-args", cwd=tmp_path)
    assert with_new.returncode == with_old.returncode == 0, with_old.stderr
    default = recipe(script, "iwslt14", "--print-args", cwd=tmp_path)
    # what --print-args shows: the command (stdout), and evaluate's results dir (stderr)
    shown = lambda r: (json.loads(r.stdout), [l for l in r.stderr.splitlines() if "deprecated" not in l])  # noqa: E731
    assert shown(with_new) == shown(with_old) != shown(default)
    assert f"{old} is deprecated: use {new} (same meaning)" in with_old.stderr
    assert "deprecated" not in with_new.stderr
    options = recipe(script, "--help").stdout.split("options:")[1]
    assert re.search(rf"^  {re.escape(new)}\b", options, re.M) and not re.search(rf"^  {re.escape(old)}\b",
                                                                                 options, re.M)


def test_a_deprecated_flag_is_named_as_typed_in_errors(tmp_path):
    for flag in ("--arch-neighbor-embeddings", "--neighbor-checkpoint"):
        res = recipe("train.py", "iwslt14", flag, tmp_path / "missing.pt", "--print-args")
        assert res.returncode == 2 and f"error: {flag} {tmp_path / 'missing.pt'}: no such file" in res.stderr
    res = recipe("train.py", "iwslt14", "--method", "nope", "--print-args")
    assert res.returncode == 2 and "invalid choice: 'nope'" in res.stderr
