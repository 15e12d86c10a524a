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
  the cache's own ``read()`` in reuse mode, for every ``--arch-rebuild-norm`` mode the
  cache knows (``paper`` only with a cache that has no such option);
- ``random[mode]``: a random direction (uniform on the sphere) with, sentence by
  sentence, the norm of ``rebuilt[mode]`` (the R3F-like floor at equal norm);
- ``random_fresh``: a random direction with the norm of the fresh ascent (does the
  ascent beat a random direction of the same size?).

With ``experimental=True`` (``python -m benchmarks probe``), two rebuilds that ARCH
does not train with, each sized to eps (like ``rebuilt[eps]``) then projected, and
measured on the uncached sentences like the others:

- ``rebuilt[token-nbr]``: token by token from the nearest cached sentence (the
  generation's neighbour table): the row of the same word when the neighbour has it
  (the mean of its occurrences), else the row of the neighbour's word with the most
  similar embedding (cosine), instead of Eq. 3's one averaged vector on every token;
- ``rebuilt[word-table]``: the mean cached row of each word over all cached sentences
  (a V x C table), Eq. 3's neighbour vector for words no cached sentence has.

Ratios compare each kind with the fresh ascent on the same sentences
(``kl / kl_fresh`` over the cached, resp. uncached, subset).

The probe changes nothing: the random states (torch CPU/CUDA, numpy, random) and
every module's train/eval flag are restored; gradients are taken w.r.t. the
perturbations only (``torch.autograd.grad``), never accumulated into parameters;
the cache is read through a shallow copy (its live reading state is untouched).
"""

import contextlib
import copy
import logging
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .injection import unwrap_model
from .perturbation import divergence, masked, scatter_rows, sentence_norms

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


def reader_view(cache):
    """A shallow copy of an :class:`~fairseq_arch.arch_cache.ArchCache` in reuse mode
    on its current (complete) generation, whatever the live cache's mode is, so that
    its ``read()`` (cached rows, neighbour rebuilds) can be called. ``None`` when the
    cache has no complete generation yet. The live cache is not modified."""
    if cache is None or getattr(cache, "store", None) is None:
        return None
    store = cache.store
    if cache.mode == "reuse":
        return copy.copy(cache)
    cur = store.read_state().get("current")
    if cur is None or not store.is_complete(cur["name"]):
        return None
    view = copy.copy(cache)
    view.mode = "reuse"
    view.read_gen = cur["name"]
    view.means = {s: store.load_array(cur["name"], f"{s}_mean.npy") for s in store.sides}
    view.nbrs = {s: store.load_array(cur["name"], f"{s}_nbr.npy") for s in store.sides}
    if hasattr(view, "norms"):
        view.norms = None
    return view


def _rebuild_modes(view) -> List[str]:
    if view is None:
        return []
    if not hasattr(view, "rebuild_norm"):
        return ["paper"]  # a cache from before --arch-rebuild-norm
    from . import cache_math

    return list(getattr(cache_math, "REBUILD_NORMS", ("paper",)))


def _set_rebuild_mode(view, mode: str) -> None:
    if not hasattr(view, "rebuild_norm"):
        return
    view.rebuild_norm = mode
    if hasattr(view, "norms"):
        if mode == "neighbor":
            if getattr(view, "_probe_norms", None) is None:
                view._probe_norms = view._load_norms(view.read_gen)
            view.norms = view._probe_norms
        else:
            view.norms = None


def _random_like(delta: torch.Tensor, mask: torch.Tensor, norms: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random direction per sentence (gaussian, normalised over the
    sentence's real tokens), scaled to ``norms`` (B,) in sentence l2 norm."""
    z = torch.randn(delta.shape, generator=gen, dtype=torch.float32).to(delta.device)
    z = masked(z, mask)
    n = sentence_norms(z, mask).clamp_min(1e-12)
    return z * (norms.float() / n).view(-1, 1, 1)


def token_aligned_rows(tokens: np.ndarray, nbr_tokens: np.ndarray, nbr_rows: np.ndarray,
                       emb: torch.Tensor) -> np.ndarray:
    """len(tokens) x C rows for a sentence from its neighbour's cached rows (``nbr_rows``,
    one per ``nbr_tokens``): per token, the mean row of the neighbour's occurrences of
    the same word, else the row of the neighbour's word whose embedding (``emb``, V x C')
    is the most cosine-similar."""
    def unit(t):  # only the rows used, not the whole V x C' matrix
        return torch.nn.functional.normalize(emb[torch.as_tensor(t, device=emb.device)].float().cpu(), dim=-1)

    sim = unit(tokens) @ unit(nbr_tokens).T  # n x m
    pick = sim.argmax(dim=1).numpy()
    out = nbr_rows[pick].copy()
    for j, w in enumerate(tokens):
        same = nbr_tokens == w
        if same.any():
            out[j] = nbr_rows[same].mean(axis=0)
    return out


def word_table(token_lists: Sequence[np.ndarray], row_lists: Sequence[np.ndarray]) -> Dict[int, np.ndarray]:
    """{word id: mean row} over every occurrence in the given sentences (tokens and
    their rows, one row per token)."""
    sums: Dict[int, np.ndarray] = {}
    counts: Dict[int, int] = {}
    for toks, rows in zip(token_lists, row_lists):
        assert len(toks) == len(rows), f"{len(toks)} tokens but {len(rows)} rows"
        for w, r in zip(toks.tolist(), rows):
            if w in sums:
                sums[w] += r
                counts[w] += 1
            else:
                sums[w] = r.astype(np.float64)
                counts[w] = 1
    return {w: (sums[w] / counts[w]).astype(np.float32) for w in sums}


def _row_tokens(view, side: str, ids: np.ndarray) -> List[np.ndarray]:
    """Per sentence, the token each cached row belongs to: the source tokens; for the
    target, the decoder input (eos, then the target without its final eos)."""
    flat, off = view._token_chunk(side, np.asarray(ids, dtype=np.int64))
    toks = [flat[off[i]: off[i + 1]] for i in range(len(ids))]
    if side == "target":
        eos = view.dicts["target"].eos()
        toks = [np.concatenate([[eos], t[:-1]]).astype(np.int64) for t in toks]
    return toks


class _ExperimentalRebuilds:
    """``rebuilt[token-nbr]`` and ``rebuilt[word-table]`` (module docstring) for a reader view."""

    def __init__(self, view, model):
        self.view, self.model = view, model
        self.tables: Dict[str, Dict[int, np.ndarray]] = {}

    def _table(self, side: str) -> Dict[int, np.ndarray]:
        if side not in self.tables:
            store = self.view.store
            pos = np.arange(store.num_cached)
            rows = store.read_rows(self.view.read_gen, side, pos)
            self.tables[side] = word_table(_row_tokens(self.view, side, store.cached_ids[pos]), rows)
        return self.tables[side]

    def deltas(self, ids, side: str, mask: torch.Tensor, eps: float, project) -> Dict[str, torch.Tensor]:
        view, store = self.view, self.view.store
        ids = np.asarray(ids, dtype=np.int64)
        emb = view._embedding_matrix(side, self.model)
        toks = _row_tokens(view, side, ids)
        table = self._table(side)
        # cached sentences are measured as `cached`, not as rebuilds: zero rows here
        out = {k: [np.zeros((len(t), store.dims[side]), dtype=np.float32) for t in toks]
               for k in ("token-nbr", "word-table")}
        uncached = np.nonzero(store.pos_of[ids] < 0)[0]
        nbr = np.asarray(view.nbrs[side][ids[uncached], 0], dtype=np.int64)  # nearest cached position each
        # the batch's neighbours in one read each (rows, tokens)
        nbr_rows = store.read_rows(view.read_gen, side, nbr)
        nbr_toks = _row_tokens(view, side, store.cached_ids[nbr])
        for j, b in enumerate(uncached):
            out["token-nbr"][b] = token_aligned_rows(toks[b], nbr_toks[j], nbr_rows[j], emb)
            mean = np.asarray(view.means[side][nbr[j]], dtype=np.float32)
            out["word-table"][b] = np.stack([table.get(int(w), mean) for w in toks[b]])
        res = {}
        for k, rows in out.items():
            delta = scatter_rows(rows, mask)
            norms = sentence_norms(delta, mask).clamp_min(1e-12)
            res[k] = project(delta * (eps / norms).view(-1, 1, 1), mask)
        return res


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
                seed: int = 0, cache=None, experimental: bool = False) -> dict:
    """The probe on the training sentences ``ids``; see the module docstring.

    ``cache``: the ArchCache to read (default: the task's ``arch_cache``; none for
    tasks without one: then only ``fresh`` and ``random_fresh`` are measured).
    Returns ``{"sides": {side: {kind: {sentences, tokens, norm, kl, kl_ratio}}},
    "generation": name or None, "rebuild_modes": [...], "sentences": n}``.
    """
    core = unwrap_model(model)
    ds = task.dataset(task.cfg.train_subset)
    device = next(core.parameters()).device
    view = reader_view(cache if cache is not None else getattr(task, "arch_cache", None))
    modes = _rebuild_modes(view)
    extra = _ExperimentalRebuilds(view, core) if experimental and view is not None else None
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
            _probe_batch(criterion, core, batch, sides, view, modes, pad, gen, add, extra)

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
    return {"sides": out, "generation": getattr(view, "read_gen", None), "rebuild_modes": modes,
            "sentences": int(len(ids))}


