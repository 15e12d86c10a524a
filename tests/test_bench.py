"""The benchmarks run and report (they are measurements, not timed tests: nothing
here asserts a speed). Tiny sizes; the real numbers are in benchmarks/results."""

import json
import os
import subprocess
import sys

import pytest

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore")
MULTI30K = os.path.join(utils.SHARED_DATA, "multi30k", "tok")


def bench(tmp_path, *args):
    res = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")], cwd=utils.REPO, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="../shared/data/multi30k not present")
def test_cost_benchmark_reports_every_method_and_the_goals(tmp_path):
    out = bench(tmp_path, "cost", "--sentences", "150", "--rounds", "1", "--skip-rss", "--tc", "3")
    res = json.load(open(tmp_path / "out" / "cost.json"))
    assert set(res["methods"]) == {"none", "r3f", "smart", "freelb", "arch-refresh", "arch-reuse", "arch (amortised)"}
    assert res["methods"]["smart"]["fwd_bwd"] == [5, 4] and res["methods"]["arch-reuse"]["fwd_bwd"] == [2, 1]
    assert 0 < res["cache_read_rebuild_share_of_reuse_update"] < 1
    assert "| ARCH amortised <= 0.5 x smart |" in out
    assert os.path.exists(tmp_path / "out" / "cost.png")  # plots run after cost


def test_scale_benchmark_checks_faiss_against_brute_force(tmp_path):
    bench(tmp_path, "scale", "--scales", "2000")
    row = json.load(open(tmp_path / "out" / "scale.json"))["rows"][0]
    assert row["sentences"] == 2000 and row["cached"] == 200
    assert row["faiss_vs_brute_top1_similarity_agreement"] == 1.0
    assert row["cache_disk_bytes"] > 0 and set(row["search_s"]) == {"source", "target"}
