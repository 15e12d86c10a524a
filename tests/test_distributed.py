"""Data-parallel ARCH on CPU: two fairseq-train processes (gloo; legacy_ddp, and torch's
DistributedDataParallel as --ddp-backend pytorch_ddp builds it) must train exactly like one
process with --update-freq 2 — same parameters and the same cache bytes — across refresh and
reuse epochs (and fairseq's dummy batches)."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data_dir(toy_data):
    # 300 sentences at --max-tokens 500: an odd number of batches (600 gives an even
    # one), so with 2 ranks one rank gets a dummy batch in the last update of every
    # epoch (asserted below)
    return toy_data(300, 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data_dir, save_dir, extra=()):
    return ["fairseq-train", data_dir, *utils.ARCH_TASK, *utils.TINY_MODEL, "--dropout", "0",
            "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "500", "--max-epoch", "4",
            "--arch-refresh-interval", "2", "--arch-cache-fraction", "0.3", "--adv-steps", "2",
            "--save-dir", save_dir, "--cpu", "--no-progress-bar", "--num-workers", "0", "--seed", "7",
            "--no-epoch-checkpoints", *extra]


# fairseq's pytorch_ddp backend passes device_ids=[device_id] to torch's
# DistributedDataParallel, which torch refuses for CPU modules; on GPUs it is the same
# wrapper. This launcher drops the device ids (and says so, for the test to check) and
# runs fairseq-train unchanged otherwise: the reducer, no_sync accumulation and fairseq's
# dummy batches are the real ones.
CPU_TORCH_DDP_TRAIN = """
import sys
import torch.nn.parallel as parallel
import fairseq.models.distributed_fairseq_model as dfm

