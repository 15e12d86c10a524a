"""Resume after SIGKILL at any point of ARCH's cycle, compared with an uninterrupted
run (dropout 0, 5 epochs, refresh every 2 epochs: refreshes in epochs 1, 3, 5).

Kill points are injected with FAIRSEQ_ARCH_FAULT=<point>@<epoch>:<n> (the process
SIGKILLs itself the n-th time it passes the point): mid reuse epoch, mid refresh
epoch (also after a mid-epoch checkpoint), while a new generation is being copied,
and in the end-of-refresh finalisation. The resumed run must end exactly where the
uninterrupted one ends: same parameters, same cache bytes. For comparison the test
measures plain fairseq's own resume drift (translation task, label smoothing): fairseq
0.12 rebuilds its batches with a seed that depends on the epoch it resumes in, which
arch_translation corrects.
"""

import hashlib
import json
import os
import re
import shutil
import signal

import pytest
import torch

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
EPOCHS = 5
# one fairseq-train call of this module takes well under a minute alone; the margin is for
# a loaded machine. A hung run is killed with its process group (utils.run) and fails here.
TIMEOUT = 600


@pytest.fixture(scope="module")
def data_dir(toy_data):
    return toy_data(200, 20)


def args(data_dir, save_dir, epochs, arch=True, extra=()):
    task = utils.ARCH_TASK + ["--arch-refresh-interval", "2", "--arch-cache-fraction", "0.3", "--adv-steps", "2"] \
        if arch else ["--user-dir", utils.USER_DIR, "--task", "translation",
                      "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
    return ["fairseq-train", data_dir, *task, *utils.TINY_MODEL, "--dropout", "0", "--optimizer", "adam",
            "--lr", "0.005", "--max-tokens", "600", "--max-epoch", str(epochs), "--save-dir", save_dir,
            "--cpu", "--no-progress-bar", "--num-workers", "0", "--seed", "7", "--no-epoch-checkpoints", *extra]


def run(argv, fault=None):
    env = dict(ENV, FAIRSEQ_ARCH_FAULT=fault) if fault else ENV
    res = utils.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = res.stdout + res.stderr
    if fault:
        assert res.returncode == -signal.SIGKILL, f"fault {fault} did not fire:\n{out[-3000:]}"
    else:
        assert res.returncode == 0, out[-4000:]
    return out


def run_refused(argv):
    """A run that must stop with an error; returns its output (for the message)."""
    res = utils.run(argv, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode not in (0, -signal.SIGKILL), f"expected a refusal, got rc {res.returncode}:\n{out[-3000:]}"
    return out


def params(save_dir):
    return torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=False)["model"]


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def gen_bytes(save_dir, gen):
    d = os.path.join(save_dir, "arch_cache", gen)
    return {f: hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(d)) if f.endswith((".bin", ".npy"))}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted ARCH run, and fairseq's own resume drift on plain LS."""
    root = tmp_path_factory.mktemp("reference")
    arch = str(root / "arch")
    run(args(data_dir, arch, EPOCHS))
    plain_a, plain_b = str(root / "plain_a"), str(root / "plain_b")
    run(args(data_dir, plain_a, EPOCHS, arch=False))
    run(args(data_dir, plain_b, 2, arch=False))
    run(args(data_dir, plain_b, EPOCHS, arch=False))
    drift = max_diff(params(plain_a), params(plain_b))
    print(f"plain fairseq resume drift (stop after epoch 2, resume to {EPOCHS}): {drift:.3g}")
    return {"save": arch, "params": params(arch), "plain_drift": drift}


def check_against_reference(save, reference, label):
    diff = max_diff(params(save), reference["params"])
    print(f"{label}: max |param diff| vs uninterrupted = {diff:.3g} (plain fairseq drift {reference['plain_drift']:.3g})")
    # arch_translation builds its training batches independently of the epoch it
    # resumes in (fairseq 0.12 does not: its drift above), so resuming is exact
    assert diff == 0.0, diff
    for gen in ("gen-e0003", "gen-e0005"):  # last complete generation, and epoch 5's
        assert gen_bytes(save, gen) == gen_bytes(reference["save"], gen), gen
    assert os.path.exists(os.path.join(save, "arch_cache", "gen-e0003", "COMPLETE"))


