"""Pure functions of ARCH's cache (paper Alg. 1-3, Eq. 2-4); no fairseq, no files.

- :func:`is_refresh_epoch`, :func:`last_refresh_epoch`, :func:`epoch_mode`: the Tc schedule
  (starting at the first refresh epoch E; plain label smoothing before it).
- :func:`ema_update`: Eq. 2, ``C <- alpha * C + (1 - alpha) * fresh``.
- :func:`row_means`: the word-averaged perturbation of each cached sentence.
- :func:`row_norms`: the size of each cached sentence's perturbation, in the ball's measure.
- :func:`rebuild_from_neighbors`: Eq. 3, an uncached sentence's perturbation, optionally
  rescaled to a target size (:func:`rebuilt_norms`, :func:`rebuild_targets`).
- :func:`sentence_vectors`: Eq. 4, mean word embedding of each sentence.
- :func:`neighbor_changes`: how many rows of a neighbour table changed.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .code_recipe import code_last_refresh_epoch, is_code_refresh_epoch

REBUILD_NORMS = ("paper", "neighbor", "eps")

# Smallest size we divide by: a zero mean row stays zero instead of becoming NaN
_TINY = 1e-12


SCHEDULES = ("text", "code")


def is_refresh_epoch(epoch: int, interval: int, first: int = 1, schedule: str = "text") -> bool:
    """True on the epochs that compute fresh perturbations (1-based epochs).

    ``text`` (the paper): epoch ``first`` (E, default 1: the paper's t = 0) is always a
    refresh; then E + Tc, E + 2 Tc, ...; ``interval == 0`` means "compute once, never
    refresh" (the paper's Tc = inf). Epochs before E are not ARCH epochs at all.
    ``code`` (the official code, E = 1 only): epoch 1, then Tc, 2 Tc, ...
    """
    assert epoch >= 1, f"fairseq epochs start at 1, got {epoch}"
    assert interval >= 0, f"refresh interval must be >= 0, got {interval}"
    assert first >= 1, f"the first refresh epoch must be >= 1, got {first}"
    assert schedule in SCHEDULES and (schedule == "text" or first == 1), (schedule, first)
    if schedule == "code":
        return is_code_refresh_epoch(epoch, interval)
    if epoch < first:
        return False
    if interval == 0:
        return epoch == first
    return (epoch - first) % interval == 0


def last_refresh_epoch(epoch: int, interval: int, first: int = 1, schedule: str = "text") -> Optional[int]:
    """The refresh epoch whose perturbations epoch ``epoch`` reads (itself on refresh
    epochs); None before the first refresh epoch (nothing to read)."""
    assert epoch >= 1 and interval >= 0 and first >= 1
    if schedule == "code":
        return code_last_refresh_epoch(epoch, interval)
    if epoch < first:
        return None
    if interval == 0:
        return first
    return first + ((epoch - first) // interval) * interval


def epoch_mode(epoch: int, interval: int, first: int = 1, schedule: str = "text") -> str:
    """What the criterion does in ``epoch``: ``"off"`` (before the first refresh epoch:
    plain label-smoothed CE), ``"refresh"`` (fresh ascent, written to the cache) or
    ``"reuse"`` (cache reads and neighbour rebuilds only)."""
    if epoch < first:
        return "off"
    return "refresh" if is_refresh_epoch(epoch, interval, first, schedule) else "reuse"


def ema_update(cached: Optional[torch.Tensor], fresh: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 2 of the paper. ``cached is None`` on the first refresh: store fresh as is.

    The caller re-projects the result onto the eps-ball (a convex combination of
    points in a ball stays in it mathematically, but not always after rounding to
    the cache dtype).
    """
    assert 0.0 <= alpha < 1.0, f"alpha must be in [0, 1), got {alpha}"
    if cached is None:
        return fresh.float()
    assert cached.shape == fresh.shape, f"cache row {tuple(cached.shape)} vs fresh {tuple(fresh.shape)}"
    return alpha * cached.float() + (1.0 - alpha) * fresh.float()


# float32 bytes of one chunk of :func:`_sentence_chunks` by default. Sized in bytes, not
# rows: 2**20 rows were a 4 GiB block at d=1024, and the finalisation's means and sizes
# ran 2-3x slower than in 64 MiB blocks (issue 22, benchmarks/refresh_scale.py); whole
# sentences per chunk, so the values do not depend on it
CHUNK_BYTES = 64 << 20


def _chunk_bounds(offsets: np.ndarray, dim: int, chunk_rows: Optional[int]):
    """(start, end) of the chunks of whole sentences of the ragged blocks
    ``offsets[i]:offsets[i+1]``: as many sentences as fit in ``chunk_rows`` rows (default
    :data:`CHUNK_BYTES` of float32), at least one; chunks without rows are left out."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * max(int(dim), 1)))
    m = len(offsets) - 1
    bounds, start = [], 0
    while start < m:
        end = int(np.searchsorted(offsets, offsets[start] + chunk_rows, side="right")) - 1
        end = min(max(end, start + 1), m)
        if offsets[end] > offsets[start]:
            bounds.append((start, end))
        start = end
    return bounds


def host_threads() -> int:
    """Threads for the chunked reductions: the CPUs this process may run on, at most 8 (each
    thread holds one float32 chunk and its temporaries)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _each_chunk(flat_rows: np.ndarray, offsets: np.ndarray, chunk_rows: Optional[int], work,
                threads: Optional[int] = None) -> None:
    """``work(start, end, block, starts, lengths)`` for every chunk of whole sentences
    (:func:`_chunk_bounds`): ``block`` the float32 rows of sentences ``start:end``, ``starts``
    where each begins in it and ``lengths`` their rows. ``flat_rows`` may be a memory map:
    memory stays bounded by ``threads x chunk_rows x C``. The chunks run on ``threads``
    threads (default :func:`host_threads`; numpy releases the GIL in the float16 reads and
    the reductions); each chunk is computed alone and ``work`` writes its own rows, so the
    values are the same bits whatever the thread count."""

    def run(bounds):
        start, end = bounds
        lo, hi = int(offsets[start]), int(offsets[end])
        block = np.asarray(flat_rows[lo:hi], dtype=np.float32)
        work(start, end, block, (offsets[start:end] - lo).astype(np.int64), np.diff(offsets[start: end + 1]))

    chunks = _chunk_bounds(offsets, flat_rows.shape[1], chunk_rows)
    threads = min(host_threads() if threads is None else threads, len(chunks))
    if threads <= 1:
        for bounds in chunks:
            run(bounds)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(run, chunks):  # re-raises a chunk's error
            pass


def row_means(flat_rows: np.ndarray, offsets: np.ndarray, chunk_rows: Optional[int] = None,
              threads: Optional[int] = None) -> np.ndarray:
    """Mean over tokens of each ragged row block: ``flat_rows[offsets[i]:offsets[i+1]]``,
    read in chunks of whole sentences (:func:`_each_chunk`). Returns ``M x C`` float32
    (zeros for an empty block)."""
    out = np.zeros((len(offsets) - 1, flat_rows.shape[1]), dtype=np.float32)

    def work(start, end, block, starts, lengths):
        nonempty = lengths > 0
        sums = np.add.reduceat(block, starts[nonempty], axis=0)
        out[start:end][nonempty] = sums / lengths[nonempty, None]

    _each_chunk(flat_rows, offsets, chunk_rows, work, threads)
    return out


def row_norms(flat_rows: np.ndarray, offsets: np.ndarray, norm: str = "l2", granularity: str = "sentence",
              chunk_rows: Optional[int] = None, threads: Optional[int] = None) -> np.ndarray:
    """Size of each ragged row block ``flat_rows[offsets[i]:offsets[i+1]]`` in the
    measure of the perturbation ball (the criterion's ``--adv-norm`` and
    ``--adv-granularity``, as in :func:`fairseq_arch.perturbation.project`):

    - sentence, l2: the l2 norm of the whole sentence (all tokens);
    - sentence, linf: the largest absolute coordinate of the sentence;
    - word, l2 / linf: the mean over tokens of each token's l2 norm / largest absolute
      coordinate (the word ball bounds every token; the mean is what a sentence that
      carries one vector on every token, like a rebuilt one, can match).

    Read in chunks of whole sentences like :func:`row_means`; an empty block has size 0.
    Returns ``M`` float32.
    """
    assert norm in ("l2", "linf") and granularity in ("sentence", "word"), (norm, granularity)
    out = np.zeros(len(offsets) - 1, dtype=np.float32)

    def work(start, end, block, starts, lengths):
        nonempty = lengths > 0
        if norm == "l2":
            per_token = np.sqrt(np.square(block).sum(axis=1)) if granularity == "word" else np.square(block).sum(axis=1)
        else:
            per_token = np.abs(block).max(axis=1)
        if granularity == "word":
            vals = np.add.reduceat(per_token, starts[nonempty]) / lengths[nonempty]
        elif norm == "l2":
            vals = np.sqrt(np.add.reduceat(per_token, starts[nonempty]))
        else:
            vals = np.maximum.reduceat(per_token, starts[nonempty])
        out[start:end][nonempty] = vals

    _each_chunk(flat_rows, offsets, chunk_rows, work, threads)
    return out


def rebuilt_norms(vec: torch.Tensor, lengths: Sequence[int], norm: str = "l2",
                  granularity: str = "sentence") -> torch.Tensor:
    """Size, in :func:`row_norms`' measure, of the sentences that carry vector
    ``vec[b]`` (``B x C``) on each of their ``lengths[b]`` tokens: sentence l2 is
    ``sqrt(len) ||v||``; the other measures do not depend on the length."""
    v = vec.float()
    per_token = v.norm(dim=-1) if norm == "l2" else v.abs().amax(dim=-1)
    if norm == "l2" and granularity == "sentence":
        n = torch.as_tensor([float(x) for x in lengths], dtype=per_token.dtype, device=per_token.device)
        return per_token * n.sqrt()
    return per_token


def rebuild_targets(mode: str, neighbor_norms: Optional[torch.Tensor], eps: float) -> Optional[torch.Tensor]:
    """Target size of each rebuilt sentence for ``--arch-rebuild-norm``:

    - ``paper``: None (Eq. 3 as published: the mean row, whatever its size; averaging
      rows that point different ways cancels part of their length);
    - ``neighbor``: the mean over the K neighbours of their cached sentence sizes
      (``neighbor_norms`` is ``B x K``);
    - ``eps``: the radius of the ball, for every sentence.
    """
    assert mode in REBUILD_NORMS, f"rebuild norm must be one of {REBUILD_NORMS}, got {mode!r}"
    if mode == "paper":
        return None
    assert neighbor_norms is not None and neighbor_norms.dim() == 2, "neighbor_norms must be B x K"
    if mode == "neighbor":
        return neighbor_norms.float().mean(dim=1)
    return torch.full((neighbor_norms.size(0),), float(eps), dtype=torch.float32, device=neighbor_norms.device)


def rebuild_from_neighbors(neighbor_means: torch.Tensor, lengths: Sequence[int],
                           target_norms: Optional[torch.Tensor] = None, norm: str = "l2",
                           granularity: str = "sentence") -> list:
    """Eq. 3: the perturbation of uncached sentence i is the mean, over its K
    neighbours j, of their word-averaged cached perturbations, put on every token.

    ``neighbor_means`` is ``B x K x C`` (row means of each sample's neighbours);
    returns a list of ``len_b x C`` rows (the caller projects them onto the ball).
    With ``target_norms`` (``B``), each sentence is rescaled so that its size in the
    ``norm``/``granularity`` measure (:func:`rebuilt_norms`) equals its target; the
    direction stays Eq. 3's. A zero mean row has no direction and stays zero.
    """
    return expand_vectors(rebuilt_vectors(neighbor_means, lengths, target_norms, norm, granularity), lengths)


def expand_vectors(vec: torch.Tensor, lengths: Sequence[int]) -> list:
    """Vector b of ``vec`` (B x C) on each of sentence b's ``lengths[b]`` tokens: the
    ``len_b x C`` rows of rebuilt sentences (views, no copy)."""
    return [vec[b].unsqueeze(0).expand(int(n), -1) for b, n in enumerate(lengths)]


def rebuilt_vectors(neighbor_means: torch.Tensor, lengths: Sequence[int],
                    target_norms: Optional[torch.Tensor] = None, norm: str = "l2",
                    granularity: str = "sentence") -> torch.Tensor:
    """The ``B x C`` vectors :func:`rebuild_from_neighbors` puts on every token of each
    sentence (the form a batch sends to the device: one vector per sentence, not one per
    token)."""
    assert neighbor_means.dim() == 3, "neighbor_means must be B x K x C"
    vec = neighbor_means.float().mean(dim=1)  # B x C
    if target_norms is not None:
        have = rebuilt_norms(vec, lengths, norm, granularity)
        scale = torch.where(have > _TINY, target_norms.float().to(vec.device) / have.clamp_min(_TINY),
                            torch.zeros_like(have))
        vec = vec * scale.unsqueeze(-1)
    return vec


def row_sources(lengths: Sequence[int], rowwise: Sequence[bool]) -> np.ndarray:
    """For the real tokens of a batch (samples in order, ``lengths[b]`` tokens each),
    the row of a table that holds their perturbation: the table is the token rows of the
    ``rowwise`` samples (cached: one row per token), concatenated in batch order, then one
    vector per other sample (rebuilt: the same vector on every token), in batch order.
    ``sum(lengths)`` int64 indices; ``table[row_sources(...)]`` are the batch's rows."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rowwise = np.asarray(rowwise, dtype=bool)
    assert lengths.shape == rowwise.shape, f"{lengths.shape} lengths, {rowwise.shape} flags"
    n_rows = int(lengths[rowwise].sum())
    # first table row of each sample: cached samples at their running offset, the others at
    # their vector's row after all cached rows
    start = np.where(rowwise, np.cumsum(np.where(rowwise, lengths, 0)) - np.where(rowwise, lengths, 0),
                     n_rows + np.cumsum(~rowwise) - 1)
    token_start = np.cumsum(lengths) - lengths  # each sample's first token in the batch
    rank = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(token_start, lengths)  # token within sample
    return np.repeat(start, lengths) + rank * np.repeat(rowwise.astype(np.int64), lengths)


def neighbor_changes(old: Optional[np.ndarray], new: np.ndarray) -> int:
    """Rows of a neighbour table (N x K) whose set of neighbours differs (order
    ignored: the rebuild averages them); -1 rows (cached sentences) never differ.
    ``old is None``: nothing to compare, 0."""
    if old is None:
        return 0
    assert old.shape == new.shape, f"neighbour tables {old.shape} vs {new.shape}"
    return int(np.any(np.sort(old, axis=1) != np.sort(new, axis=1), axis=1).sum())


def sentence_vectors(
    flat_tokens: np.ndarray,
    offsets: np.ndarray,
    embeddings: torch.Tensor,
    ignore: Iterable[int] = (),
) -> torch.Tensor:
    """Eq. 4: mean word embedding of each sentence (``N x C`` float32), computed on
    the device of ``embeddings``. Tokens in ``ignore`` (pad, eos, bos) are not words
    and are left out; a sentence with no word gets the zero vector.
    """
    tokens = torch.as_tensor(np.asarray(flat_tokens, dtype=np.int64))
    offs = torch.as_tensor(np.asarray(offsets, dtype=np.int64))
    n = len(offs) - 1
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for t in ignore:
        keep &= tokens.ne(int(t))
    # per-sentence word counts after dropping the specials, as new bag offsets
    kept_before = torch.cat([torch.zeros(1, dtype=torch.long), keep.long().cumsum(0)])
    bag_offsets = kept_before[offs[:-1]]
    device = embeddings.device
    # embedding_bag never materialises the tokens x C matrix of all looked-up rows
    return torch.nn.functional.embedding_bag(
        tokens[keep].to(device), embeddings.detach().float(), bag_offsets.to(device), mode="mean")