def _probe_batch(criterion, core, batch, sides, view, modes, pad, gen, add, extra):
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
    pos = view.store.pos_of[np.asarray(ids, dtype=np.int64)] if view is not None else np.full(len(ids), -1)
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
            fresh = criterion.fresh_perturbation(core, batch, ascent_teacher, masks, PROBE_INIT_KEY, sides=[side])[side]
        except FloatingPointError:
            logger.warning("ARCH probe: non-finite ascent gradient, batch skipped")
            continue
        record(side, "fresh", fresh, "all")
        if view is not None:
            record(side, "fresh_cached", fresh, "cached")
            record(side, "fresh_uncached", fresh, "uncached")
        fresh_norms = sentence_norms(fresh, masks[side]).to(fresh.device)
        record(side, "random_fresh", _random_like(fresh, masks[side], fresh_norms, gen), "all")
        if view is None or side not in view.store.sides:
            continue
        for i, mode in enumerate(modes):
            _set_rebuild_mode(view, mode)
            delta, _, _ = view.read(ids, side, masks[side], criterion.project)
            delta = delta.to(fresh.device)
            if i == 0:
                record(side, "cached", delta, "cached")  # the same rows whatever the mode
            record(side, f"rebuilt[{mode}]", delta, "uncached")
            norms = sentence_norms(delta, masks[side]).to(delta.device)
            record(side, f"random[{mode}]", _random_like(delta, masks[side], norms, gen), "uncached")
        if extra is not None:
            for name, delta in extra.deltas(ids, side, masks[side], criterion.adv_eps, criterion.project).items():
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
        parts.append(f"{side}: " + " ".join(items) + " (ratios to fresh: " + " ".join(ratios) + ")")
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
    res = probe_model(task, model, criterion, probe_ids(len(ds), n, criterion.space.seed), seed=criterion.space.seed)
    logger.info(summary_line(f"ARCH probe epoch {epoch - 1} ({n} sentences, model at the start of epoch {epoch})", res))
    return res
