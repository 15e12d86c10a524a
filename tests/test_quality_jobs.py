"""The quality benchmark's --jobs and --device (benchmarks/quality_jobs.py): several runs at once,
results handled in the caller's thread, the pretrained-neighbour run after its seed's none, a
failure that stops new starts but keeps the runs already going; and GPU runs as a suite of
their own. The end-to-end --jobs 2 run is in test_bench's quality test."""

import threading
import time

import pytest

from benchmarks import quality, quality_jobs

pytestmark = pytest.mark.fast


def test_runs_go_at_once_and_finish_in_the_callers_thread():
    caller, lock, active, peak, got = threading.get_ident(), threading.Lock(), [0], [0], []

    def start(name, seed):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return {"name": name}

    def finished(name, seed, result):
        assert threading.get_ident() == caller and result == {"name": name}
        got.append((name, seed))

    runs = [("none", 1), ("arch", 1), ("none", 2), ("arch", 2)]
    quality_jobs.run_all(runs, 2, start, finished)
    assert sorted(got) == sorted(runs) and peak[0] == 2


def test_a_run_waits_for_the_run_it_reads():
    order = []

    def start(name, seed):
        time.sleep(0.3 if name == "none" else 0.0)
        order.append((name, seed))
        return {}

    after = {("arch-pretrained", 1): ("none", 1)}.get
    quality_jobs.run_all([("none", 1), ("arch-pretrained", 1), ("arch", 1)], 3, start, lambda *a: None, after)
    assert order.index(("none", 1)) < order.index(("arch-pretrained", 1))
    assert order[0] == ("arch", 1)  # the others do not wait


def test_a_failure_stops_new_starts_keeps_the_running_ones_and_is_raised():
    started, got = [], []

    def start(name, seed):
        started.append(name)
        if name == "bad":
            raise RuntimeError("fairseq-train failed")
        time.sleep(0.3)
        return {}

    with pytest.raises(RuntimeError, match="fairseq-train failed"):
        quality_jobs.run_all([("slow", 1), ("bad", 1), ("later", 1), ("last", 1)], 2, start,
                             lambda n, s, r: got.append(n))
    # started before the failure was seen: finished and handed over ("later" may have taken the
    # failed run's thread at once); the run queued behind them never starts
    assert "slow" in got and set(got) <= {"slow", "later"}
    assert "last" not in started


def test_placement_flags_threads_and_suite():
    cpu = quality_jobs.Placement()
    assert cpu.flags == ["--cpu"] and cpu.name() == "cpu"
    assert quality_jobs.Placement("cuda").flags == []
    assert quality_jobs.Placement("cpu", 3).env({"A": "1"}) == {"A": "1", "PYTHONWARNINGS": "ignore",
                                                                "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert "OMP_NUM_THREADS" not in cpu.env({})
    with pytest.raises(SystemExit, match="--device 'tpu'"):
        quality_jobs.Placement("tpu")
    assert quality_jobs.suite_for("quality_v3", "cpu") == "quality_v3"
    assert quality_jobs.suite_for("quality_v3", "cuda") == "quality_v3-cuda"
    cmd = quality.train_cmd("data", "save", [], 1, {"model": quality.MODEL_TEXT, "dropout": 0.1, "lr": 1e-3,
                                                    "warmup": 10, "max_tokens": 100, "epochs": 2}, device_flags=[])
    assert "--cpu" not in cmd


def test_threads_per_job(monkeypatch):
    class Args:
        jobs, device = 2, "cpu"

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(quality_jobs.os, "cpu_count", lambda: 16)
    assert quality_jobs.placement_of(Args).threads == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins
    assert quality_jobs.placement_of(Args).threads is None
    Args.jobs = 0
    with pytest.raises(SystemExit, match="--jobs 0"):
        quality_jobs.placement_of(Args)


def test_overfitting_rule_is_judged_per_none_run():
    runs = [{"variant": "none", "seed": 1, "best_epoch": 45, "epochs_run": 60},
            {"variant": "none", "seed": 2, "best_epoch": 58, "epochs_run": 60},
            {"variant": "arch", "seed": 1, "best_epoch": 60, "epochs_run": 60}]
    line = quality.overfitting_lines(runs)[0]
    assert "s1: best epoch 45 of 60 (met)" in line and "s2: best epoch 58 of 60 (NOT met, after 45)" in line
    assert line.endswith("Runs whose best validation epoch is their last: arch s1.")
    assert quality.overfitting_lines(runs[2:]) == []


def test_cuda_without_a_gpu_is_refused_before_any_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quality, "SUITE", quality.SUITE)  # main() sets the module's suite: restored after
    monkeypatch.setattr(quality, "data_bin", lambda *a: pytest.fail("prepared data for a run that cannot start"))

    class Args:
        device, jobs, suite, methods, seeds, multi_seed_methods = "cuda", 2, "quality_v3", "none", "1", "none"
        train_pairs, valid_sentences, epochs, dropout, lr, warmup, max_tokens = 100, 10, 2, 0.1, 1e-3, 10, 100
        out, work = str(tmp_path / "out"), str(tmp_path / "work")

    with pytest.raises(SystemExit, match="--device cuda, but torch sees no GPU here"):
        quality.main(Args)
    assert quality.SUITE == "quality_v3-cuda"
