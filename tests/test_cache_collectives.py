"""The cache's collectives wait as long as rank 0's finalisation takes, whatever the timeout
of fairseq's default process group (NCCL's default is 10 minutes; a refresh finalised at
WMT scale takes longer): they run on a gloo group of the cache's own with a long timeout
(fairseq_arch.distributed). Here the default group's timeout is cut to seconds and rank 0
is slowed past it: without the cache's own group rank 1 times out (the control below shows
that the short timeout bites), with it training goes on and finishes."""

import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from fairseq_arch import distributed as cache_dist

from . import test_distributed, utils
from .test_distributed import cache_counts, run_ranks, train_args

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
# the default group's timeout in these tests, and how long rank 0 is made to work past it
SHORT_S = 6  # seconds; wide enough for gloo to connect a group on a loaded 2-core machine
SLOW_S = 10  # rank 0 works past SHORT_S by 4 s: the ranks leave init_process_group together

# One rank of a pure torch.distributed run: the default group is made with a roomy timeout
# (ranks start seconds apart), then cut to SHORT_S once every rank is up.
RANK = r"""
import sys, time
from datetime import timedelta
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from fairseq_arch import distributed as cache_dist

rank, world, port, mode, slow_s, short_s = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                            float(sys.argv[5]), float(sys.argv[6]))
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=timedelta(seconds=120))
dist.barrier()
c10d._set_pg_timeout(timedelta(seconds=short_s))

def finalise():  # rank 0's slow work
    time.sleep(slow_s)
    return {"answer": 42}

if mode == "default-group":
    # what the cache did before it had a group of its own
    box = [finalise() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    got = box[0]
else:
    dist.barrier(group=cache_dist.cache_group())
    got = cache_dist.on_rank0(finalise)
    assert cache_dist.all_gather_object(rank) == list(range(world))
    assert cache_dist.broadcast_object(("from", rank)) == ("from", 0)
# the default group still works beside the cache's (made on every rank, in the same order)
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == world, t
print("RESULT", got["answer"], flush=True)
dist.barrier()
dist.destroy_process_group()
# skip interpreter teardown: gloo's background threads, destroyed with the process, now and then
# abort it after everything above succeeded ("terminate called without an active exception")
import os
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torch_ranks(mode, slow_s=SLOW_S, short_s=SHORT_S, env=None, world=2, timeout=300):
    """(return codes, outputs) of ``world`` processes running RANK."""
    port = free_port()
    procs = [utils.popen([sys.executable, "-c", RANK, str(r), str(world), str(port), mode, str(slow_s),
                          str(short_s)], cwd=utils.REPO, env=dict(ENV, **(env or {})),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                utils.kill_group(p)
                outs.append(p.communicate()[0] + "\n[killed: test timeout]")
    finally:
        for p in procs:
            utils.kill_group(p)
    return [p.returncode for p in procs], outs


TIMED_OUT = re.compile(r"[Tt]imed out|[Tt]imeout|timed-out")


def test_control_the_default_group_times_out_while_rank0_works():
    """Without the cache's group: rank 1 waits for rank 0 on the default group and fails
    after its SHORT_S timeout (so the short timeout of the tests below really bites)."""
    rcs, outs = run_torch_ranks("default-group")
    assert rcs[1] != 0 and TIMED_OUT.search(outs[1]), f"rank 1 did not time out:\n{outs[1][-3000:]}"


def test_cache_collectives_outlast_the_default_group_timeout():
    t0 = time.monotonic()
    rcs, outs = run_torch_ranks("cache")
    for r, (rc, out) in enumerate(zip(rcs, outs)):
        assert rc == 0 and "RESULT 42" in out, f"rank {r} exited with {rc}:\n{out[-3000:]}"
    assert time.monotonic() - t0 >= SLOW_S


def test_cache_timeout_is_the_groups_own_and_configurable():
    """FAIRSEQ_ARCH_CACHE_TIMEOUT sets the cache group's timeout: shorter than rank 0's work,
    rank 1 times out in the cache's collective (and the default group's roomy timeout
    does not matter)."""
    rcs, outs = run_torch_ranks("cache", slow_s=SLOW_S, short_s=600, env={cache_dist.TIMEOUT_ENV: str(SHORT_S)})
    assert rcs[1] != 0 and TIMED_OUT.search(outs[1]), f"rank 1 did not time out:\n{outs[1][-3000:]}"


@pytest.mark.fast
def test_cache_timeout_setting(monkeypatch):
    monkeypatch.delenv(cache_dist.TIMEOUT_ENV, raising=False)
    assert cache_dist.cache_timeout() == cache_dist.CACHE_TIMEOUT == timedelta(hours=6)
    monkeypatch.setenv(cache_dist.TIMEOUT_ENV, "90")
    assert cache_dist.cache_timeout() == timedelta(seconds=90)
    for bad in ("0", "-5", "six hours"):
        monkeypatch.setenv(cache_dist.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=cache_dist.TIMEOUT_ENV):
            cache_dist.cache_timeout()


@pytest.mark.fast
def test_single_process_needs_no_group():
    assert cache_dist.cache_group() is None
    assert cache_dist.on_rank0(lambda: 7) == 7
    assert cache_dist.all_gather_object("x") == ["x"]


# fairseq-train with its default process group's timeout cut to SHORT_S once every rank is
# up (as NCCL's 10 minutes would cut a real run); fairseq's own collectives run on groups
# of its own (30 minutes on gloo).
SHORT_TIMEOUT_TRAIN = """
import os, sys
from datetime import timedelta
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

real_init = dist.init_process_group

def init_then_cut_the_timeout(*args, **kwargs):
    real_init(*args, **kwargs)
    dist.barrier()
    c10d._set_pg_timeout(timedelta(seconds=float(os.environ["ARCH_TEST_DEFAULT_PG_TIMEOUT"])))
    print("default process group timeout cut to", os.environ["ARCH_TEST_DEFAULT_PG_TIMEOUT"], "s", flush=True)

dist.init_process_group = init_then_cut_the_timeout
from fairseq_cli.train import cli_main
sys.argv = ["fairseq-train"] + sys.argv[1:]
cli_main()
"""


@pytest.fixture(scope="module")
def data_dir(toy_data):
    return toy_data(300, 20)


def test_slow_finalisation_outlasts_the_default_group_timeout(data_dir, tmp_path, monkeypatch):
    """Two fairseq-train ranks; rank 0 finalises epoch 1's refresh (at epoch 2's start)
    2 x SLOW_S seconds longer than usual (FAIRSEQ_ARCH_SLEEP), past the default group's
    SHORT_S: rank 1 waits in the cache's collective, and training finishes."""
    save = str(tmp_path / "ckpt")
    args = train_args(data_dir, save, ["--max-epoch", "2"])
    args = [sys.executable, "-c", SHORT_TIMEOUT_TRAIN, *args[1:]]
    monkeypatch.setattr(test_distributed, "ENV", dict(test_distributed.ENV, ARCH_TEST_DEFAULT_PG_TIMEOUT=str(SHORT_S),
                                                      FAIRSEQ_ARCH_SLEEP=f"finalize@1:{SLOW_S}"))
    outs = run_ranks(args, 2)
    assert all("default process group timeout cut to" in o for o in outs), outs[0][-3000:]
    assert outs[0].count("FAIRSEQ_ARCH_SLEEP: sleeping") == 2, outs[0][-3000:]  # one per side
    assert "generation of epoch 1 complete" in outs[0], outs[0][-3000:]
    assert [c[0] for c in cache_counts(outs[0])] == ["001", "002"], outs[0][-3000:]
