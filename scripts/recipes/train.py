#!/usr/bin/env python3
"""Train one experiment of the paper's Tables 2-3 with fairseq-train (the paper's hyper-parameters).

    python scripts/recipes/train.py DATASET [--direction SRC-TGT] [--adv-method arch|none|r3f|smart|freelb|rdrop]
        [--seed N] [--data DIR] [--save-dir DIR] [--max-tokens N] [--batch-tokens N]
        [--arch-neighbor-embeddings CKPT] [--hydra] [--smoke] [--print-args] [-- EXTRA fairseq-train ARGS]

Flags that fairseq-train or the plugin also have keep their names and meaning (--adv-method, --seed,
--save-dir, --max-tokens, --arch-neighbor-embeddings); the others (--direction, --data, --batch-tokens,
--official, --hydra, --smoke, --print-args) are the recipe's own.
Methods: arch (the paper), none (the Transformer rows), r3f, smart, freelb, rdrop (R-Drop: --adv-lambda 5,
R-Drop's alpha for IWSLT'14 De-En in Liang et al. 2021; the others keep --adv-lambda 1).

Length: 150 epochs for IWSLT (the paper's Fig. 1), 30000 updates for WMT'16 (fairseq's WMT'16 En-De
reference at this batch; docs/recipes.md checks it against the paper's 176 GPU-hours).
Checkpoint choice: validation BLEU with the direction's Table 7 beam and length penalty (tokenised BLEU,
--eval-bleu ... --best-checkpoint-metric bleu --maximize-best-checkpoint-metric), as the official scripts.
The effective batch (64k tokens for IWSLT, 450k for WMT'16, or --batch-tokens) is max-tokens per device x
devices x --update-freq; --update-freq = ceil(batch / (max-tokens x devices)) from the GPUs torch sees (none:
CPU, one device, --cpu). Rounding up makes the batch a little larger than asked: the batch actually used,
the updates per epoch and the warm-up in epochs are printed at start.
Seeds: --seed N (default 1) is fairseq's seed and part of the default save dir
(checkpoints/DATASET-DIRECTION-METHOD-seedN); `-- --seed N` is refused, and a save dir that holds a run of
another seed, method or direction is refused (SAVE_DIR/recipe.json). scripts/train-seeds.sh trains and
evaluates several seeds and reports their mean and standard deviation.
Rerunning the same command resumes: fairseq loads <save-dir>/checkpoint_last.pt and ARCH its cache in
<save-dir>/arch_cache. Arguments after `--` go to fairseq-train last, so they override anything set here.
--print-args prints the command (one JSON list) and exits. --hydra runs the same experiment through
fairseq-hydra-train and configs/recipes/DATASET_SRC_TGT.yaml, with the overrides computed here
(update_freq for the GPUs found, fp16/cpu, seed, data, hydra.run.dir = the save dir).
Multi-GPU: --ddp-backend legacy_ddp (the official scripts' no_c10d; tested on CPU over gloo in
tests/test_distributed.py, as is), see docs/recipes.md.
Output: on a terminal (or with --progress) fairseq's output goes to <save-dir>/train.log (appended on a
resume) and one line per epoch is printed as it ends (scripts/progress.py: kind refresh/reuse, losses,
seconds, time left; a line for the running epoch); otherwise (or with --no-progress) fairseq-train
replaces this process and writes to stdout as usual. The exit status is fairseq-train's either way.
Neighbours from trained embeddings: by default ARCH's neighbours (Eq. 4) come from the model's own
embeddings at the end of epoch 1, when they are nearly untrained. --arch-neighbor-embeddings CKPT takes
them from a trained checkpoint instead. Make one with a short run without regularizer, e.g.
    bash scripts/train-iwslt14.sh --adv-method none --save-dir checkpoints/iwslt14-nbr -- --max-epoch 5
(fairseq-train arguments such as --max-epoch go after `--`),
then train with --arch-neighbor-embeddings checkpoints/iwslt14-nbr/checkpoint_best.pt (same data dir:
the dictionary must be the same).
Environment: ARCH_NUM_GPUS overrides the GPU count (the command is printed for that many GPUs),
ARCH_SMOKE=1 is --smoke.
Old spellings, still accepted but deprecated (a note is printed): --method M (e.g. --method none) is
--adv-method M; --neighbor-checkpoint CKPT is --arch-neighbor-embeddings CKPT.
"""

