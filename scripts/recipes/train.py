#!/usr/bin/env python3
"""Train one experiment of the paper's Tables 2-3 with fairseq-train (the paper's hyper-parameters).

    python scripts/recipes/train.py DATASET [--direction SRC-TGT] [--method arch|none|r3f|smart|freelb]
        [--data DIR] [--save-dir DIR] [--neighbor-checkpoint CKPT] [--smoke] [--print-args]
        [-- EXTRA fairseq-train ARGS]

The effective batch (64k tokens for IWSLT, 450k for WMT'16) is max-tokens per device x devices x
--update-freq; --update-freq = ceil(batch / (max-tokens x devices)) from the GPUs torch sees (none:
CPU, one device, --cpu). Rerunning the same command resumes: fairseq loads <save-dir>/checkpoint_last.pt
and ARCH its cache in <save-dir>/arch_cache. Arguments after `--` go to fairseq-train last, so they
override anything set here. --print-args prints the fairseq-train command (one JSON list) and exits.
Output: on a terminal (or with --progress) fairseq's output goes to <save-dir>/train.log (appended on a
resume) and one line per epoch is printed as it ends (scripts/progress.py: kind refresh/reuse, losses,
seconds, time left; a line for the running epoch); otherwise (or with --no-progress) fairseq-train
replaces this process and writes to stdout as usual. The exit status is fairseq-train's either way.
Neighbours from trained embeddings: by default ARCH's neighbours (Eq. 4) come from the model's own
embeddings at the end of epoch 1, when they are nearly untrained. --neighbor-checkpoint CKPT takes them
from a trained checkpoint instead (--arch-neighbor-embeddings CKPT). Make one with a short run without
regularizer, e.g.
    bash scripts/train-iwslt14.sh --method none --save-dir checkpoints/iwslt14-nbr -- --max-epoch 5
(fairseq-train arguments such as --max-epoch go after `--`),
then train with --neighbor-checkpoint checkpoints/iwslt14-nbr/checkpoint_best.pt (same data dir:
the dictionary must be the same).
Environment: ARCH_NUM_GPUS overrides the GPU count (the command is printed for that many GPUs),
ARCH_SMOKE=1 is --smoke.
"""

import argparse
import json
import math
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER_DIR = os.path.join(REPO, "fairseq_arch")

