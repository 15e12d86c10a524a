#!/usr/bin/env python3
"""Train and evaluate one row of Tables 2-3 with several seeds, and report the mean and standard
deviation of the test BLEU over the seeds (Table 2 reports 3 seeds' mean and std).

    python scripts/recipes/seeds.py DATASET [--direction SRC-TGT] [--adv-method M] [--seeds 1,2,3]
        [--data DIR] [--smoke] [--report-only] [--print-args] [-- EXTRA fairseq-train ARGS]

For each seed N: scripts/recipes/train.py DATASET --seed N (its own save dir
checkpoints/DATASET-DIRECTION-METHOD-seedN; a rerun resumes each seed where it stopped and skips
finished ones), then scripts/recipes/evaluate.py DATASET --seed N (Table 7 decoding of checkpoint_best.pt).
Then one line per seed and mean +- std (sample standard deviation, n-1) of each BLEU, written to
checkpoints/DATASET-DIRECTION-METHOD-seeds.json. Seeds whose test hypotheses are identical are reported:
two "seeds" that are one model make the std meaningless. --report-only skips training and evaluation and
reports the scores already there. --print-args prints the commands (JSON) without running them.
--adv-method is fairseq's name (the plugin's --adv-method); the old spelling --method M (e.g. --method none)
is still accepted but deprecated (a note is printed).
"""

import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train import METHODS, add_flag, default_save_dir, recipe_cli, recipe_target  # noqa: E402

METRICS = ["bleu", "bleu_compound_split", "sacrebleu"]


def mean_std(xs):
    """(mean, sample standard deviation with n-1; 0 for one value)."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def report(save_dirs, out=sys.stdout):
    """Aggregate SAVE_DIR/eval-test/scores.json of each seed: {"seeds": {...}, "mean": ..., "std": ...,
    "identical": [[seed, seed], ...], "missing": [...]}."""
    rows, hyps, missing = {}, {}, []
    for seed, d in save_dirs.items():
        path = os.path.join(d, "eval-test", "scores.json")
        if not os.path.exists(path):
            missing.append(seed)
            continue
        rows[seed] = json.load(open(path))
        tgt = rows[seed]["direction"].split("-")[1]
        hp = os.path.join(d, "eval-test", f"hyp.tok.{tgt}")
        hyps[seed] = open(hp, encoding="utf-8").read() if os.path.exists(hp) else None
    seeds = sorted(rows)
    identical = [[a, b] for i, a in enumerate(seeds) for b in seeds[i + 1:]
                 if hyps[a] is not None and hyps[a] == hyps[b]]
    result = {"seeds": {str(k): {m: rows[k].get(m) for m in METRICS if m in rows[k]} for k in seeds},
              "missing": missing, "identical": identical, "mean": {}, "std": {}, "n": len(seeds)}
    for m in METRICS:
        xs = [rows[k][m] for k in seeds if m in rows[k]]
        if xs:
            result["mean"][m], result["std"][m] = (round(v, 2) for v in mean_std(xs))
    for k in seeds:
        print(f"seed {k}: " + "  ".join(f"{m} {rows[k][m]:.2f}" for m in METRICS if m in rows[k]), file=out)
    if seeds:
        print(f"mean +- std over {len(seeds)} seed(s) {','.join(map(str, seeds))}: " + "  ".join(
            f"{m} {result['mean'][m]:.2f} +- {result['std'][m]:.2f}" for m in result["mean"]), file=out)
    for a, b in identical:
        print(f"seeds: WARNING: seeds {a} and {b} gave identical test hypotheses: one model, not two runs",
              file=out)
    if missing:
        print(f"seeds: no scores for seed(s) {','.join(map(str, missing))}", file=out)
    return result


def main(argv=None):
    ap, argv, extra = recipe_cli(__doc__, argv)
    ap.add_argument("--direction", help="SRC-TGT (default: the first of the dataset's directions)")
    add_flag(ap, "--adv-method", "--method", dest="method", default="arch", choices=METHODS,
             help="regularizer, fairseq's --adv-method (default arch; none = the Transformer rows)")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument("--data", help="prepared dir (default data/DATASET, data/DATASET-smoke with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs on a smoke data dir (CI)")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the scores already there")
    ap.add_argument("--print-args", action="store_true", help="print the commands as JSON and exit")
    a = ap.parse_args(argv)
    _, smoke, direction = recipe_target(ap, a)
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error("--seeds takes integers, e.g. 1,2,3")
    if len(set(seeds)) != len(seeds) or not seeds:
        ap.error("--seeds: give distinct seeds")
    common = [a.dataset, "--direction", direction, "--adv-method", a.method] + (["--data", a.data] if a.data else []) \
        + (["--smoke"] if smoke else [])
    py = sys.executable
    cmds = []
    for seed in seeds:
        cmds.append([py, os.path.join(HERE, "train.py"), *common, "--seed", str(seed), "--no-progress",
                     *(["--", *extra] if extra else [])])
        cmds.append([py, os.path.join(HERE, "evaluate.py"), *common, "--seed", str(seed)])
    save_dirs = {seed: default_save_dir(a.dataset, direction, a.method, seed, smoke) for seed in seeds}
    if a.print_args:
        print(json.dumps({"commands": cmds, "save_dirs": save_dirs}))
        return 0
    if not a.report_only:
        for seed, (train_cmd, eval_cmd) in zip(seeds, zip(cmds[::2], cmds[1::2])):
            print(f"seeds: seed {seed} -> {save_dirs[seed]}", flush=True)
            for cmd in (train_cmd, eval_cmd):
                rc = subprocess.call(cmd)
                if rc != 0:
                    print(f"seeds: {os.path.basename(cmd[1])} failed for seed {seed} (exit {rc})", file=sys.stderr)
                    return rc
    result = report(save_dirs)
    base = default_save_dir(a.dataset, direction, a.method, 0, smoke).replace("-seed0", "-seeds")
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({"dataset": a.dataset, "direction": direction, "method": a.method, **result}, f, indent=1)
    print(f"seeds: written {base}.json")
    return 1 if result["missing"] or result["identical"] else 0


if __name__ == "__main__":
    sys.exit(main())
