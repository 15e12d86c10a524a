"""How far the cost benchmark's goal ratios move from one run of it to the next.

Every ``python -m benchmarks cost`` run keeps its timings in <out>/cost_runs/ (:func:`archive`).
``python -m benchmarks cost-spread`` reads them all and writes <out>/cost_spread.md|json: for
each run, the ratios the cost goals are judged on, then their median, their range and in how many
runs each goal is met. With a quality suite's JSON
(``--suite``, e.g. quality_v3) it also prices whole quality runs from each cost run: the cost
goal of issue 19 compares one run of the best ARCH configuration with one run of R-Drop.

One cost run interleaves the methods, so drift inside it cancels. Between runs on the same
idle machine every method's time moves by up to 20% and the ratios by a few points, so a goal
met by less than that is met in some runs and missed in others; the report counts them.
"""

import glob
import json
import os
import statistics
import time
from typing import Dict, List, Optional

from . import common
from .quality import derived_seconds, suite_runs

# (label, numerator row, denominator row, the goal's limit or None) of one cost run's rows
UPDATE_RATIOS = (
    ("arch reuse / r3f", "arch-reuse", "r3f", 1.05),
    ("arch amortised / smart", "arch (amortised)", "smart", 0.5),
    ("arch-rdrop reuse / rdrop", "arch-rdrop-reuse", "rdrop", None),
    ("arch-rdrop amortised / rdrop", "arch-rdrop (amortised)", "rdrop", None),
)
# (label, variant, against, limit): mean cost-derived seconds of the quality suite's runs
RUN_RATIOS = (
    ("arch-rdrop run / rdrop run", "arch-rdrop", "rdrop", 1.1),
    ("arch-w2.5 run / rdrop run", "arch-w2.5", "rdrop", None),
)
RUNS_DIR = "cost_runs"


def archive(out_dir: str, res: dict) -> str:
    """Write a cost run's timings ``res`` (cost.measure's result) to <out_dir>/cost_runs/,
    named by the minute they were written, with the machine."""
    res = dict(res, machine=common.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    os.makedirs(os.path.join(out_dir, RUNS_DIR), exist_ok=True)
    path = os.path.join(out_dir, RUNS_DIR, f"cost-{res['date'].replace(' ', '-').replace(':', '')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def update_ratios(cost: dict) -> Dict[str, Optional[float]]:
    """label -> ratio of the two rows' seconds per update (None where a row is missing)."""
    rows = cost["methods"]
    return {label: rows[a]["seconds"] / rows[b]["seconds"] if a in rows and b in rows else None
            for label, a, b, _ in UPDATE_RATIOS}


def run_ratios(cost: dict, runs: List[dict]) -> Dict[str, Optional[float]]:
    """label -> mean cost-derived seconds of a quality run of one variant over the other's,
    priced from this cost run (None where a variant has no run or a row is missing)."""
    def mean_seconds(variant):
        secs = [derived_seconds(r["method"], r["per_epoch"], cost)[-1] for r in runs
                if r["variant"] == variant and r["per_epoch"]]
        return statistics.mean(secs) if secs and None not in secs else None

    out = {}
    for label, a, b, _ in RUN_RATIOS:
        sa, sb = mean_seconds(a), mean_seconds(b)
        out[label] = sa / sb if sa is not None and sb else None
    return out


def spread(values: List[Optional[float]], limit: Optional[float]) -> dict:
    """Median, range and (with a limit) the runs at or under it, over the runs that have a value."""
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0}
    out = {"n": len(got), "median": statistics.median(got), "min": min(got), "max": max(got)}
    if limit is not None:
        out["limit"], out["met"] = limit, sum(v <= limit for v in got)
    return out


def measure(paths: List[str], runs: List[dict]) -> dict:
    table = []
    for path in paths:
        with open(path) as f:
            cost = json.load(f)
        rows = cost["methods"]
        ratios = dict(update_ratios(cost), **(run_ratios(cost, runs) if runs else {}))
        table.append({"file": os.path.basename(path), "date": cost.get("date"), "machine": cost.get("machine"),
                      "none_s": rows["none"]["seconds"], "rdrop_s": rows.get("rdrop", {}).get("seconds"),
                      "ratios": ratios})
    labels = [(g[0], g[-1]) for g in UPDATE_RATIOS] + ([(g[0], g[-1]) for g in RUN_RATIOS] if runs else [])
    return {"runs": table, "spread": {label: spread([t["ratios"][label] for t in table], limit)
                                      for label, limit in labels}}


def _cell(v):
    return "-" if v is None else f"{v:.3f}"


def markdown(res: dict, priced_from: str) -> str:
    """``priced_from``: where the run prices' quality runs come from, or why there are none."""
    labels = list(res["spread"])
    head = ["cost run", "none s/update", "rdrop s/update", *labels]
    lines = [f"### Cost goals across {len(res['runs'])} runs of the cost benchmark", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in res["runs"]:
        cells = [t["date"] or t["file"], _cell(t["none_s"]), _cell(t["rdrop_s"]),
                 *(_cell(t["ratios"][label]) for label in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio | median | range | goal | runs meeting it |", "|---|---|---|---|---|"]
    for label, s in res["spread"].items():
        if not s["n"]:
            lines.append(f"| {label} | - | - | - | no run has it |")
            continue
        goal = f"<= {s['limit']}" if "limit" in s else "-"
        met = f"{s['met']} of {s['n']}" if "limit" in s else "-"
        lines.append(f"| {label} | {s['median']:.3f} | {s['min']:.3f}-{s['max']:.3f} | {goal} | {met} |")
    lines += ["", "Each row: one `python -m benchmarks cost` run (its cost.json in cost_runs/), the methods "
              "interleaved within it. Run prices: the mean cost-derived seconds of one variant's quality runs over "
              f"the other's, priced from that cost run's rows; the runs: {priced_from}."]
    return "\n".join(lines)


def main(args):
    paths = sorted(glob.glob(os.path.join(args.out, RUNS_DIR, "cost-*.json")))
    if not paths:
        raise SystemExit(f"cost-spread: no cost runs in {os.path.join(args.out, RUNS_DIR)} "
                         "(each `python -m benchmarks cost` run leaves one)")
    suite_json = os.path.join(args.out, f"{args.suite}.json")
    runs = suite_runs(args.out, args.suite) if os.path.exists(suite_json) else []
    res = measure(paths, runs)
    priced_from = f"{args.suite}.json" if runs else f"none ({suite_json} not found)"
    common.write_report(args.out, "cost_spread", res, markdown(res, priced_from))
    return res
