"""python -m benchmarks {cost,scale,quality,plots,all} [options] — see README, "Benchmarks"."""

import argparse
import logging
import os
import warnings


def main():
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("what", choices=["cost", "scale", "quality", "plots", "all"])
    ap.add_argument("--out", default="benchmarks/results", help="where the .md/.json/.png go")
    ap.add_argument("--work", default="/tmp/arch-bench", help="scratch space (data-bin, checkpoints, caches)")
    ap.add_argument("--sentences", type=int, default=3000, help="cost: Multi30k training pairs")
    ap.add_argument("--rounds", type=int, default=15, help="cost: interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="S")
    ap.add_argument("--tc", type=int, default=15, help="Tc")
    ap.add_argument("--skip-rss", action="store_true", help="cost: skip the peak-RSS fairseq-train runs")
    ap.add_argument("--rss-only", action="store_true", help="cost: re-measure peak RSS only, keep the timings in cost.json")
    ap.add_argument("--scales", default="tatoeba,1000000", help="scale: comma list of 'tatoeba' or a sentence count")
    ap.add_argument("--seeds", default="1,2,3", help="quality: seeds")
    ap.add_argument("--methods", default="none,r3f,smart,arch", help="quality: methods")
    ap.add_argument("--epochs", type=int, default=10, help="quality: epochs per run")
    ap.add_argument("--train-pairs", type=int, default=0, help="quality: Multi30k training pairs (0 = all 29k)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    from . import cost, plots, quality, scale

    if a.what in ("cost", "all"):
        cost.main(a)
    if a.what in ("scale", "all"):
        scale.main(a)
    if a.what in ("quality", "all"):
        quality.main(a)
    if a.what in ("plots", "all", "quality", "cost"):
        plots.main(a)


if __name__ == "__main__":
    main()
