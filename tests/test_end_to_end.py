"""End to end through fairseq's CLI: preprocess, fairseq-train with ARCH across a
refresh, the cache files on disk, fairseq-generate / fairseq-interactive, BLEU, and
the README's main command (scripts/demo.sh) on the toy corpus and on Multi30k."""

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore", ARCH_SKIP_INSTALL="1")


@pytest.fixture(scope="module")
def data_dir(toy_data):
    return toy_data(400, 30)


def _bleu(text):
    m = re.search(r"BLEU4 = ([0-9.]+)", text)
    assert m, f"no BLEU line in:\n{text[-2000:]}"
    return float(m.group(1))


def _check_bleu_against_hypotheses(text):
    """fairseq's BLEU line agrees with the H-/T- lines it printed: system and reference lengths,
    and the clipped unigram precision recomputed here (a tiny model may score 0 BLEU, so the
    score itself says nothing; these numbers do)."""
    from collections import Counter

    hyp = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", text, re.M))
    ref = dict(re.findall(r"^T-(\d+)\t(.*)$", text, re.M))
    assert hyp and hyp.keys() == ref.keys()
    sys_len = sum(len(h.split()) for h in hyp.values())
    ref_len = sum(len(r.split()) for r in ref.values())
    match = sum((Counter(hyp[i].split()) & Counter(ref[i].split())).total() for i in hyp)
    m = re.search(r"BLEU4 = [0-9.]+, ([0-9.]+)/.*syslen=(\d+), reflen=(\d+)", text)
    assert m, text[-1000:]
    assert (int(m.group(2)), int(m.group(3))) == (sys_len, ref_len)
    assert float(m.group(1)) == pytest.approx(100 * match / sys_len, abs=0.051)


