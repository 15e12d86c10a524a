"""The benchmarks run and report (they are measurements, not timed tests: nothing
here asserts a speed). Tiny sizes; the real numbers are in benchmarks/results.
What is asserted is that the reports are the measurements: ratios and predictions
recomputed from the timings the benchmark recorded and printed, and its table of
forward/backward counts against the counts the criterion logs when it runs."""

import json
import os
import re
import sys

import pytest

from . import utils

# benchmarks/common.py calls fairseq-preprocess by name: find this environment's first
ENV = dict(os.environ, PYTHONWARNINGS="ignore",
           PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def bench(tmp_path, *args):
    res = utils.run([sys.executable, "-m", "benchmarks", *args, "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work")], timeout=1800, cwd=utils.REPO, env=ENV,
                    capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_cost_benchmark_reports_every_method_and_the_goals(tmp_path):
    utils.require_shared("multi30k", "tok")
    out = bench(tmp_path, "cost", "--sentences", "150", "--rounds", "1", "--skip-rss", "--tc", "3")
    res = json.load(open(tmp_path / "out" / "cost.json"))
    rows = res["methods"]
    assert set(rows) == {"none", "r3f", "smart", "freelb", "arch-refresh", "arch-reuse", "arch (amortised)"}
    steps, tc = res["config"]["steps"], res["config"]["tc"]  # S: the benchmark's default
    assert tc == 3
    sec = {m: r["seconds"] for m, r in rows.items()}
    assert all(s > 0 for s in sec.values()), sec
    # every ratio is the ratio of the measured seconds
    for m, r in rows.items():
        assert r["vs_none"] == pytest.approx(sec[m] / sec["none"]), m
        assert r["vs_smart"] == pytest.approx(sec[m] / sec["smart"]), m
    assert sec["arch (amortised)"] == pytest.approx((sec["arch-refresh"] + (tc - 1) * sec["arch-reuse"]) / tc)
    # predictions: the counts priced at the measured forward, backward and Adam step
    t_f, t_b, t_o = res["forward_s"], res["backward_s"], res["optimizer_s"]
    assert min(t_f, t_b, t_o) > 0
    for m, r in rows.items():
        f, b = r["fwd_bwd"]
        assert r["predicted_vs_none"] == pytest.approx((f * t_f + b * t_b + t_o) / (t_f + t_b + t_o)), m
    assert rows["smart"]["fwd_bwd"] == [steps + 2, steps + 1] and rows["arch-reuse"]["fwd_bwd"] == [2, 1]
    # the printed table is these measurements (3 decimals for seconds, 2 for ratios)
    printed = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in rows:
            printed[cells[0]] = (float(cells[1]), float(cells[2]), float(cells[3]))
    assert set(printed) == set(rows), out[-3000:]
    for m, (s, x_none, x_smart) in printed.items():
        assert s == pytest.approx(sec[m], abs=5e-4) and x_none == pytest.approx(rows[m]["vs_none"], abs=5e-3), m
        assert x_smart == pytest.approx(rows[m]["vs_smart"], abs=5e-3), m
    share = res["cache_read_rebuild_share_of_reuse_update"]
    assert 0 < share < 1
    goal = re.search(r"\| ARCH amortised <= 0.5 x smart \| ([0-9.]+) \| (yes|NO) \|", out)
    assert goal, out[-3000:]
    assert float(goal.group(1)) == pytest.approx(rows["arch (amortised)"]["vs_smart"], abs=5e-4)
    assert goal.group(2) == ("yes" if rows["arch (amortised)"]["vs_smart"] <= 0.5 else "NO")
    assert os.path.exists(tmp_path / "out" / "cost.png")  # plots run after cost


def test_cost_benchmark_counts_are_what_the_criterion_logs(small_toy, tmp_path):
    """benchmarks/cost.py prices each method by a table of forward/backward counts:
    it must be the count the criterion itself logs when it runs each method."""
    from benchmarks import cost
    from fairseq_arch.criterions.adversarial_label_smoothed_cross_entropy import (
        AdversarialLabelSmoothedCrossEntropyCriterion as Crit,
    )

    steps = 2
    _, task, model, arch = utils.build_components(
        small_toy, ["--adv-steps", str(steps), "--arch-refresh-interval", "2"], save_dir=str(tmp_path))
    batches = utils.batches(task)
    task.begin_epoch(1, model)
    model.train()
    logged = {m: Crit(task, False, 0.1, adv_method=m, adv_steps=steps)(model, batches[0])[2]
              for m in ("none", "r3f", "smart", "freelb")}
    refresh = [arch(model, b)[2] for b in batches]  # fills the cache for the reuse epoch
    logged["arch-refresh"] = refresh[0]
    task.begin_epoch(2, model)
    logged["arch-reuse"] = arch(model, batches[0])[2]
    assert set(logged) == set(cost.COUNTS)
    for m, log in logged.items():
        ours, _ = cost._counts(m, steps)
        assert tuple(ours) == (log["adv_fwd"], log["adv_bwd"]), f"{m}: table {ours}, logged {log['adv_fwd'], log['adv_bwd']}"


def test_scale_benchmark_checks_faiss_against_brute_force(tmp_path):
    bench(tmp_path, "scale", "--scales", "2000")
    row = json.load(open(tmp_path / "out" / "scale.json"))["rows"][0]
    assert row["sentences"] == 2000 and row["cached"] == 200
    assert row["faiss_vs_brute_top1_similarity_agreement"] == 1.0
    assert row["cache_disk_bytes"] > 0 and set(row["search_s"]) == {"source", "target"}