class CpuDistributedDataParallel(parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        super().__init__(module, **kwargs)
        print("torch DistributedDataParallel on CPU", flush=True)

dfm.DistributedDataParallel = CpuDistributedDataParallel
from fairseq_cli.train import cli_main
sys.argv = ["fairseq-train"] + sys.argv[1:]
cli_main()
"""

TIMEOUT = 600


def run_ranks(args, world_size, ddp_backend="legacy_ddp", expect_ok=True, timeout=TIMEOUT):
    """Outputs (stdout+stderr) of ``world_size`` ranks of ``args`` (a fairseq-train command
    line); each rank in its own process group, every rank killed when one times out."""
    if ddp_backend == "pytorch_ddp":
        args = [sys.executable, "-c", CPU_TORCH_DDP_TRAIN, *args[1:]]
    if world_size == 1:
        res = utils.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
        out = res.stdout + res.stderr
        assert (res.returncode == 0) == expect_ok, out[-4000:]
        return [out]
    port = free_port()
    procs = [
        utils.popen(args + ["--distributed-world-size", str(world_size), "--distributed-rank", str(r),
                            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                            "--ddp-backend", ddp_backend, "--distributed-backend", "gloo"],
                    env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    try:
        # one deadline for all ranks: a hung rank 1 must not wait behind rank 0's timeout
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            utils.kill_group(p)
    for p, o in zip(procs, outs):
        assert (p.returncode == 0) == expect_ok, f"rank exited with {p.returncode}:\n{o[-4000:]}"
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


DUMMY_LINE = "ARCH: dummy batches per rank in the last epoch: "
CACHE_FILES = sorted(f"gen-e0003/{s}{suf}" for s in ("source", "target") for suf in (".bin", "_mean.npy", "_nbr.npy", "_norm.npy"))


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    """The reference: 1 rank x --update-freq 2 (shared by the DDP backends' tests)."""
    save = str(tmp_path_factory.mktemp("one_rank"))
    out = run_ranks(train_args(data_dir, save, ["--update-freq", "2"]), 1)[0]
    assert "epoch 004" in out, out[-4000:]
    assert DUMMY_LINE not in out, "one rank has no dummy batches"
    return save, out


def cache_counts(out):
    """arch_fresh / arch_cached / arch_rebuilt of every epoch summary (rank 0 logs the sum
    over ranks)."""
    return re.findall(r"epoch (\d+) \|.*?arch_fresh (\S+) \| arch_cached (\S+) \| arch_rebuilt (\S+)", out)


def assert_same_training(one, two, outs_two):
    one, out_one = one
    """Bit-identical parameters and cache files; the cache covers every rank's samples."""
    assert "epoch 004" in outs_two[0], outs_two[0][-4000:]
    # same batches, same per-sample seeds, same normalisation, and a sum of two
    # gradients is the same float whichever rank adds it: nothing may differ
    p1, p2 = params(one), params(two)
    assert sorted(p1) == sorted(p2)
    differ = [k for k in p1 if not torch.equal(p1[k], p2[k])]
    diff = max([(p1[k].float() - p2[k].float()).abs().max().item() for k in differ] or [0.0])
    print(f"max |param diff| 2 ranks vs 1 rank x update-freq 2: {diff:.3g}")
    assert not differ, f"{len(differ)} parameters differ (max |diff| {diff:.3g}), e.g. {differ[:3]}"
    c1, c2 = cache_files(one), cache_files(two)
    assert sorted(c1) == sorted(c2) == CACHE_FILES, (sorted(c1), sorted(c2))
    for name in CACHE_FILES:
        assert c1[name] == c2[name], f"{name} differs between 2 ranks and 1 rank x update-freq 2"
    # every sample went through the cache exactly as with one rank (fresh on refresh
    # epochs, read or rebuilt on the others), whatever rank it was on
    counts = cache_counts(out_one)
    assert [c[0] for c in counts] == ["001", "002", "003", "004"], counts
    assert cache_counts(outs_two[0]) == counts


def assert_one_dummy_batch_rank(outs):
    # an odd number of batches: in the last update of every epoch one rank has no batch
    # left and fairseq runs a dummy batch there (rank 0 logs the per-rank counts at the
    # next epoch start); without one the test would not cover the dummy-batch path
    reports = re.findall(re.escape(DUMMY_LINE) + r"(\[.*?\])", outs[0])
    assert len(reports) == 3, f"expected a report after epochs 1-3, got {reports}"
    for r in reports:
        counts = [int(c) for c in r.strip("[]").split(",")]
        assert sorted(counts) == [0, 1], f"dummy batches per rank: {counts}"


def test_two_ranks_equal_one_rank_with_update_freq_2(data_dir, one_rank, tmp_path):
    two = str(tmp_path / "two")
    outs = run_ranks(train_args(data_dir, two), 2)
    assert_same_training(one_rank, two, outs)
    assert_one_dummy_batch_rank(outs)


def test_torch_ddp_two_ranks_equal_one_rank_with_update_freq_2(data_dir, one_rank, tmp_path):
    """--ddp-backend pytorch_ddp: the model is wrapped in torch's DistributedDataParallel,
    whose reducer must see exactly one forward/backward pair per batch (ascent forwards
    go through the unwrapped model), also on the rank that runs a dummy batch."""
    two = str(tmp_path / "two")
    outs = run_ranks(train_args(data_dir, two), 2, ddp_backend="pytorch_ddp")
    assert all("torch DistributedDataParallel on CPU" in o for o in outs), outs[0][-4000:]
    assert_same_training(one_rank, two, outs)
    assert_one_dummy_batch_rank(outs)


def test_wrong_rank_setup_fails_loudly_instead_of_hanging(data_dir, tmp_path):
    """Rank 0 finds the cache dir belongs to another run: every rank must exit with
    the message (not hang in a barrier)."""
    save = str(tmp_path / "ckpt")
    run_ranks(train_args(data_dir, save, ["--max-epoch", "1"]), 1)
    # same dir, other cache fraction: refused on rank 0, reported on rank 1 too
    args = train_args(data_dir, save, ["--max-epoch", "2", "--arch-cache-fraction", "0.5",
                                       "--reset-optimizer", "--reset-dataloader"])
    outs = run_ranks(args, 2, expect_ok=False, timeout=300)
    assert "cache_fraction: cache has 0.3, this run has 0.5" in outs[0]
    assert "RankZeroError: rank 0 failed in the ARCH cache's work" in outs[1]