import argparse
import json
import math
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER_DIR = os.path.join(REPO, "fairseq_arch")

# Paper (Sec. 4.2, App. B.1, Table 4): models, batch sizes, Adam (0.9, 0.98), lr 1e-3, label smoothing 0.1;
# Fig. 1: 150 IWSLT epochs. Marked "ours": values the paper does not state (fairseq's own recipes).
EXPERIMENTS = {
    "iwslt14": {"directions": ["de-en", "en-de"], "arch": "transformer_iwslt_de_en", "batch_tokens": 64000,
                "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0001, "max_epoch": 150, "max_update": 0},
    "iwslt15": {"directions": ["en-vi", "vi-en"], "arch": "transformer", "batch_tokens": 64000,
                "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0001, "max_epoch": 150, "max_update": 0},
    "iwslt16": {"directions": ["en-fr", "fr-en"], "arch": "transformer", "batch_tokens": 64000,
                "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0001, "max_epoch": 150, "max_update": 0},
    # ours: 30000 updates of ~459k tokens, fairseq's WMT'16 En-De reference at this batch
    # (examples/pay_less_attention_paper: 8 GPUs x 3584 x 16, --max-update 30000)
    "wmt16": {"directions": ["en-de"], "arch": "transformer_vaswani_wmt_en_de_big", "batch_tokens": 450000,
              "max_tokens": 4096, "dropout": 0.3, "weight_decay": 0.0, "max_epoch": 0, "max_update": 30000},
}
WARMUP_UPDATES = 4000  # ours: fairseq's reference (examples/translation, scaling_nmt) and the official run.sh
# Table 7: (beam, length penalty) per direction; used for the validation BLEU that picks
# checkpoint_best.pt and for the test set (scripts/recipes/evaluate.py)
DECODING = {
    ("iwslt15", "en-vi"): (10, 1.0), ("iwslt15", "vi-en"): (15, 0.3),
    ("iwslt14", "en-de"): (10, 1.5), ("iwslt14", "de-en"): (9, 1.5),
    ("iwslt16", "en-fr"): (10, 0.2), ("iwslt16", "fr-en"): (10, 2.0),
    ("wmt16", "en-de"): (4, 0.6),
}
ARCH_OPTIONS = [  # App. B.1; spelled out so that the command does not depend on plugin defaults
    "--adv-lambda", "1.0", "--adv-eps", "0.1", "--adv-steps", "3", "--adv-step-size", "0.1",
    "--adv-norm", "l2", "--adv-granularity", "sentence", "--adv-sides", "both",
    "--arch-refresh-interval", "15", "--arch-first-refresh-epoch", "1", "--arch-ema", "0.01",
    "--arch-cache-fraction", "0.1", "--arch-neighbors", "1", "--arch-neighbor-embeddings", "model",
    "--arch-rebuild-norm", "paper", "--arch-neighbor-search", "refresh", "--arch-cache-dtype", "float16",
]
# --official (IWSLT'14 De-En): the official code's run.sh (SimiaoZuo/Caching-Adv e5719e3) and its
# computation (--arch-recipe code): eps 0.3, 2 inner steps of 1e-4, symmetric KL, Tc 15, alpha 0.01,
# p 0.1, K 1; --share-decoder-input-output-embed; max-tokens 4096 on one GPU, update-freq 1
OFFICIAL_ARCH_OPTIONS = [
    "--adv-lambda", "1.0", "--adv-eps", "0.3", "--adv-steps", "2", "--adv-step-size", "1e-4",
    "--adv-norm", "l2", "--adv-granularity", "sentence", "--adv-sides", "both", "--adv-kl", "symmetric",
    "--arch-recipe", "code", "--arch-refresh-interval", "15", "--arch-first-refresh-epoch", "1", "--arch-ema", "0.01",
    "--arch-cache-fraction", "0.1", "--arch-neighbors", "1", "--arch-neighbor-embeddings", "model",
    "--arch-rebuild-norm", "paper", "--arch-neighbor-search", "refresh", "--arch-cache-dtype", "float32",
]
METHODS = ["arch", "none", "r3f", "smart", "freelb", "rdrop"]
# a method's own settings, in place of the shared ones above (fairseq flag -> value and its hydra key);
# R-Drop's alpha is its IWSLT'14 De-En value, used for every dataset here
METHOD_OPTIONS = {
    # R-Drop (Liang et al., NeurIPS 2021): alpha 5 for IWSLT'14 De-En; --adv-lambda is R-Drop's alpha
    "rdrop": {"--adv-lambda": ("5", "criterion.adv_lambda")},
}
SMOKE_MODEL = [
    "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]
# a handful of updates on a tiny model; epoch 1 writes the cache (refresh), epoch 2 reads it
SMOKE_TRAIN = ["--max-tokens", "1000", "--update-freq", "1", "--max-epoch", "2", "--warmup-updates", "10",
               "--arch-refresh-interval", "2", "--log-interval", "5", "--num-workers", "0"]
# flags that the recipe owns: passing them after `--` would silently break its bookkeeping
OWNED_FLAGS = {"--seed": "--seed N", "--save-dir": "--save-dir DIR", "--adv-method": "--adv-method M"}
# multi-GPU: the official scripts' no_c10d, fairseq's legacy_ddp; tests/test_distributed.py runs it on CPU
# over gloo as is (torch's DDP, fairseq's default pytorch_ddp, is tested there only with a CPU shim)
DDP_BACKEND = "legacy_ddp"


def count_gpus():
    env = os.environ.get("ARCH_NUM_GPUS")
    if env not in (None, ""):
        return int(env)
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def method_options(method, official=False):
    """The regulariser's flags for METHOD: the shared ARCH_OPTIONS (OFFICIAL_ARCH_OPTIONS with --official)
    with the method's own values (METHOD_OPTIONS) in place, each flag once."""
    opts = list(OFFICIAL_ARCH_OPTIONS if official else ARCH_OPTIONS)
    for flag, (value, _) in METHOD_OPTIONS.get(method, {}).items():
        opts[opts.index(flag) + 1] = value
    return opts


def method_overrides(method):
    """METHOD_OPTIONS of METHOD as fairseq-hydra-train overrides (KEY=VALUE)."""
    return [f"{key}={value}" for value, key in METHOD_OPTIONS.get(method, {}).values()]


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: sets the same value as the flag it was renamed to (`new`), prints a
    note naming that flag, and records the spelling used (Namespace.spelled) for error messages."""

    def __init__(self, option_strings, dest, new=None, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        prog = os.path.splitext(os.path.basename(parser.prog))[0]
        print(f"{prog}: {option_string} is deprecated: use {self.new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)
        spelled = dict(getattr(namespace, "spelled", None) or {})
        spelled[self.dest] = option_string
        namespace.spelled = spelled


def add_flag(ap, flag, old, **kw):
    """ap.add_argument(flag, **kw) (fairseq's or the plugin's name), plus the recipe's former name OLD as a
    deprecated alias: still accepted, hidden from --help, a note on stderr when used."""
    action = ap.add_argument(flag, **kw)
    ap.add_argument(old, dest=action.dest, action=DeprecatedAlias, new=flag, help=argparse.SUPPRESS,
                    default=argparse.SUPPRESS, choices=kw.get("choices"), metavar=kw.get("metavar"))
    return action


def spelled(a, dest, flag):
    """The spelling of FLAG (dest DEST) the user typed: FLAG, or its deprecated alias."""
    return (getattr(a, "spelled", None) or {}).get(dest, flag)


def default_save_dir(dataset, direction, method, seed, smoke=False, official=False):
    return os.path.join("checkpoints", f"{dataset}-{direction}-{method}{'-official' if official else ''}-seed{seed}"
                                       f"{'-smoke' if smoke else ''}")


def update_freq_for(batch_tokens, max_tokens, devices):
    """--update-freq that reaches `batch_tokens` (rounded up) and the effective batch it gives."""
    devices = max(devices, 1)
    uf = max(1, math.ceil(batch_tokens / (max_tokens * devices)))
    return uf, uf * max_tokens * devices


def eval_bleu_flags(dataset, direction):
    """Checkpoint choice by validation BLEU with the Table 7 decoding (as the official run.sh): tokenised
    BLEU of the sentencepiece-decoded (Moses-tokenised) text, i.e. the metric of Tables 2-3."""
    beam, lenpen = DECODING[(dataset, direction)]
    return ["--eval-bleu", "--eval-bleu-args", json.dumps({"beam": beam, "lenpen": lenpen}),
            "--eval-bleu-detok", "space", "--eval-bleu-remove-bpe", "sentencepiece", "--eval-tokenized-bleu",
            "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric"]


def build_command(dataset, direction, method, data, save_dir, gpus, smoke=False, max_tokens=0, extra=(),
                  neighbor_checkpoint=None, seed=1, batch_tokens=0, official=False):
    """(fairseq-train command, effective batch in tokens, update_freq)."""
    e = EXPERIMENTS[dataset]
    src, tgt = direction.split("-")
    devices = max(gpus, 1)
    max_tokens = max_tokens or e["max_tokens"]
    if official:  # run.sh: the batch of one step on one GPU
        batch_tokens = batch_tokens or max_tokens
    update_freq, batch = update_freq_for(batch_tokens or e["batch_tokens"], max_tokens, devices)
    length = ["--max-epoch", str(e["max_epoch"])] if e["max_epoch"] else ["--max-update", str(e["max_update"])]
    cmd = [
        "fairseq-train", os.path.join(data, "bin"), "--user-dir", USER_DIR,
        "--task", "arch_translation", "--source-lang", src, "--target-lang", tgt,
        "--arch", e["arch"], "--share-decoder-input-output-embed" if official else "--share-all-embeddings",
        "--dropout", str(e["dropout"]),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
        "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(WARMUP_UPDATES),
        "--warmup-init-lr", "1e-07", "--weight-decay", str(e["weight_decay"]),
        "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--adv-method", method, *method_options(method, official),
        "--max-tokens", str(max_tokens), "--update-freq", str(update_freq), *length,
        "--save-dir", save_dir, "--no-epoch-checkpoints", *eval_bleu_flags(dataset, direction),
        "--ddp-backend", DDP_BACKEND,
        "--seed", str(seed), "--log-format", "simple", "--log-interval", "100", "--no-progress-bar",
    ]
    if gpus == 0:
        cmd += ["--cpu"]
    else:
        cmd += ["--fp16"]
    if smoke:
        cmd += [*SMOKE_MODEL, *SMOKE_TRAIN]
        if not e["max_epoch"]:
            cmd += ["--max-update", "0"]  # the epoch count rules in smoke mode
        update_freq, batch = 1, 1000 * devices
    if neighbor_checkpoint:
        # after ARCH_OPTIONS: the last of a repeated flag wins
        cmd += ["--arch-neighbor-embeddings", neighbor_checkpoint]
    return cmd + list(extra), batch, update_freq


def hydra_overrides(dataset, direction, method, data, save_dir, gpus, smoke=False, max_tokens=0, seed=1,
                    batch_tokens=0, official=False, neighbor_embeddings=None):
    """fairseq-hydra-train command for configs/recipes/DATASET_SRC_TGT.yaml with what the YAML cannot know:
    the GPUs found (update_freq, fp16 / cpu), the data and plugin paths (absolute: hydra changes into
    hydra.run.dir), the seed, the method and the run dir (= the save dir; the YAML saves to '.')."""
    e = EXPERIMENTS[dataset]
    src, tgt = direction.split("-")
    max_tokens = max_tokens or e["max_tokens"]
    if official:
        batch_tokens = batch_tokens or max_tokens
    update_freq, _ = update_freq_for(batch_tokens or e["batch_tokens"], max_tokens, gpus)
    cmd = ["fairseq-hydra-train", "--config-dir", os.path.join(REPO, "configs", "recipes"),
           "--config-name", f"{dataset}_{src}_{tgt}" + ("_official" if official else ""),
           f"task.data={os.path.abspath(os.path.join(data, 'bin'))}", f"common.user_dir={USER_DIR}",
           f"common.seed={seed}", f"criterion.adv_method={method}", f"dataset.max_tokens={max_tokens}",
           f"optimization.update_freq=[{update_freq}]", f"hydra.run.dir={os.path.abspath(save_dir)}",
           *method_overrides(method)]
    if neighbor_embeddings:
        cmd += [f"task.arch_neighbor_embeddings={neighbor_embeddings}"]
    cmd += ["common.cpu=true", "common.fp16=false"] if gpus == 0 else ["common.cpu=false", "common.fp16=true"]
    if smoke:
        cmd += ["model.encoder_layers=1", "model.decoder_layers=1", "model.encoder_embed_dim=32",
                "model.decoder_embed_dim=32", "model.encoder_ffn_embed_dim=64", "model.decoder_ffn_embed_dim=64",
                "model.encoder_attention_heads=2", "model.decoder_attention_heads=2",
                "dataset.max_tokens=1000", "optimization.update_freq=[1]", "optimization.max_epoch=2",
                "optimization.max_update=0", "lr_scheduler.warmup_updates=10", "task.arch_refresh_interval=2",
                "common.log_interval=5", "dataset.num_workers=0"]
    return cmd


def updates_per_epoch(data, src, tgt, max_tokens, devices, update_freq):
    """Updates per epoch as fairseq batches this training set (its sizes from bin/, fairseq's own
    ordering and batch_by_size), or None when the binarised data is not there."""
    import numpy as np

    for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
        prefix = os.path.join(data, "bin", f"train.{pair}.")
        if os.path.exists(prefix + f"{src}.idx") and os.path.exists(prefix + f"{tgt}.idx"):
            break
    else:
        return None
    from fairseq.data import data_utils, indexed_dataset

    def sizes(path):  # a copy: the dataset's own array is a view of a memory map closed with it
        ds = indexed_dataset.MMapIndexedDataset(path)
        out = np.array(ds.sizes, dtype=np.int64, copy=True)
        del ds
        return out

    ss, ts = sizes(prefix + src), sizes(prefix + tgt)
    order = np.lexsort((ts, ss))  # LanguagePairDataset.ordered_indices: by source, then target length
    batches = data_utils.batch_by_size(order, num_tokens_fn=None, num_tokens_vec=np.maximum(ss, ts)[order],
                                       max_tokens=max_tokens, max_sentences=None, required_batch_size_multiple=8)
    return math.ceil(len(batches) / (max(devices, 1) * update_freq))


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


def recipe_target(ap, a):
    """(experiment, smoke, direction) of parsed recipe args; a direction the dataset does not
    have is a usage error."""
    e = EXPERIMENTS[a.dataset]
    smoke = a.smoke or os.environ.get("ARCH_SMOKE") == "1"
    direction = a.direction or e["directions"][0]
    if direction not in e["directions"]:
        ap.error(f"--direction for {a.dataset} is one of {', '.join(e['directions'])}")
    return e, smoke, direction


def check_save_dir(save_dir, want):
    """None if SAVE_DIR is new or holds the run `want` describes; else why it must not be resumed."""
    path = os.path.join(save_dir, "recipe.json")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
            return (f"{save_dir} holds a checkpoint but no recipe.json: not made by this recipe, or by an older "
                    f"one without seeds; choose another --save-dir")
        return None
    with open(path) as f:
        have = json.load(f)
    diff = [f"{k} {have.get(k)!r} there, {v!r} asked" for k, v in want.items() if have.get(k) != v]
    if diff:
        return f"{save_dir} holds another run ({'; '.join(diff)}): choose another --save-dir (or --seed)"
    return None


def main(argv=None):
    ap, argv, extra = recipe_cli(__doc__, argv)
    ap.add_argument("--direction", help="SRC-TGT (default: the first of the dataset's directions)")
    add_flag(ap, "--adv-method", "--method", dest="method", default="arch", choices=METHODS,
             help="regularizer, fairseq's --adv-method (default arch; none = the Transformer rows; rdrop trains "
                  "with --adv-lambda 5)")
    ap.add_argument("--seed", type=int, default=1, help="fairseq's seed; part of the default save dir (default 1)")
    ap.add_argument("--data", help="prepared dir (default data/DATASET, data/DATASET-smoke with --smoke)")
    ap.add_argument("--save-dir", help="fairseq's checkpoint dir (default "
                                       "checkpoints/DATASET-DIRECTION-METHOD-seedN[-smoke])")
    ap.add_argument("--max-tokens", type=int, default=0, help="fairseq's tokens per device per step (default 4096)")
    ap.add_argument("--batch-tokens", type=int, default=0,
                    help="effective batch in tokens (default: the paper's, 64000 IWSLT / 450000 WMT'16; the "
                         "official run.sh trains IWSLT'14 with 4096 = --batch-tokens 4096)")
    add_flag(ap, "--arch-neighbor-embeddings", "--neighbor-checkpoint", dest="neighbor_checkpoint", metavar="CKPT",
             help="word embeddings for ARCH's neighbour search (Eq. 4) from this fairseq checkpoint instead of "
                  "the model's own at the end of epoch 1 (the plugin's flag: also 'model' or 'random'); make "
                  "the checkpoint with a short --adv-method none run (see below)")
    ap.add_argument("--official", action="store_true",
                    help="IWSLT'14 De-En as the official code's run.sh trains it: its computation (--arch-recipe "
                         "code, eps 0.3, 2 steps of 1e-4, symmetric KL), --share-decoder-input-output-embed, one "
                         "GPU's batch (max-tokens 4096, update-freq 1); configs/recipes/iwslt14_de_en_official.yaml")
    ap.add_argument("--hydra", action="store_true",
                    help="run fairseq-hydra-train on configs/recipes/DATASET_SRC_TGT.yaml (overrides computed here)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs on a smoke data dir (CI)")
    ap.add_argument("--print-args", action="store_true", help="print the fairseq-train command as JSON and exit")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="per-epoch lines, fairseq's output to SAVE_DIR/train.log (default on a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="fairseq's own output on stdout")
    a = ap.parse_args(argv)
    e, smoke, direction = recipe_target(ap, a)
    for flag, ours in OWNED_FLAGS.items():
        if any(x == flag or x.startswith(flag + "=") for x in extra):
            ap.error(f"pass {ours} to the recipe, not after `--` (the recipe names the save dir after the method "
                     f"and seed, and refuses to resume another method's or seed's run)")
    if a.hydra and extra:
        ap.error("--hydra takes no fairseq-train arguments after `--`: override the YAML instead "
                 "(run fairseq-hydra-train with the command --print-args --hydra prints, plus KEY=VALUE)")
    if a.official and (a.dataset, direction) != ("iwslt14", "de-en"):
        ap.error("--official is the official code's IWSLT'14 De-En run.sh: use it with iwslt14 --direction de-en")
    data = a.data or os.path.join("data", a.dataset + ("-smoke" if smoke else ""))
    save_dir = a.save_dir or default_save_dir(a.dataset, direction, a.method, a.seed, smoke, a.official)
    nbr = a.neighbor_checkpoint
    if nbr and nbr not in ("model", "random") and not os.path.isfile(nbr):
        ap.error(f"{spelled(a, 'neighbor_checkpoint', '--arch-neighbor-embeddings')} {nbr}: no such file (give "
                 "a fairseq checkpoint, 'model' or 'random'; make a checkpoint with a short --adv-method none "
                 "run, see --help)")
    gpus = count_gpus()
    cmd, batch, update_freq = build_command(a.dataset, direction, a.method, data, save_dir, gpus, smoke,
                                            a.max_tokens, extra, neighbor_checkpoint=a.neighbor_checkpoint,
                                            seed=a.seed, batch_tokens=a.batch_tokens, official=a.official)
    if a.hydra:
        cmd = hydra_overrides(a.dataset, direction, a.method, data, save_dir, gpus, smoke, a.max_tokens, a.seed,
                              a.batch_tokens, a.official,
                              neighbor_embeddings=os.path.abspath(nbr) if nbr and os.path.isfile(nbr) else nbr)
    devices = max(gpus, 1)
    max_tokens = 1000 if smoke else (a.max_tokens or e["max_tokens"])
    target = a.batch_tokens or (max_tokens if a.official else e["batch_tokens"])
    batch_line = (f"train: effective batch {max_tokens} tokens x {devices} device(s) x update-freq {update_freq} = "
                  f"{batch} tokens" + ("" if smoke else f" (recipe {target}; {100 * (batch - target) / target:+.1f}% "
                                                        f"from rounding update-freq up)"))
    if a.print_args:
        print(batch_line, file=sys.stderr)
        print(json.dumps(cmd))
        return 0
    if not os.path.exists(os.path.join(data, "COMPLETE")):
        print(f"train: {data} is not a complete prepared data dir (no {data}/COMPLETE); run "
              f"scripts/prepare-{a.dataset}.sh first", file=sys.stderr)
        return 2
    want = {"dataset": a.dataset, "direction": direction, "method": a.method, "seed": a.seed}
    if a.official:
        want["official"] = True
    problem = check_save_dir(save_dir, want)
    if problem:
        print(f"train: {problem}", file=sys.stderr)
        return 2
    os.makedirs(save_dir, exist_ok=True)
    if not os.path.exists(os.path.join(save_dir, "recipe.json")):
        with open(os.path.join(save_dir, "recipe.json"), "w") as f:
            json.dump({**want, "data": os.path.abspath(data), "smoke": smoke}, f, indent=1)
    resume = os.path.exists(os.path.join(save_dir, "checkpoint_last.pt"))
    print(f"train: {a.dataset} {direction} method={a.method} seed={a.seed} on {gpus or 'no'} GPU(s) "
          f"({'CPU' if gpus == 0 else 'fp16'}){' (smoke: tiny model)' if smoke else ''}; "
          f"{'resuming from ' + save_dir + '/checkpoint_last.pt' if resume else 'new run in ' + save_dir}", flush=True)
    print(batch_line, flush=True)
    try:
        upe = updates_per_epoch(data, *direction.split("-"), max_tokens, devices, update_freq)
    except Exception as ex:  # informative only
        upe = None
        print(f"train: (could not count the updates per epoch: {type(ex).__name__}: {ex})")
    if upe:
        if e["max_epoch"] and not smoke:
            length = f"{e['max_epoch']} epochs = {upe * e['max_epoch']} updates"
        elif not smoke:
            length = f"{e['max_update']} updates = {e['max_update'] / upe:.1f} epochs"
        else:
            length = "2 epochs (smoke)"
        warm = 10 if smoke else WARMUP_UPDATES
        print(f"train: {upe} updates per epoch at this batch; warm-up {warm} updates = {warm / upe:.1f} epochs; "
              f"{length}", flush=True)
    if a.hydra:
        print(f"train: fairseq-hydra-train, run dir (= save dir) {os.path.abspath(save_dir)}", flush=True)
    with open(os.path.join(save_dir, "command.txt"), "a") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    # hydra formats fairseq's log lines its own way, which scripts/progress.py does not read: its output as is
    if a.progress if a.progress is not None else (sys.stdout.isatty() and not a.hydra):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import progress

        log = os.path.join(save_dir, "train.log")
        print(f"train: {cmd[0]}'s output -> {log}", flush=True)
        return progress.run(cmd, log, append=True, what=cmd[0])
    sys.stdout.flush()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from progress import console_cmd

    cmd = console_cmd(cmd)
    os.execv(cmd[0], cmd) if os.sep in cmd[0] else os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
