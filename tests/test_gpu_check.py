"""scripts/gpu-check.sh in its CPU smoke mode: the same script that runs on a lent GPU,
tiny and fp32 only, through the shell entry point. Its lines must say ok for the checks
a CPU can run and skip for the rest, and a broken check must turn into a FAIL line and a
non-zero exit status (the run goes on to the next check)."""

import os
import re

from . import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(tmp_path, *args, env=None):
    p = utils.run(["bash", os.path.join(REPO, "scripts", "gpu-check.sh"), "--smoke", "--work", str(tmp_path), *args],
                  capture_output=True, text=True, timeout=900,
                  env=dict(os.environ, ARCH_SKIP_INSTALL="1", **(env or {})))
    lines = [l for l in p.stdout.splitlines() if l.startswith("[gpu-check]")]
    status = {m.group(1): m.group(2) for m in (re.match(r"\[gpu-check\] (\S+)\s+(ok|FAIL|skip)\s", l) for l in lines) if m}
    return p, lines, status


def test_smoke_runs_every_cpu_check(tmp_path):
    utils.require_shared("multi30k", "tok")
    p, lines, status = _check(tmp_path, "--only", "device,search,train,resume,ddp", "--precisions", "fp32,amp")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert status == {"device": "ok", "search": "ok", "data": "ok", "train-fp32": "ok", "train-amp": "skip", "resume": "ok",
                      "ddp": "skip", "all": "ok"}, lines
    train = next(l for l in lines if "train-fp32" in l)
    moved = float(re.search(r"ascent moved delta ([0-9.]+) x eps", train).group(1))
    assert moved > 0.05, train
    assert "reuse epoch ran" in train and "skipped 0" in train
    # fairseq's log went to the file, not the console
    assert "fairseq_cli.train" not in p.stdout and os.path.getsize(tmp_path / "gpu-check.log") > 0


def test_a_failing_check_fails_the_run(tmp_path):
    """Multi30k pointed at an empty folder: the train check fails, the others still report."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    p, lines, status = _check(tmp_path / "w", "--only", "device,train", "--precisions", "fp32",
                              env={"ARCH_MULTI30K": str(empty)})
    assert p.returncode != 0
    assert status.get("device") == "ok", lines


def test_smoke_refresh_wmt_ops_and_peak_chunks(tmp_path):
    """The issue-22 checks, scaled down on the CPU: the refresh finalisation through the cache
    code (every stage timed), the plugin's own op counts per update, and the peak memory
    with --adv-chunks."""
    utils.require_shared("multi30k", "tok")
    p, lines, status = _check(tmp_path, "--only", "refresh-wmt,ops,peak-chunks")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert status == {"refresh-wmt": "ok", "ops": "ok", "peak-chunks": "ok", "all": "ok"}, lines
    peak = next(l for l in lines if "[gpu-check] peak-chunks" in l)
    for method in ("r3f", "smart"):
        ratios = [float(r) for r in re.search(rf"{method} c1 ([0-9.]+), c2 ([0-9.]+), c4 ([0-9.]+)", peak).groups()]
        assert ratios[0] > 1.0 and ratios[2] < ratios[0], (method, peak)
    refresh = next(l for l in lines if "refresh-wmt" in l)
    assert "20,000 pairs (2,000 cached)" in refresh, refresh
    for stage in ("merge", "means", "sizes", "vectors", "search", "checksums"):
        assert re.search(rf"{stage} [0-9.]+s", refresh), (stage, refresh)
    ops = next(l for l in lines if "[gpu-check] ops" in l)
    reads, per_side = map(int, re.search(r"cache reads (\d+) \((\d+) per side\)", ops).groups())
    assert reads > 0 and per_side > 0, ops
    assert int(re.search(r"(\d+) per ascent step", ops).group(1)) > 0, ops
    assert not [d for d in os.listdir(tmp_path) if d.startswith("arch-refresh-")], "cache dir left behind"