def test_kill_mid_reuse_epoch_reuses_the_cache_byte_for_byte(data_dir, reference, tmp_path):
    save = str(tmp_path / "s")
    run(args(data_dir, save, EPOCHS), fault="reuse_batch@2:3")
    before = gen_bytes(save, "gen-e0001")
    out = run(args(data_dir, save, 2))  # finish epoch 2 only: no refresh in between
    assert gen_bytes(save, "gen-e0001") == before
    assert "adv_fwd_per_batch 2" in out and "arch_fresh 0" in out  # no ascent was recomputed
    run(args(data_dir, save, EPOCHS))
    check_against_reference(save, reference, "kill mid reuse epoch 2")


def test_kill_mid_refresh_epoch(data_dir, reference, tmp_path):
    save = str(tmp_path / "s")
    run(args(data_dir, save, EPOCHS), fault="refresh_batch@3:2")
    assert not os.path.exists(os.path.join(save, "arch_cache", "gen-e0003", "COMPLETE"))
    before = gen_bytes(save, "gen-e0001")  # the generation being read stays untouched
    run(args(data_dir, save, 3))
    assert gen_bytes(save, "gen-e0001") == before
    run(args(data_dir, save, EPOCHS))
    check_against_reference(save, reference, "kill mid refresh epoch 3")


def test_kill_mid_refresh_epoch_after_a_mid_epoch_checkpoint(data_dir, reference, tmp_path):
    save = str(tmp_path / "s")
    extra = ["--save-interval-updates", "2"]
    run(args(data_dir, save, EPOCHS, extra=extra), fault="refresh_batch@3:3")
    run(args(data_dir, save, EPOCHS, extra=extra))
    check_against_reference(save, reference, "kill mid refresh epoch 3, resumed mid-epoch")


def test_kill_while_copying_a_new_generation(data_dir, reference, tmp_path):
    save = str(tmp_path / "s")
    run(args(data_dir, save, EPOCHS), fault="create_generation@gen-e0003:1")
    assert os.path.isdir(os.path.join(save, "arch_cache", "gen-e0003.tmp"))  # half-made, never used
    run(args(data_dir, save, EPOCHS))
    assert not os.path.exists(os.path.join(save, "arch_cache", "gen-e0003.tmp"))
    check_against_reference(save, reference, "kill while creating generation 3")


def test_kill_during_end_of_refresh_finalisation(data_dir, reference, tmp_path):
    save = str(tmp_path / "s")
    run(args(data_dir, save, EPOCHS), fault="finalize@3:1")
    assert not os.path.exists(os.path.join(save, "arch_cache", "gen-e0003", "COMPLETE"))
    run(args(data_dir, save, EPOCHS))
    check_against_reference(save, reference, "kill during finalisation of generation 3")


