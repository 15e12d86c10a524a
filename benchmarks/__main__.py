"""python -m benchmarks {cost,cost-spread,scale,refresh-scale,host-threads,ops,peak-chunks,quality,plots,all,probe} [options] — see docs/benchmarks.md.

probe (not part of all): python -m benchmarks probe --checkpoint CKPT --data DATA_BIN [--sentences 256]."""

import argparse
import importlib
import logging
import os
import warnings

# quality: the calibrated configuration (benchmarks/results/quality_v2/calibration.json)
QUALITY_PAIRS, QUALITY_EPOCHS, QUALITY_DROPOUT, QUALITY_WARMUP = 6000, 30, 0.1, 300


# the benchmarks that run alone (not part of `all`): name -> module
STANDALONE = {"probe": "probe", "refresh-scale": "refresh_scale", "host-threads": "host_threads",
              "peak-chunks": "peak_chunks", "ops": "ops", "cost-spread": "cost_spread"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    for add in (_common_options, _cost_options, _scale_options, _quality_options, _probe_options):
        add(ap)
    return ap


def _common_options(ap):
    """What to run, where, and the settings several benchmarks share."""
    ap.add_argument("what", choices=["cost", "scale", "quality", "plots", "all", *STANDALONE])
    ap.add_argument("--out", default="benchmarks/results", help="where the .md/.json/.png go")
    ap.add_argument("--work", default="/tmp/arch-bench", help="scratch space (data-bin, checkpoints, caches)")
    ap.add_argument("--sentences", type=int, default=None,
                    help="cost: Multi30k training pairs (default 3000); probe: training sentences probed (default 256)")
    ap.add_argument("--steps", type=int, default=3, help="S")
    ap.add_argument("--tc", type=int, default=None, help="Tc (cost: default 15; quality: default epochs/3)")


def _cost_options(ap):
    """The cost benchmark's options."""
    g = ap.add_argument_group("cost")
    g.add_argument("--rounds", type=int, default=15, help="cost: interleaved rounds")
    g.add_argument("--skip-rss", action="store_true", help="cost: skip the peak-RSS fairseq-train runs")
    g.add_argument("--model-arch", default=None,
                   help="cost: a fairseq --arch instead of the benchmark's model (e.g. transformer_wmt_en_de_big)")
    g.add_argument("--rss-only", action="store_true", help="cost: re-measure peak RSS only, keep the timings in cost.json")


def _scale_options(ap):
    """The scale benchmarks' options."""
    g = ap.add_argument_group("scale, refresh-scale, host-threads, peak-chunks")
    g.add_argument("--scales", default="tatoeba,1000000", help="scale: comma list of 'tatoeba' or a sentence count")
    g.add_argument("--refresh-scales", default="45000,150000,300000",
                   help="refresh-scale: comma list of synthetic pair counts (p=0.1; not part of all); "
                        "host-threads: the first one")
    g.add_argument("--refresh-dim", type=int, default=1024, help="refresh-scale: d of the rows and the search")
    g.add_argument("--chunks", default="1,2,4", help="peak-chunks: --adv-chunks counts measured")
    g.add_argument("--layers", default="",
                   help="peak-chunks: two depths (e.g. 1,2) to extrapolate the full model's peaks from (CPU); "
                        "empty: the full model")
    g.add_argument("--time-rounds", type=int, default=0,
                   help="peak-chunks: also time none and r3f per chunk count over this many interleaved rounds; "
                        "host-threads: rounds (default 3)")
    g.add_argument("--h200-cost-json", default="benchmarks/results/gpu_check/2026-11-26-h200-cost-big.json",
                   help="peak-chunks: an H200 cost run of the same model, whose peaks the table shows beside")


def _quality_options(ap):
    """The quality benchmark's options."""
    g = ap.add_argument_group("quality")
    g.add_argument("--seeds", default="1,2,3", help="quality: seeds of the --multi-seed-methods (the others: the first)")
    g.add_argument("--methods", default="none,arch,arch-neighbor,r3f,smart,rdrop,arch-p1,arch-pretrained,"
                                         "arch-nsearch,arch-first5",
                   help="quality: variants (benchmarks/quality.py VARIANTS, or --variant)")
    g.add_argument("--multi-seed-methods", default="none,arch,arch-neighbor,r3f,smart,rdrop,arch-p1,arch-pretrained",
                   help="quality: variants run with every seed")
    g.add_argument("--seeds-for", action="append", metavar="VARIANT=SEEDS",
                   help="quality: the seeds of one variant, overriding --seeds and --multi-seed-methods "
                        "(repeatable), e.g. --seeds-for arch-w5=1,2 --seeds-for smart=1,2,3")
    g.add_argument("--variant", action="append", metavar="NAME='FLAGS'",
                   help="quality: define a variant, e.g. --variant \"arch-tc5=--adv-method arch --arch-refresh-interval 5\"")
    g.add_argument("--epochs", type=int, default=QUALITY_EPOCHS, help="quality: epochs per run (every method)")
    g.add_argument("--valid-sentences", type=int, default=500, help="quality: Multi30k val sentences for valid BLEU")
    g.add_argument("--test-sentences", type=int, default=1000, help="quality: test_2016_flickr sentences (all: 1000)")
    g.add_argument("--dropout", type=float, default=QUALITY_DROPOUT, help="quality: dropout")
    g.add_argument("--lr", type=float, default=2e-3, help="quality: peak learning rate (inverse_sqrt)")
    g.add_argument("--warmup", type=int, default=QUALITY_WARMUP, help="quality: warmup updates")
    g.add_argument("--max-tokens", type=int, default=4096, help="quality: tokens per batch")
    g.add_argument("--report-only", action="store_true",
                   help="quality: rewrite the report from the finished runs' JSONs; train nothing")
    g.add_argument("--fill-lenpens", action="store_true",
                   help="quality: decode validation at the length penalties a finished run lacks (from its "
                        "checkpoint under --work), choose again, then write the report; train nothing")
    g.add_argument("--calibrate", action="store_true",
                   help="quality: only run none (first seed) for --epochs with --patience 8 and record its valid BLEU curve")
    g.add_argument("--calibrate-patience", type=int, default=8,
                   help="quality --calibrate: fairseq's --patience (0: train every --epochs epoch)")
    g.add_argument("--suite", default="quality_v2",
                   help="quality: results folder under --out (and scratch under --work): quality_v2 (issue 10), "
                        "quality_v3 (issue 19)")
    g.add_argument("--quality-model", default="v2", choices=["v2", "wide"],
                   help="quality: v2 (2+2 layers, d=128, ffn 256) or wide (2+2 layers, d=256, ffn 1024)")
    g.add_argument("--train-pairs", type=int, default=QUALITY_PAIRS, help="quality: Multi30k training pairs")
    g.add_argument("--jobs", type=int, default=1,
                   help="quality: runs at once, each its own processes (default threads: the cores / jobs)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="quality: where the runs train and decode; cuda runs are a suite of their own "
                        "(<suite>-cuda), paired only among themselves; several --jobs share the one GPU")


def _probe_options(ap):
    """The mechanism probe's options."""
    g = ap.add_argument_group("probe")
    g.add_argument("--checkpoint", help="probe: a checkpoint of an ARCH run")
    g.add_argument("--data", help="probe: its data-bin directory")
    g.add_argument("--cache-dir", help="probe: its cache dir (default: the run's, or <checkpoint dir>/arch_cache)")


def main():
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    a = parser().parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.what in STANDALONE:
        importlib.import_module(f".{STANDALONE[a.what]}", __package__).main(a)
        return
    if a.sentences is None:
        a.sentences = 3000
    a.quality_tc, a.tc = a.tc, 15 if a.tc is None else a.tc
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
