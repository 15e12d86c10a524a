"""python -m benchmarks probe --checkpoint CKPT --data DATA_BIN [--sentences 256] [--out DIR]

Mechanism probe at an ARCH checkpoint (see fairseq_arch/probe.py): per side, the
sentence norm and the KL(f(x) || f(x + delta)) that a fresh S-step ascent, the cached
rows, the neighbour-rebuilt rows (every --arch-rebuild-norm mode the cache knows) and
random deltas of the same norms induce, on the first N ids of a seeded permutation
of the training set. The cache is the checkpoint's (``<checkpoint dir>/arch_cache``
unless its run set --arch-cache-dir, or --cache-dir here); its current (complete)
generation is read, never written (the neighbour table is the generation's, i.e.
the one searched at the end of its refresh). Writes probe.md / probe.json to --out.
"""

import os
import time

import torch

from . import common


def load(checkpoint: str, data: str, cache_dir: str = None):
    """(cfg, task, model, criterion, cache) of a checkpoint, the model in eval mode on
    the GPU when there is one; ``cache`` is the task's ArchCache opened on the
    checkpoint's cache dir without advancing it (None for a run without a cache)."""
    import fairseq_arch  # noqa: F401  (fairseq checkpoints under torch >= 2.6)
    from fairseq import checkpoint_utils, tasks, utils
    from omegaconf import open_dict

    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    cfg = state["cfg"]
    with open_dict(cfg):
        cfg.task.data = data
        cfg.common.user_dir = common.USER_DIR
        if "arch_cache_dir" in cfg.task:
            cfg.task.arch_cache_dir = cache_dir or cfg.task.arch_cache_dir or os.path.join(
                os.path.dirname(os.path.abspath(checkpoint)), "arch_cache")
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(task.cfg.train_subset)
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    if torch.cuda.is_available():
        model = model.cuda()
    model.eval()
    cache = None
    if criterion.method.needs_cache and hasattr(task, "arch_cache"):
        from fairseq_arch.cache import ArchCache

        # the task builds its cache exactly as in training; only the epoch step
        # (finalise / new generation / checks) is left out: ArchCache.open writes
        # nothing but the dir's owner token
        real = ArchCache.begin_epoch
        ArchCache.begin_epoch = lambda self, epoch, model: self.open(model)
        try:
            task.begin_epoch(int(state.get("extra_state", {}).get("train_iterator", {}).get("epoch", 1)), model)
        finally:
            ArchCache.begin_epoch = real
        cache = task.arch_cache
    return cfg, task, model, criterion, cache


def run(checkpoint: str, data: str, sentences: int = 256, cache_dir: str = None, seed: int = 0,
        batch_size: int = 32) -> dict:
    from fairseq_arch.probe import probe_ids, probe_model

    from .experimental_rebuilds import ExperimentalRebuilds

    cfg, task, model, criterion, cache = load(checkpoint, data, cache_dir)
    ds = task.dataset(task.cfg.train_subset)
    ids = probe_ids(len(ds), sentences, seed)
    t0 = time.perf_counter()
    res = probe_model(task, model, criterion, ids, batch_size=batch_size, seed=seed, cache=cache,
                      extra=ExperimentalRebuilds)
    res["seconds"] = time.perf_counter() - t0
    res["config"] = {
        "checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data), "sentences": int(len(ids)),
        "train_sentences": len(ds), "seed": seed, "adv_eps": criterion.space.eps, "adv_steps": criterion.ascent.steps,
        "adv_step_size": criterion.space.step_size, "adv_norm": criterion.space.norm,
        "adv_granularity": criterion.space.granularity, "adv_kl": criterion.adv_kl,
        "cache_dir": getattr(cache, "cache_dir", None),
        "cache_fraction": getattr(task.cfg, "arch_cache_fraction", None),
        "rebuild_norm_of_run": str(getattr(task.cfg, "arch_rebuild_norm", "paper")),
    }
    return res


def markdown(res: dict) -> str:
    from fairseq_arch.probe import markdown_table

    c = res["config"]
    head = (f"### Mechanism probe ({c['sentences']} of {c['train_sentences']} training sentences, seed {c['seed']}; "
            f"cache {res.get('generation') or 'none'}, p={c['cache_fraction']}; eps {c['adv_eps']}, S={c['adv_steps']}, "
            f"eta {c['adv_step_size']}, {c['adv_norm']}/{c['adv_granularity']}, KL {c['adv_kl']}; eval mode)")
    note = ("One side perturbed at a time (the other at zero). KL = KL(f(x) || f(x+delta)) summed over target "
            "tokens / tokens. Ratios: to the fresh ascent on the same sentences (cached: fresh_cached; rebuilt "
            "and random[mode]: fresh_uncached; random_fresh: fresh). random[mode] has, sentence by sentence, the "
            "norm of rebuilt[mode]; random_fresh that of the fresh ascent.")
    return "\n".join([head, "", markdown_table(res), "", note, "", f"Probe time: {res['seconds']:.1f} s."])


def main(args):
    if not args.checkpoint or not args.data:
        raise SystemExit("python -m benchmarks probe needs --checkpoint CKPT and --data DATA_BIN")
    res = run(args.checkpoint, args.data, args.sentences or 256, args.cache_dir)
    common.write_report(args.out, "probe", res, markdown(res))
    return res
