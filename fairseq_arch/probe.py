"""Mechanism probe: how strongly does each kind of perturbation ARCH trains on
regularise, compared with a fresh ascent?

On a fixed set of training sentences, PER SIDE (only that side perturbed, the other
left at zero), with the model in eval mode (no dropout), it measures the sentence
l2 norm of the perturbation and the divergence the criterion regularises,
``KL(f(x) || f(x + delta))`` (the criterion's ``divergence`` with its ``--adv-kl``,
summed over target tokens, divided by the target tokens), for:

- ``fresh``: a fresh S-step ascent (the criterion's own, ``fresh_perturbation``);
- ``cached``: the rows the cache holds (cached sentences of the set);
- ``rebuilt[mode]``: the rows rebuilt from neighbours (uncached sentences), through
  the cache's own reader of its current generation (``ArchCache.open_reader``), for
  every ``--arch-rebuild-norm`` mode;
- ``random[mode]``: a random direction (uniform on the sphere) with, sentence by
  sentence, the norm of ``rebuilt[mode]`` (the R3F-like floor at equal norm);
- ``random_fresh``: a random direction with the norm of the fresh ascent (does the
  ascent beat a random direction of the same size?).

Under ``--arch-recipe code`` the kinds are the code's own (:mod:`.probe_deltas`): its
ascent as ``fresh``, its capped cached displacement as ``cached`` and its neighbour vector on
every position as ``rebuilt[code]``.

With ``extra`` (``python -m benchmarks probe`` passes the rebuilds of
``benchmarks/experimental_rebuilds.py``), more rebuilds of the uncached sentences,
``rebuilt[<name>]``, measured like the others.

Ratios compare each kind with the fresh ascent on the same sentences
(``kl / kl_fresh`` over the cached, resp. uncached, subset).

The probe changes nothing: the random states (torch CPU/CUDA, numpy, random) and
every module's train/eval flag are restored; gradients are taken w.r.t. the
perturbations only (``torch.autograd.grad``), never accumulated into parameters;
the cache is read through readers of its own (its live state is untouched).
"""

import contextlib
import logging
import random
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .injection import unwrap_model
from . import cache_math
from .perturbation import divergence, masked, sentence_norms
from .probe_deltas import fresh_delta, reuse_deltas

logger = logging.getLogger(__name__)

# a fixed key for the ascent's seeded init: the probe's fresh deltas do not depend
# on the epoch, so epochs compare on the same starting points
PROBE_INIT_KEY = 987_654_321