def test_train_across_refresh_writes_p_sized_cache_then_generates(data_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    utils.train(data_dir, save, [*utils.ARCH_TASK, *utils.TINY_MODEL, "--max-epoch", "4",
                                 "--arch-refresh-interval", "2", "--seed", "3"])
    cache = os.path.join(save, "arch_cache")
    state = json.load(open(os.path.join(cache, "state.json")))
    # epochs 1 and 3 refreshed; epoch 4's start finalised epoch 3's generation
    assert state == {"current": {"epoch": 3, "name": "gen-e0003"}, "in_progress": None}
    assert sorted(e for e in os.listdir(cache) if e.startswith("gen-")) == ["gen-e0003"]
    gen = os.path.join(cache, "gen-e0003")
    assert os.path.exists(os.path.join(gen, "COMPLETE"))

    from fairseq.data import data_utils

    ids = np.load(os.path.join(cache, "cached_ids.npy"))
    assert len(ids) == 40  # p = 0.1 of 400 sentences
    for side, lang in (("source", "src"), ("target", "tgt")):
        ds = data_utils.load_indexed_dataset(os.path.join(data_dir, f"train.src-tgt.{lang}"), None)
        sizes = np.array(ds.sizes)
        want = int(sizes[ids].sum()) * 32 * 2  # cached tokens x d x bytes (float16)
        assert os.path.getsize(os.path.join(gen, f"{side}.bin")) == want
        # ... which is p x all tokens x d x bytes up to the sampling of the cached set
        assert want == pytest.approx(0.1 * sizes.sum() * 32 * 2, rel=0.3)
        rows = np.fromfile(os.path.join(gen, f"{side}.bin"), dtype=np.float16).reshape(-1, 32)
        offs = np.concatenate([[0], np.cumsum(sizes[ids])])
        norms = [np.linalg.norm(rows[offs[i]:offs[i + 1]].astype(np.float32)) for i in range(len(ids))]
        assert max(norms) <= 0.1 * 1.002 and min(norms) > 0.05  # inside the eps-ball, not empty
        nbr = np.load(os.path.join(gen, f"{side}_nbr.npy"))
        assert nbr.shape == (400, 1) and (nbr[ids] == -1).all() and (np.delete(nbr, ids, 0) >= 0).all()

    out = utils.generate(data_dir, os.path.join(save, "checkpoint_last.pt"),
                         ["--user-dir", utils.USER_DIR, "--task", "arch_translation",
                          "--required-batch-size-multiple", "1", "--max-len-b", "20"])
    assert len(re.findall(r"^H-\d+", out, re.M)) == 30
    _check_bleu_against_hypotheses(out)


def test_fairseq_checkpoints_need_our_torch_load_fix():
    """torch >= 2.6 refuses fairseq checkpoints by default; importing the plugin makes
    fairseq's own loader work (and only it)."""
    import fairseq_arch  # noqa: F401
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    assert checkpoint_utils.torch.load is not torch.load
    assert distributed_utils.torch.load is not torch.load  # rank 0 -> rank N checkpoint broadcast
    assert torch.load.__module__ == "torch.serialization"  # global torch.load untouched


def test_real_cli_binaries_from_another_directory(data_dir, tmp_path):
    """fairseq-train / -generate / -interactive as a user runs them: separate
    processes, absolute --user-dir from another cwd (the package is also
    pip-installed: no duplicate registration), torch >= 2.6 checkpoint loading."""
    save = str(tmp_path / "ckpt")
    train = utils.run(
        ["fairseq-train", data_dir, "--user-dir", utils.USER_DIR, *utils.ARCH_TASK[2:], *utils.TINY_MODEL,
         "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1000", "--max-epoch", "2",
         "--arch-refresh-interval", "1", "--save-dir", save, "--cpu", "--no-progress-bar"],
        cwd=str(tmp_path), env=ENV, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "adv_fwd_per_batch 5" in train.stderr + train.stdout  # S=3: refresh epoch, both epochs
    ckpt = os.path.join(save, "checkpoint_best.pt")
    gen = utils.run(
        ["fairseq-generate", data_dir, "--user-dir", utils.USER_DIR, "--task", "arch_translation",
         "--path", ckpt, "--beam", "2", "--batch-size", "16", "--required-batch-size-multiple", "1",
         "--max-len-b", "20", "--cpu"],
        cwd=str(tmp_path), env=ENV, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "weights_only" not in gen.stderr
    assert len(re.findall(r"^H-\d+", gen.stdout, re.M)) == 30
    _bleu(gen.stdout)
    inter = utils.run(
        ["fairseq-interactive", data_dir, "--user-dir", "fairseq_arch", "--task", "arch_translation",
         "--path", ckpt, "--beam", "2", "--cpu", "--source-lang", "src", "--target-lang", "tgt"],
        cwd=utils.REPO, env=ENV, input="der hund sieht ein haus .\n", capture_output=True, text=True)
    assert inter.returncode == 0, inter.stderr[-3000:]
    assert re.search(r"^H-0\t", inter.stdout, re.M), inter.stdout[-2000:]


def _demo(tmp_path, *args, method="arch"):
    work = str(tmp_path / "demo")
    res = utils.run(["bash", os.path.join(utils.REPO, "scripts", "demo.sh"), "--smoke", "--workdir", work, *args],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert re.search(r"^sacreBLEU [0-9.]+", res.stdout, re.M), res.stdout
    assert "signature: nrefs:1" in res.stdout
    if method == "arch":
        assert "arch_rebuilt=" in res.stdout, res.stdout[-3000:]
    return res.stdout


def test_readme_main_command_runs_on_the_toy_corpus(tmp_path):
    out = _demo(tmp_path)
    assert "generated the synthetic toy corpus" in out and "(400 train, 50 valid, 50 test pairs" in out
    assert "== 2/4 train with arch (3 epochs, fresh perturbations every 2 epochs)" in out
    # a rerun on the demo's own workdir is allowed (the demo made it)
    assert (tmp_path / "demo" / ".fairseq-arch-demo").exists()


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "thesis.tex").write_text("precious\n")
    res = utils.run(["bash", os.path.join(utils.REPO, "scripts", "demo.sh"), "--smoke", "--workdir", str(work)],
                    env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "was not made by the demo" in res.stderr, res.stderr
    assert (work / "thesis.tex").read_text() == "precious\n"


def test_demo_on_a_real_multi30k_slice_names_the_method_it_trains(tmp_path):
    """The README's local-corpus command, with a method after `--`: the demo names the method
    it trains (rdrop here) and says nothing of ARCH before it translates."""
    MULTI30K = utils.require_shared("multi30k", "tok")
    out = _demo(tmp_path, "--corpus", MULTI30K, "--src", "de", "--tgt", "en", "--", "--adv-method", "rdrop", method="rdrop")
    assert f"using {MULTI30K}" in out and "400 train" in out
    assert "== 2/4 train with rdrop (3 epochs) ->" in out and "ARCH" not in out.split("== 3/4")[0]


def test_demo_refuses_a_corpus_with_missing_files(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.de").write_text("a\n")
    res = utils.run(["bash", os.path.join(utils.REPO, "scripts", "demo.sh"), "--smoke", "--corpus",
                          str(tmp_path / "c"), "--src", "de", "--tgt", "en", "--workdir", str(tmp_path / "w")],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode != 0
    assert "neither layout" in res.stdout + res.stderr


def test_hydra_config_runs_through_fairseq_hydra_train(data_dir, tmp_path):
    res = utils.run(
        ["fairseq-hydra-train", "--config-dir", os.path.join(utils.REPO, "configs"), "--config-name", "arch_demo",
         f"task.data={data_dir}", f"common.user_dir={utils.USER_DIR}", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
         "optimization.max_epoch=1", "model.encoder_layers=1", "model.decoder_layers=1",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=str(tmp_path), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "adv_fwd_per_batch 5" in res.stdout + res.stderr
    assert os.path.exists(tmp_path / "ckpt" / "arch_cache" / "gen-e0001" / "source.bin")


def test_installed_package_then_user_dir_registers_once(tmp_path):
    """`pip install -e .` + `--user-dir fairseq_arch`: importing the installed package
    first and then the user dir (relative or absolute) must not register twice."""
    code = (
        "import argparse, fairseq_arch\n"
        "from fairseq import utils\n"
        f"utils.import_user_module(argparse.Namespace(user_dir={utils.USER_DIR!r}))\n"
        "utils.import_user_module(argparse.Namespace(user_dir='fairseq_arch'))\n"
        "from fairseq.tasks import TASK_REGISTRY\n"
        "from fairseq.criterions import CRITERION_REGISTRY\n"
        "print(TASK_REGISTRY['arch_translation'].__module__,"
        " CRITERION_REGISTRY['adversarial_label_smoothed_cross_entropy'].__module__)\n"
    )
    res = utils.run([sys.executable, "-c", code], cwd=utils.REPO, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fairseq_arch.tasks.arch_translation fairseq_arch.criterions." in res.stdout