def test_corrupted_or_truncated_cache_is_refused_on_resume(data_dir, tmp_path):
    save = str(tmp_path / "s")
    run(args(data_dir, save, 2))
    # a damaged state.json stops fairseq-train naming the file (the in-process tests of
    # test_robustness.py cover the other ways state, layout and id files can be damaged)
    state = os.path.join(save, "arch_cache", "state.json")
    good = open(state).read()
    with open(state, "w") as f:
        f.write(good[: len(good) // 2])
    out = run_refused(args(data_dir, save, 3))
    assert f"CacheCorruptError: {state} is not valid JSON" in out, out[-3000:]
    with open(state, "w") as f:
        f.write(good)
    path = os.path.join(save, "arch_cache", "gen-e0001", "source.bin")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x55\xaa")
    out = run_refused(args(data_dir, save, 3))
    assert "is corrupted" in out, out[-3000:]
    with open(path, "r+b") as f:
        f.truncate(64)
    out = run_refused(args(data_dir, save, 3))
    assert "wrong size" in out, out[-3000:]


# -- resuming from an older checkpoint: the cache on disk is ahead of it ------------------
#
# The cache keeps one complete generation (the current one) and at most one unfinished
# one. A checkpoint whose next epoch reads the current generation can be resumed from
# (an unfinished generation of a later epoch then belongs to the abandoned run and is
# dropped); any older one needs generations that no longer exist and is refused, with
# the cache left exactly as it was so that resuming the right checkpoint still works.


def cache_snapshot(save_dir):
    """sha1 of every file of the cache dir (owner.token is restamped by every start)."""
    root = os.path.join(save_dir, "arch_cache")
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f != "owner.token":
                path = os.path.join(dirpath, f)
                out[os.path.relpath(path, root)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


def read_state(save_dir):
    with open(os.path.join(save_dir, "arch_cache", "state.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def killed_in_epoch_5(data_dir, tmp_path_factory):
    """A run with per-epoch checkpoints, SIGKILLed mid refresh epoch 5: the cache holds
    gen-e0003 (current) and an unfinished gen-e0005; checkpoint1-4.pt exist. Read-only:
    tests copy it."""
    save = str(tmp_path_factory.mktemp("killed5") / "s")
    argv = [a for a in args(data_dir, save, EPOCHS) if a != "--no-epoch-checkpoints"]
    run(argv, fault="refresh_batch@5:2")
    state = read_state(save)
    assert state["current"]["name"] == "gen-e0003" and state["in_progress"]["epoch"] == 5, state
    for e in range(1, 5):
        assert os.path.exists(os.path.join(save, f"checkpoint{e}.pt")), f"checkpoint{e}.pt not written"
    return save


def resume_from(killed, tmp_path, ckpt):
    """A copy of the killed run whose checkpoint_last.pt is the older ``ckpt``."""
    save = str(tmp_path / "s")
    shutil.copytree(killed, save)
    shutil.copyfile(os.path.join(save, ckpt), os.path.join(save, "checkpoint_last.pt"))
    return save


@pytest.mark.parametrize("ckpt, refused", [
    # next epoch 3 is a refresh, but the cache already holds epoch 3's refresh
    ("checkpoint2.pt", "already holds the perturbations refreshed in epoch 3, but training is at epoch 3"),
    # next epoch 2 reuses epoch 1's perturbations, overwritten by epoch 3's since
    ("checkpoint1.pt", "epoch 2 reuses the perturbations of epoch 1, but .* holds those of epoch 3"),
], ids=["next-epoch-refreshes", "next-epoch-reuses"])
def test_resume_from_a_checkpoint_older_than_the_cache_is_refused_untouched(
        data_dir, killed_in_epoch_5, tmp_path, ckpt, refused):
    save = resume_from(killed_in_epoch_5, tmp_path, ckpt)
    before = cache_snapshot(save)
    out = run_refused(args(data_dir, save, EPOCHS))
    assert re.search(f"CacheMismatchError: .*{refused}.*the cache is ahead of the checkpoint", out), out[-3000:]
    # refused before touching anything: the unfinished gen-e0005 of the run that owns
    # this cache is not dropped just because a wrong checkpoint was tried first
    assert cache_snapshot(save) == before, "a refused resume changed the cache dir"


def test_resume_from_an_older_checkpoint_drops_the_unfinished_generation(data_dir, reference, killed_in_epoch_5,
                                                                       tmp_path):
    # checkpoint3.pt: epoch 4 reuses gen-e0003, still current; gen-e0005 of the
    # abandoned continuation is dropped and recomputed when training gets to epoch 5
    save = resume_from(killed_in_epoch_5, tmp_path, "checkpoint3.pt")
    current = gen_bytes(save, "gen-e0003")
    out = run(args(data_dir, save, 4))
    assert "dropping the unfinished generation of epoch 5" in out, out[-3000:]
    state = read_state(save)
    assert state == {"current": {"name": "gen-e0003", "epoch": 3}, "in_progress": None}, \
        f"the abandoned run's generation is still in state.json: {state}"
    assert not os.path.exists(os.path.join(save, "arch_cache", "gen-e0005")), "the unfinished generation was kept"
    assert gen_bytes(save, "gen-e0003") == current, "the reuse epoch changed the current generation"
    run(args(data_dir, save, EPOCHS))
    check_against_reference(save, reference, "resumed from checkpoint3.pt after a kill in epoch 5")
