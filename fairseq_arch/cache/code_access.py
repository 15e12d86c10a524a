"""``--arch-recipe code``: the cache as the official code uses it (fairseq_arch/code_recipe.py).
It stores each cached sentence's *displacement* (the ascent's final minus initial delta),
and rebuilds an uncached sentence as its neighbours' displacement averaged over tokens on
every position. The same files and generations as the text recipe (a generation's rows,
row means and neighbour table), read and written through these two functions instead of
``ReuseReader.read`` / ``RefreshWriter.store_fresh``."""

from typing import Optional, Tuple

import numpy as np
import torch

from .. import cache_math, code_recipe
from ..perturbation import rows_to_host, scatter_rows
from .access import RefreshWriter, ReuseReader
from .faults import fault_point


def _neighbor_vectors(means, neighbors, ids: np.ndarray) -> torch.Tensor:
    """n x 1 x C: the mean over K neighbours of their token-averaged rows (the row means)."""
    nbr = np.asarray(neighbors[ids], dtype=np.int64)  # n x K
    rows = np.asarray(means[nbr.reshape(-1)], dtype=np.float32).reshape(len(ids), nbr.shape[1], -1)
    return cache_math.rebuilt_vectors(torch.from_numpy(rows), [1] * len(ids)).unsqueeze(1)  # Eq. 3 unsized


def code_read(reader: ReuseReader, sample_ids, side: str, mask: torch.Tensor, eps: float) -> Tuple[torch.Tensor, int, int]:
    """A reuse batch's delta (B x T x C): cached displacements on their tokens, neighbour
    vectors on every position, capped at eps; (delta, #cached, #rebuilt)."""
    ids, pos = reader.positions(sample_ids)
    cached = pos >= 0
    rows = [None] * len(ids)
    vectors = [None] * len(ids)
    for b, r in zip(np.nonzero(cached)[0], reader.read_rows(side, pos[cached])):
        rows[b] = torch.from_numpy(r)
    other = np.nonzero(~cached)[0]
    if len(other):
        for b, v in zip(other, _neighbor_vectors(reader.means[side], reader.neighbors[side], ids[other])):
            vectors[b] = v
    fault_point(f"reuse_batch@{reader.epoch}")
    return code_recipe.code_reuse_delta(rows, vectors, mask, eps), int(cached.sum()), len(other)


def code_store(writer: RefreshWriter, sample_ids, side: str, displacement: torch.Tensor, mask: torch.Tensor,
               base_tables: Optional[Tuple[np.ndarray, np.ndarray]]) -> Optional[torch.Tensor]:
    """A refresh batch: store the cached sentences' new value, the EMA of the code
    (``d (1 - a) + prev a`` with the previous generation's displacement; ``d`` on the first
    refresh); return the value to add to the trained delta (B x T x C; uncached sentences
    ``d + a * prev``, prev their rebuilt vector), or None on the first refresh (no base:
    the trained delta is the ascent's final one). ``base_tables``: the base generation's
    (row means, neighbour table) of this side."""
    ids, pos = writer.positions(sample_ids)
    cached = pos >= 0
    cached_b, other_b = np.nonzero(cached)[0], np.nonzero(~cached)[0]
    if writer.base is None:
        value = displacement
    else:
        prev = torch.zeros_like(displacement)
        if len(cached_b):
            sel = torch.from_numpy(cached_b).to(displacement.device)
            prev_rows = writer.store.read_rows(writer.base, side, pos[cached_b])
            prev.index_copy_(0, sel, scatter_rows(prev_rows, mask.index_select(0, sel)))
        if len(other_b):
            vec = _neighbor_vectors(base_tables[0], base_tables[1], ids[other_b]).to(displacement.device)
            prev[torch.from_numpy(other_b).to(displacement.device)] = vec.expand(-1, displacement.size(1), -1)
        value = code_recipe.code_ema(displacement, prev, writer.ema, torch.from_numpy(cached).to(displacement.device))
    if len(cached_b):
        sel = torch.from_numpy(cached_b).to(displacement.device)
        mask_c = mask.index_select(0, sel)
        rows = rows_to_host(value.index_select(0, sel), mask_c, writer.store.lengths_all[side][ids[cached_b]])
        writer.store.write_rows(writer.generation, side, pos[cached_b], rows)
    fault_point(f"refresh_batch@{writer.epoch}")
    return None if writer.base is None else value
