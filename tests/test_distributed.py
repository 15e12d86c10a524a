"""Data-parallel ARCH on CPU: two fairseq-train processes (gloo, legacy_ddp) must
train exactly like one process with --update-freq 2 — same parameters and the same
cache bytes — across refresh and reuse epochs (and fairseq's dummy batches)."""

import os
import socket
import subprocess

import numpy as np
import pytest
import torch

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data_dir(toy_data):
    # 300 sentences at --max-tokens 600: an odd number of batches, so with 2 ranks
    # one rank gets a dummy batch in the last update of every epoch
    return toy_data(300, 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data_dir, save_dir, extra=()):
    return ["fairseq-train", data_dir, *utils.ARCH_TASK, *utils.TINY_MODEL, "--dropout", "0",
            "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "600", "--max-epoch", "4",
            "--arch-refresh-interval", "2", "--arch-cache-fraction", "0.3", "--adv-steps", "2",
            "--save-dir", save_dir, "--cpu", "--no-progress-bar", "--num-workers", "0", "--seed", "7",
            "--no-epoch-checkpoints", *extra]


def run_ranks(args, world_size):
    if world_size == 1:
        res = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        return [res.stdout + res.stderr]
    port = free_port()
    procs = [
        subprocess.Popen(args + ["--distributed-world-size", str(world_size), "--distributed-rank", str(r),
                                 "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                                 "--ddp-backend", "legacy_ddp", "--distributed-backend", "gloo"],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    return outs


def params(save_dir):
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=False)
    return state["model"]


def cache_files(save_dir):
    root = os.path.join(save_dir, "arch_cache")
    out = {}
    for gen in sorted(e for e in os.listdir(root) if e.startswith("gen-")):
        for f in sorted(os.listdir(os.path.join(root, gen))):
            if f.endswith((".bin", ".npy")):
                with open(os.path.join(root, gen, f), "rb") as fh:
                    out[f"{gen}/{f}"] = fh.read()
    return out


def test_two_ranks_equal_one_rank_with_update_freq_2(data_dir, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    out_one = run_ranks(train_args(data_dir, one, ["--update-freq", "2"]), 1)[0]
    out_two = run_ranks(train_args(data_dir, two), 2)
    assert "epoch 004" in out_one and "epoch 004" in out_two[0]
    p1, p2 = params(one), params(two)
    diff = max((p1[k].float() - p2[k].float()).abs().max().item() for k in p1)
    # same batches, same per-sample seeds, same normalisation: equal up to float
    # summation order (the observed difference is 0 or ~1e-7)
    print(f"max |param diff| 2 ranks vs 1 rank x update-freq 2: {diff:.3g}")
    assert diff < 1e-5, f"max |param diff| = {diff}"
    c1, c2 = cache_files(one), cache_files(two)
    assert sorted(c1) == sorted(c2) == sorted(
        f"gen-e0003/{s}{suf}" for s in ("source", "target") for suf in (".bin", "_mean.npy", "_nbr.npy"))
    for name in c1:
        if name.endswith("_nbr.npy"):
            assert c1[name] == c2[name], name  # identical neighbour tables
        else:
            a = np.frombuffer(c1[name][128:] if name.endswith(".npy") else c1[name],
                              dtype=np.float32 if name.endswith(".npy") else np.float16)
            b = np.frombuffer(c2[name][128:] if name.endswith(".npy") else c2[name], dtype=a.dtype)
            assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 1e-3, name
    # every rank saw the whole cache: rank 1 logged the same reuse-epoch counts
    assert "arch_cached" in out_two[0]


def test_wrong_rank_setup_fails_loudly_instead_of_hanging(data_dir, tmp_path):
    """Rank 0 finds the cache dir belongs to another run: every rank must exit with
    the message (not hang in a barrier)."""
    save = str(tmp_path / "ckpt")
    run_ranks(train_args(data_dir, save, ["--max-epoch", "1"]), 1)
    # same dir, other cache fraction: refused on rank 0, reported on rank 1 too
    args = train_args(data_dir, save, ["--max-epoch", "2", "--arch-cache-fraction", "0.5",
                                       "--reset-optimizer", "--reset-dataloader"])
    port = free_port()
    procs = [
        subprocess.Popen(args + ["--distributed-world-size", "2", "--distributed-rank", str(r),
                                 "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                                 "--ddp-backend", "legacy_ddp", "--distributed-backend", "gloo"],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "cache_fraction: cache has 0.3, this run has 0.5" in outs[0]
    assert "rank 0 failed to prepare the ARCH cache" in outs[1]
