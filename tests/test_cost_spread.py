"""benchmarks/cost_spread.py: the cost goals' ratios over several archived cost runs, on
hand-made cost.json rows and quality runs (a refresh epoch logs 5 forwards per batch, a reuse
epoch 2), through the public functions and the `python -m benchmarks cost-spread` entry."""

import json
import os
import sys

import pytest

from benchmarks import cost_spread

from . import utils

def cost(none, r3f, smart, rdrop, arch_reuse, arch_amort, ar_refresh, ar_reuse, date="2026-12-07 10:00"):
    rows = {"none": none, "r3f": r3f, "smart": smart, "rdrop": rdrop, "arch-reuse": arch_reuse,
            "arch (amortised)": arch_amort, "arch-rdrop-refresh": ar_refresh, "arch-rdrop-reuse": ar_reuse,
            "arch-rdrop (amortised)": (ar_refresh + 14 * ar_reuse) / 15}
    return {"methods": {k: {"seconds": v} for k, v in rows.items()}, "date": date}


def run(variant, method, kinds):
    """A quality run whose epochs each did 10 updates; kinds: 'refresh' / 'reuse' / 'plain'."""
    fwd = {"refresh": 5.0, "reuse": 2.0, "plain": 2.0}
    return {"variant": variant, "method": method,
            "per_epoch": [{"updates": 10 * (i + 1), "fwd_per_batch": fwd[k]} for i, k in enumerate(kinds)]}


RUNS = [run("rdrop", "rdrop", ["plain"] * 4), run("arch-rdrop", "arch-rdrop", ["refresh", "reuse", "reuse", "reuse"])]


@pytest.mark.fast
def test_update_ratios_are_the_rows_ratios_and_a_missing_row_is_none():
    c = cost(0.5, 1.0, 2.0, 1.5, 0.9, 0.95, 3.0, 1.5)
    r = cost_spread.update_ratios(c)
    assert r["arch reuse / r3f"] == pytest.approx(0.9)
    assert r["arch amortised / smart"] == pytest.approx(0.475)
    assert r["arch-rdrop reuse / rdrop"] == pytest.approx(1.0)
    assert r["arch-rdrop amortised / rdrop"] == pytest.approx((3.0 + 14 * 1.5) / 15 / 1.5)
    del c["methods"]["r3f"]
    assert cost_spread.update_ratios(c)["arch reuse / r3f"] is None


@pytest.mark.fast
def test_run_ratio_prices_each_epoch_at_its_row():
    c = cost(0.5, 1.0, 2.0, 1.5, 0.9, 0.95, 3.0, 1.5)
    # arch-rdrop: one refresh epoch (10 x 3.0) and three reuse epochs (30 x 1.5); rdrop 40 x 1.5
    assert cost_spread.run_ratios(c, RUNS)["arch-rdrop run / rdrop run"] == pytest.approx((30 + 45) / 60)
    assert cost_spread.run_ratios(c, RUNS)["arch-w2.5 run / rdrop run"] is None  # no such run


@pytest.mark.fast
def test_spread_counts_the_runs_under_the_limit():
    s = cost_spread.spread([1.03, None, 1.12, 1.08], 1.1)
    assert s == {"n": 3, "median": 1.08, "min": 1.03, "max": 1.12, "limit": 1.1, "met": 2}
    assert cost_spread.spread([None], 1.1) == {"n": 0}
    assert "met" not in cost_spread.spread([1.0], None)


def test_cost_spread_command_reads_every_archived_run(tmp_path):
    out = tmp_path / "out"
    (out / "cost_runs").mkdir(parents=True)
    for i, (rdrop, ar_reuse) in enumerate([(1.5, 1.5), (1.6, 1.9)]):  # the second: arch-rdrop over 1.1x
        with open(out / "cost_runs" / f"cost-2026-12-07-10{i}0.json", "w") as f:
            json.dump(cost(0.5, 1.0, 2.0, rdrop, 0.9, 0.95, 3.0, ar_reuse, date=f"2026-12-07 10:{i}0"), f)
    with open(out / "quality_v3.json", "w") as f:
        json.dump({"runs": RUNS}, f)
    res = utils.run([sys.executable, "-m", "benchmarks", "cost-spread", "--suite", "quality_v3", "--out", str(out),
                     "--work", str(tmp_path / "work")], cwd=utils.REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    md = open(out / "cost_spread.md").read()
    assert "Cost goals across 2 runs" in md and "| 2026-12-07 10:00 |" in md and "| 2026-12-07 10:10 |" in md
    # run ratios: 75/60 = 1.25 and (30 + 30 x 1.9) / (40 x 1.6) = 1.359 -> neither meets 1.1
    assert "| arch-rdrop run / rdrop run | 1.305 | 1.250-1.359 | <= 1.1 | 0 of 2 |" in md, md
    assert "| arch reuse / r3f | 0.900 | 0.900-0.900 | <= 1.05 | 2 of 2 |" in md, md
    spread = json.load(open(out / "cost_spread.json"))["spread"]
    assert spread["arch-rdrop run / rdrop run"]["met"] == 0


@pytest.mark.fast
def test_suite_runs_read_the_per_epoch_log_a_report_left_in_each_runs_own_json(tmp_path):
    from benchmarks.quality import suite_runs

    (tmp_path / "quality_v3").mkdir()
    for seed, r in enumerate(RUNS, 1):
        with open(tmp_path / "quality_v3" / f"{r['variant']}-s{seed}.json", "w") as f:
            json.dump(dict(r, seed=seed), f)
    with open(tmp_path / "quality_v3.json", "w") as f:  # the report: runs without their per-epoch log
        json.dump({"runs": [{"variant": r["variant"], "method": r["method"], "seed": s} for s, r in enumerate(RUNS, 1)]}, f)
    c = cost(0.5, 1.0, 2.0, 1.5, 0.9, 0.95, 3.0, 1.5)
    runs = suite_runs(str(tmp_path), "quality_v3")
    assert [r["per_epoch"] for r in runs] == [r["per_epoch"] for r in RUNS]
    assert cost_spread.run_ratios(c, runs)["arch-rdrop run / rdrop run"] == pytest.approx((30 + 45) / 60)


def test_cost_spread_without_archived_runs_says_so(tmp_path):
    res = utils.run([sys.executable, "-m", "benchmarks", "cost-spread", "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work")], cwd=utils.REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "no cost runs in" in res.stderr and "cost_runs" in res.stderr


@pytest.mark.fast
def test_archive_names_the_run_by_its_minute(tmp_path):
    path = cost_spread.archive(str(tmp_path), cost(0.5, 1.0, 2.0, 1.5, 0.9, 0.95, 3.0, 1.5))
    saved = json.load(open(path))
    assert os.path.dirname(path) == str(tmp_path / "cost_runs")
    assert os.path.basename(path) == "cost-" + saved["date"].replace(" ", "-").replace(":", "") + ".json"
    assert saved["methods"]["rdrop"]["seconds"] == 1.5 and saved["machine"]
