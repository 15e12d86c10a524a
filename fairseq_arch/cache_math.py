"""Pure functions of ARCH's cache (paper Alg. 1-3, Eq. 2-4); no fairseq, no files.

- :func:`is_refresh_epoch`: the Tc schedule.
- :func:`ema_update`: Eq. 2, ``C <- alpha * C + (1 - alpha) * fresh``.
- :func:`row_means`: the word-averaged perturbation of each cached sentence.
- :func:`rebuild_from_neighbors`: Eq. 3, an uncached sentence's perturbation.
- :func:`sentence_vectors`: Eq. 4, mean word embedding of each sentence.
"""

from typing import Iterable, Optional, Sequence

import numpy as np
import torch


def is_refresh_epoch(epoch: int, interval: int) -> bool:
    """True on the epochs that compute fresh perturbations (1-based epochs).

    Epoch 1 is always a refresh (the paper's t = 0); then 1 + Tc, 1 + 2 Tc, ...
    ``interval == 0`` means "compute once, never refresh" (the paper's Tc = inf).
    """
    assert epoch >= 1, f"fairseq epochs start at 1, got {epoch}"
    assert interval >= 0, f"refresh interval must be >= 0, got {interval}"
    if interval == 0:
        return epoch == 1
    return (epoch - 1) % interval == 0


def last_refresh_epoch(epoch: int, interval: int) -> int:
    """The refresh epoch whose perturbations epoch ``epoch`` reads (itself on refresh epochs)."""
    assert epoch >= 1 and interval >= 0
    if interval == 0:
        return 1
    return 1 + ((epoch - 1) // interval) * interval


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


def row_means(flat_rows: np.ndarray, offsets: np.ndarray, chunk_rows: int = 1 << 20) -> np.ndarray:
    """Mean over tokens of each ragged row block: ``flat_rows[offsets[i]:offsets[i+1]]``.

    ``flat_rows`` may be a memory map: it is read in chunks of whole sentences, so
    memory stays bounded by ``chunk_rows x C``. Returns ``M x C`` float32.
    """
    m = len(offsets) - 1
    dim = flat_rows.shape[1]
    out = np.zeros((m, dim), dtype=np.float32)
    start = 0
    while start < m:
        # as many whole sentences as fit in one chunk (at least one)
        end = int(np.searchsorted(offsets, offsets[start] + chunk_rows, side="right")) - 1
        end = max(end, start + 1)
        end = min(end, m)
        lo, hi = int(offsets[start]), int(offsets[end])
        block = np.asarray(flat_rows[lo:hi], dtype=np.float32)
        rel = offsets[start:end] - lo
        lengths = np.diff(offsets[start : end + 1])
        nonempty = lengths > 0
        if hi > lo:
            sums = np.add.reduceat(block, rel[nonempty].astype(np.int64), axis=0)
            out[start:end][nonempty] = sums / lengths[nonempty, None]
        start = end
    return out


def rebuild_from_neighbors(neighbor_means: torch.Tensor, lengths: Sequence[int]) -> list:
    """Eq. 3: the perturbation of uncached sentence i is the mean, over its K
    neighbours j, of their word-averaged cached perturbations, put on every token.

    ``neighbor_means`` is ``B x K x C`` (row means of each sample's neighbours);
    returns a list of ``len_b x C`` rows (the caller projects them onto the ball).
    """
    assert neighbor_means.dim() == 3, "neighbor_means must be B x K x C"
    vec = neighbor_means.float().mean(dim=1)  # B x C
    return [vec[b].unsqueeze(0).expand(int(n), -1) for b, n in enumerate(lengths)]


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