# Paper (Sec. 4.2, App. B.1, Table 4): models, batch sizes, Adam (0.9, 0.98), lr 1e-3, label smoothing 0.1.
# Marked "ours": values the paper does not state; fairseq's own recipes for these models.
EXPERIMENTS = {
    "iwslt14": {"directions": ["de-en", "en-de"], "arch": "transformer_iwslt_de_en", "batch_tokens": 64000,
                "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0001, "max_epoch": 100},
    "iwslt15": {"directions": ["en-vi", "vi-en"], "arch": "transformer", "batch_tokens": 64000,
                "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0001, "max_epoch": 100},
    "iwslt16": {"directions": ["en-fr", "fr-en"], "arch": "transformer", "batch_tokens": 64000,
                "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0001, "max_epoch": 100},
    "wmt16": {"directions": ["en-de"], "arch": "transformer_vaswani_wmt_en_de_big", "batch_tokens": 450000,
              "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0, "max_epoch": 40},
}
ARCH_OPTIONS = [  # App. B.1; spelled out so that the command does not depend on plugin defaults
    "--adv-lambda", "1.0", "--adv-eps", "0.1", "--adv-steps", "3", "--adv-step-size", "0.1",
    "--adv-norm", "l2", "--adv-granularity", "sentence", "--adv-sides", "both",
    "--arch-refresh-interval", "15", "--arch-ema", "0.01", "--arch-cache-fraction", "0.1",
    "--arch-neighbors", "1", "--arch-neighbor-embeddings", "model", "--arch-cache-dtype", "float16",
]
METHODS = ["arch", "none", "r3f", "smart", "freelb"]
SMOKE_MODEL = [
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def count_gpus():
    env = os.environ.get("ARCH_NUM_GPUS")
    if env not in (None, ""):
        return int(env)
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def build_command(dataset, direction, method, data, save_dir, gpus, smoke=False, max_tokens=0, extra=(),
                  neighbor_checkpoint=None):
    e = EXPERIMENTS[dataset]
    src, tgt = direction.split("-")
    devices = max(gpus, 1)
    max_tokens = max_tokens or e["max_tokens"]
    update_freq = max(1, math.ceil(e["batch_tokens"] / (max_tokens * devices)))
    cmd = [
        "fairseq-train", os.path.join(data, "bin"), "--user-dir", USER_DIR,
        "--task", "arch_translation", "--source-lang", src, "--target-lang", tgt,
        "--arch", e["arch"], "--share-all-embeddings", "--dropout", str(e["dropout"]),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
        "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--warmup-init-lr", "1e-07",
        "--weight-decay", str(e["weight_decay"]),
        "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--adv-method", method, *ARCH_OPTIONS,
        "--max-tokens", str(max_tokens), "--update-freq", str(update_freq), "--max-epoch", str(e["max_epoch"]),
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--best-checkpoint-metric", "loss",
        "--seed", "1", "--log-format", "simple", "--log-interval", "100", "--no-progress-bar",
    ]
    if gpus == 0:
        cmd += ["--cpu"]
    else:
        cmd += ["--fp16"]
    if smoke:
        # a handful of updates on a tiny model; epoch 1 writes the cache (refresh), epoch 2 reads it
        cmd += [*SMOKE_MODEL, "--max-tokens", "1000", "--update-freq", "1", "--max-epoch", "2",
                "--warmup-updates", "10", "--arch-refresh-interval", "2", "--log-interval", "5",
                "--num-workers", "0"]
    if neighbor_checkpoint:
        # after ARCH_OPTIONS: the last of a repeated flag wins
        cmd += ["--arch-neighbor-embeddings", neighbor_checkpoint]
    return cmd + list(extra), update_freq * max_tokens * devices


def recipe_cli(doc, argv):
    """(parser with the DATASET argument, our argv, pass-through args after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(EXPERIMENTS))
    return ap, argv, extra


def main(argv=None):
    ap, argv, extra = recipe_cli(__doc__, argv)
    ap.add_argument("--direction", help="SRC-TGT (default: the first of the dataset's directions)")
    ap.add_argument("--method", default="arch", choices=METHODS)
    ap.add_argument("--data", help="prepared dir (default data/DATASET, data/DATASET-smoke with --smoke)")
    ap.add_argument("--save-dir", help="checkpoints (default checkpoints/DATASET-DIRECTION-METHOD[-smoke])")
    ap.add_argument("--max-tokens", type=int, default=0, help="tokens per device per step (default 4096)")
    ap.add_argument("--neighbor-checkpoint", metavar="CKPT",
                    help="word embeddings for ARCH's neighbour search (Eq. 4) from this fairseq checkpoint "
                         "(--arch-neighbor-embeddings CKPT) instead of the model's own at the end of epoch 1; "
                         "make it with a short --method none run (see below)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs on a smoke data dir (CI)")
    ap.add_argument("--print-args", action="store_true", help="print the fairseq-train command as JSON and exit")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="per-epoch lines, fairseq's output to SAVE_DIR/train.log (default on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="fairseq's own output on stdout")
    a = ap.parse_args(argv)
    e = EXPERIMENTS[a.dataset]
    smoke = a.smoke or os.environ.get("ARCH_SMOKE") == "1"
    direction = a.direction or e["directions"][0]
    if direction not in e["directions"]:
        ap.error(f"--direction for {a.dataset} is one of {', '.join(e['directions'])}")
    suffix = "-smoke" if smoke else ""
    data = a.data or os.path.join("data", a.dataset + suffix)
    save_dir = a.save_dir or os.path.join("checkpoints", f"{a.dataset}-{direction}-{a.method}{suffix}")
    if a.neighbor_checkpoint and not os.path.isfile(a.neighbor_checkpoint):
        ap.error(f"--neighbor-checkpoint {a.neighbor_checkpoint}: no such file (make it with a short "
                 "--method none run, see --help)")
    gpus = count_gpus()
    cmd, batch = build_command(a.dataset, direction, a.method, data, save_dir, gpus, smoke, a.max_tokens, extra,
                               neighbor_checkpoint=a.neighbor_checkpoint)
    if a.print_args:
        print(json.dumps(cmd))
        return 0
    if not os.path.exists(os.path.join(data, "COMPLETE")):
        print(f"train: {data} is not a complete prepared data dir (no {data}/COMPLETE); run "
              f"scripts/prepare-{a.dataset}.sh first", file=sys.stderr)
        return 2
    os.makedirs(save_dir, exist_ok=True)
    resume = os.path.exists(os.path.join(save_dir, "checkpoint_last.pt"))
    print(f"train: {a.dataset} {direction} method={a.method} on {gpus or 'no'} GPU(s) "
          f"({'CPU' if gpus == 0 else 'fp16'}), batch {batch} tokens"
          f"{' (smoke: tiny model)' if smoke else ''}; "
          f"{'resuming from ' + save_dir + '/checkpoint_last.pt' if resume else 'new run in ' + save_dir}", flush=True)
    with open(os.path.join(save_dir, "command.txt"), "a") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if a.progress if a.progress is not None else sys.stdout.isatty():
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import progress

        log = os.path.join(save_dir, "train.log")
        print(f"train: fairseq-train's output -> {log}", flush=True)
        return progress.run(cmd, log, append=True, what="fairseq-train")
    sys.stdout.flush()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from progress import console_cmd

    cmd = console_cmd(cmd)
    os.execv(cmd[0], cmd) if os.sep in cmd[0] else os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