def probe_ids(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """The first ``n`` ids of a permutation of ``range(n_total)`` seeded with ``seed``
    (a local generator: the global numpy state is not touched)."""
    return np.random.RandomState(seed).permutation(n_total)[: min(n, n_total)]


@contextlib.contextmanager
def preserved_state(model):
    """Random states and every module's training flag restored on exit; eval mode inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py, npy = random.getstate(), np.random.get_state()
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


def cache_readers(cache) -> Dict[str, object]:
    """{``--arch-rebuild-norm`` mode: a reader of the cache's current generation with
    that mode}; empty without a cache or before its first complete generation."""
    if cache is None:
        return {}
    readers = {mode: cache.open_reader(mode) for mode in cache_math.REBUILD_NORMS}
    return {} if any(r is None for r in readers.values()) else readers


def _random_like(delta: torch.Tensor, mask: torch.Tensor, norms: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random direction per sentence (gaussian, normalised over the
    sentence's real tokens), scaled to ``norms`` (B,) in sentence l2 norm."""
    z = torch.randn(delta.shape, generator=gen, dtype=torch.float32).to(delta.device)
    z = masked(z, mask)
    n = sentence_norms(z, mask).clamp_min(1e-12)
    return z * (norms.float() / n).view(-1, 1, 1)


class _Acc:
    def __init__(self):
        self.kl = 0.0
        self.tokens = 0
        self.norm = 0.0
        self.sentences = 0

    def add(self, kl: float, tokens: int, norms: torch.Tensor) -> None:
        self.kl += kl
        self.tokens += tokens
        self.norm += float(norms.sum())
        self.sentences += int(norms.numel())

    def result(self) -> dict:
        return {"sentences": self.sentences, "tokens": self.tokens,
                "norm": self.norm / self.sentences if self.sentences else float("nan"),
                "kl": self.kl / self.tokens if self.tokens else float("nan")}


def probe_model(task, model, criterion, ids: Sequence[int], batch_size: int = 32,
                seed: int = 0, cache=None, extra: Optional[Callable] = None) -> dict:
    """The probe on the training sentences ``ids``; see the module docstring.

    ``cache``: the ArchCache to read (default: the task's ``arch_cache``; none for
    tasks without one: then only ``fresh`` and ``random_fresh`` are measured).
    ``extra``: more rebuilds to measure: called once with (a cache reader, the model),
    it returns an object whose ``deltas(ids, side, mask, eps, project)`` gives
    ``{name: delta}`` for a batch (measured on its uncached sentences as ``rebuilt[name]``).
    Returns ``{"sides": {side: {kind: {sentences, tokens, norm, kl, kl_ratio}}},
    "generation": name or None, "rebuild_modes": [...], "sentences": n}``.
    """
    core = unwrap_model(model)
    ds = task.dataset(task.cfg.train_subset)
    device = next(core.parameters()).device
    readers = cache_readers(cache if cache is not None else getattr(task, "arch_cache", None))
    reader = next(iter(readers.values()), None)
    extra = extra(reader, core) if extra is not None and reader is not None else None
    pad = criterion.padding_idx
    sides = list(criterion.sides)
    acc: Dict[str, Dict[str, _Acc]] = {s: {} for s in sides}

    def add(side, kind, kl, tokens, norms):
        acc[side].setdefault(kind, _Acc()).add(kl, tokens, norms)

    gen = torch.Generator().manual_seed(seed)
    with preserved_state(core):
        for start in range(0, len(ids), batch_size):
            samples = [ds[int(i)] for i in ids[start: start + batch_size]]
            batch = ds.collater(samples)
            if not batch:
                continue
            if device.type == "cuda":
                from fairseq import utils as fs_utils

                batch = fs_utils.move_to_cuda(batch)
            _probe_batch(criterion, core, batch, sides, readers, pad, gen, add, extra)

    out = {}
    for side in sides:
        res = {k: a.result() for k, a in acc[side].items()}
        for kind, r in res.items():
            if kind.startswith("fresh"):
                continue
            ref = "fresh_cached" if kind == "cached" else (
                "fresh" if kind == "random_fresh" else "fresh_uncached")
            r["kl_ratio"] = r["kl"] / res[ref]["kl"] if ref in res and res[ref]["kl"] > 0 else float("nan")
        out[side] = res
    return {"sides": out, "generation": reader.generation if reader is not None else None,
            "rebuild_modes": list(readers),
            "sentences": int(len(ids))}


def _probe_batch(criterion, core, batch, sides, readers, pad, gen, add, extra):
    net_input = batch["net_input"]
    masks = {"source": net_input["src_tokens"].ne(pad), "target": net_input["prev_output_tokens"].ne(pad)}
    ids = batch["id"].tolist()
    with torch.no_grad():
        lprobs, target = criterion.lprobs_fp32(core, core(**net_input), batch)
    teacher = lprobs.detach()
    tgt_mask = target.ne(pad)
    ascent_teacher = criterion.teacher(teacher, target, batch)
    b, t = batch["target"].shape
    per_token = tgt_mask.view(b, t)
    reader = next(iter(readers.values()), None)
    pos = reader.store.pos_of[np.asarray(ids, dtype=np.int64)] if reader is not None else np.full(len(ids), -1)
    subsets = {"all": torch.ones(b, dtype=torch.bool, device=tgt_mask.device),
               "cached": torch.as_tensor(pos >= 0, device=tgt_mask.device),
               "uncached": torch.as_tensor(pos < 0, device=tgt_mask.device)}

    def kl_of(side, delta, subset):
        """(token-summed KL over the subset's sentences, their target tokens)."""
        sel = (per_token & subsets[subset].view(-1, 1)).reshape(-1)
        with torch.no_grad():
            out = criterion.perturbed_forward(core, net_input, {side: delta})
            student, _ = criterion.lprobs_fp32(core, out, batch)
            return float(divergence(teacher, student, sel, criterion.adv_kl)), int(sel.sum())

    def record(side, kind, delta, subset):
        sel = subsets[subset]
        if not bool(sel.any()):
            return
        kl, tokens = kl_of(side, delta, subset)
        add(side, kind, kl, tokens, sentence_norms(delta, masks[side])[sel.to(delta.device)])

    for side in sides:
        try:
            fresh = fresh_delta(criterion, core, batch, ascent_teacher, masks, side, PROBE_INIT_KEY)
        except FloatingPointError:
            logger.warning("ARCH probe: non-finite ascent gradient, batch skipped")
            continue
        record(side, "fresh", fresh, "all")
        if reader is not None:
            record(side, "fresh_cached", fresh, "cached")
            record(side, "fresh_uncached", fresh, "uncached")
        fresh_norms = sentence_norms(fresh, masks[side]).to(fresh.device)
        record(side, "random_fresh", _random_like(fresh, masks[side], fresh_norms, gen), "all")
        if reader is None or side not in reader.store.sides:
            continue
        for kind, delta in reuse_deltas(criterion, readers, ids, side, masks[side]):
            delta = delta.to(fresh.device)
            if kind == "cached":
                record(side, kind, delta, "cached")
                continue
            record(side, kind, delta, "uncached")
            norms = sentence_norms(delta, masks[side]).to(delta.device)
            record(side, "random" + kind[len("rebuilt"):], _random_like(delta, masks[side], norms, gen), "uncached")
        if extra is not None:
            for name, delta in extra.deltas(ids, side, masks[side], criterion.space.eps, criterion.project).items():
                record(side, f"rebuilt[{name}]", delta.to(fresh.device), "uncached")


def kinds_in_order(res_side: dict) -> List[str]:
    order = ["fresh", "fresh_cached", "cached", "fresh_uncached"]
    rebuilt = sorted(k for k in res_side if k.startswith("rebuilt["))
    rnd = sorted(k for k in res_side if k.startswith("random["))
    rest = [k for k in res_side if k not in order and k not in rebuilt and k not in rnd]
    return [k for k in order if k in res_side] + rebuilt + rnd + rest


def summary_line(label: str, res: dict) -> str:
    """One log line: per side, the KL of each kind and its ratio to the fresh ascent."""
    parts = []
    for side, r in res["sides"].items():
        def kl(k):
            return f"{r[k]['kl']:.4g}" if k in r else "nan"

        items = [f"kl_fresh={kl('fresh')}", f"kl_cached={kl('cached')}"]
        ratios = [f"cached={r['cached']['kl_ratio']:.3f}" if "cached" in r else "cached=nan"]
        for k in kinds_in_order(r):
            if k.startswith("rebuilt[") or k.startswith("random["):
                name = "kl_rebuilt" if k.startswith("rebuilt") else "kl_random"
                mode = k[k.index("[") + 1:-1]
                items.append(f"{name}_{mode}={kl(k)}")
                ratios.append(f"{name[3:]}_{mode}={r[k]['kl_ratio']:.3f}")
        items.append(f"kl_random_fresh_norm={kl('random_fresh')}")
        if "random_fresh" in r:
            ratios.append(f"random_fresh_norm={r['random_fresh']['kl_ratio']:.3f}")
        # the mean sentence norm of what each kind trains on (the random kinds copy theirs)
        norms = [f"{k}={r[k]['norm']:.4g}" for k in kinds_in_order(r)
                 if k in ("fresh", "cached") or k.startswith("rebuilt[")]
        parts.append(f"{side}: " + " ".join(items) + " (ratios to fresh: " + " ".join(ratios) + "; norms: "
                     + " ".join(norms) + ")")
    gen = res.get("generation")
    return f"{label}: " + "; ".join(parts) + (f" [cache {gen}]" if gen else " [no cache generation]")


def markdown_table(res: dict) -> str:
    lines = ["| side | kind | sentences | mean sentence norm | KL per target token | KL / KL fresh (same sentences) |",
             "|---|---|---|---|---|---|"]
    for side, r in res["sides"].items():
        for k in kinds_in_order(r):
            v = r[k]
            ratio = v.get("kl_ratio")
            lines.append(f"| {side} | {k} | {v['sentences']} | {v['norm']:.4f} | {v['kl']:.3e} | "
                         + ("" if ratio is None else f"{ratio:.3f}") + " |")
    return "\n".join(lines)


def log_probe(task, model, criterion, epoch: int, n: int) -> Optional[dict]:
    """The per-epoch probe (``--adv-probe-sentences``): at the start of epoch
    ``epoch`` >= 2, on rank 0, the model as trained through epoch ``epoch - 1``."""
    from .distributed import dist_info

    if n <= 0 or epoch < 2 or dist_info()[0] != 0:
        return None
    ds = task.dataset(task.cfg.train_subset)
    ids = probe_ids(len(ds), n, criterion.space.seed)
    res = probe_model(task, model, criterion, ids, seed=criterion.space.seed)
    logger.info(summary_line(f"ARCH probe epoch {epoch - 1} ({probed_sentences(len(ids), n)}, model at the start "
                             f"of epoch {epoch})", res))
    return res


def probed_sentences(probed: int, asked: int) -> str:
    """'N sentences' for the log line, saying when --adv-probe-sentences was clamped to
    the training set's size."""
    if probed < asked:
        return f"{probed} sentences: --adv-probe-sentences {asked} clamped to the training set's {probed}"
    return f"{probed} sentences"
