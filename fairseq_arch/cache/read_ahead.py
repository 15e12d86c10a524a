"""Reuse-epoch reads prepared ahead of the step (issue 22).

A reuse batch's read has a host part (memory-mapped cached rows, Eq. 3 vectors from the
row means: :func:`host_read`) and a device part (one copy, expand, project:
:func:`finish`). On a GPU the host part (~6% of a reuse update) can run while the
previous batch trains: the task's batch iterator looks one batch ahead
(:class:`LookAhead`) and hands the batch's ids to the epoch's :class:`ReadAhead`, whose
one worker thread computes the host part of every perturbed side. The step takes it
by the batch's ids; a batch without one (ids that were never submitted, a failed
prefetch) is read synchronously and counted as a miss. Both paths run the same
:func:`host_read`, so the rows are bit for bit the same.

Thread safety: the worker only reads an immutable, complete generation (memory maps,
the reader's means / neighbour / size tables), and ``ArchCache.begin_epoch`` closes the
epoch's ReadAhead (cancels what has not started, waits for what has) before it closes
the maps or changes the generation.
"""

import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .. import cache_math
from ..perturbation import check_lengths, place_rows, to_device

logger = logging.getLogger(__name__)


@dataclass
class HostRead:
    """One side of a reuse batch, ready to go to the device: ``packed`` (float32; pinned
    when the model is on CUDA) holds the table (``rows x dim``: the cached sentences' token
    rows, then one Eq. 3 vector per rebuilt sentence), then each real token's table row and
    each sample's length as int32 bit patterns, so that one copy moves all three."""

    lengths: np.ndarray
    n_cached: int
    n_rebuilt: int
    rows: int
    dim: int
    packed: torch.Tensor


def host_read(reader, ids: np.ndarray, pos: np.ndarray, side: str, pin: bool) -> HostRead:
    """The host part of ``reader``'s read of one side (worker thread or step alike)."""
    lengths = reader.store.lengths_all[side][ids]  # real tokens per sample, from the data
    cached = pos >= 0
    cached_b, other_b = np.nonzero(cached)[0], np.nonzero(~cached)[0]
    table = reader.read_rows(side, pos[cached_b]) if len(cached_b) else []
    if len(other_b):
        table.append(reader.rebuilt_table(side, ids[other_b], lengths[other_b]))
    index = cache_math.row_sources(lengths, cached)
    dim = reader.store.dims[side]
    rows = sum(len(t) for t in table)
    size = rows * dim
    assert size + len(index) < 2 ** 31, "a batch's table is too large for int32 indices"
    packed = torch.empty(size + len(index) + len(lengths), dtype=torch.float32, pin_memory=pin)
    flat = packed.numpy()
    if table:
        np.concatenate(table, axis=0, out=flat[:size].reshape(rows, dim))
    flat[size: size + len(index)].view(np.int32)[:] = index
    flat[size + len(index):].view(np.int32)[:] = lengths
    return HostRead(lengths, len(cached_b), len(other_b), rows, dim, packed)


def finish(host: HostRead, mask: torch.Tensor, project) -> torch.Tensor:
    """The device part: B x T x C delta from a :class:`HostRead` (one non-blocking copy)."""
    if mask.device.type == "cpu":
        check_lengths(host.lengths, mask)  # exact, before anything is placed
    dev = to_device(host.packed, mask.device)
    size, tokens = host.rows * host.dim, int(host.lengths.sum())
    if mask.device.type != "cpu":
        check_lengths(host.lengths, mask, on_device=dev[size + tokens:].view(torch.int32))
    index = dev[size: size + tokens].view(torch.int32)
    flat = dev[:size].view(host.rows, host.dim).index_select(0, index)  # N x C, batch order
    return project(place_rows(flat, mask), mask)


class ReadStats:
    """Per epoch: reads served by a prefetch (``hits``) or synchronously (``misses``; one
    per side), seconds the step waited for them (a hit's wait, a miss's host read:
    ``wait_s``) and the host reads' own seconds wherever they ran (``host_s``)."""

    def __init__(self):
        self.hits = self.misses = 0
        self.wait_s = self.host_s = 0.0

    def __repr__(self):
        return (f"{self.hits} reads prepared ahead, {self.misses} synchronous; the steps waited "
                f"{self.wait_s:.3f}s of {self.host_s:.3f}s of host reads")


class ReadAhead:
    """Host reads of whole batches (every side) on one worker thread, keyed by the
    batch's ids (int64 bytes). ``work(ids)`` -> {side: HostRead}."""

    LIMIT = 32  # prepared batches kept (the lookahead is --update-freq + 1 batches deep)

    def __init__(self, work: Callable[[np.ndarray], Dict[str, HostRead]]):
        self._work = work
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(1, thread_name_prefix="arch-read-ahead")
        self._pending = OrderedDict()  # key -> [future, sides not taken yet]
        self.stats = ReadStats()

    def _timed_work(self, ids):
        t0 = time.perf_counter()
        out = self._work(ids)
        return out, time.perf_counter() - t0

    def submit(self, ids: np.ndarray) -> None:
        """Start reading batch ``ids`` (no-op once closed or when already submitted)."""
        key = ids.tobytes()
        if self._pool is None or key in self._pending:
            return
        while len(self._pending) >= self.LIMIT:  # a batch never read (skipped): drop the oldest
            self._pending.popitem(last=False)[1][0].cancel()
        self._pending[key] = [self._pool.submit(self._timed_work, ids.copy()), None]

    def take(self, ids: np.ndarray, side: str) -> Optional[HostRead]:
        """The prepared read of ``side`` of batch ``ids``, waiting for it if it is being
        made; None (counted) when there is none: the caller reads synchronously."""
        key = ids.tobytes()
        entry = self._pending.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        t0 = time.perf_counter()
        try:
            out, seconds = entry[0].result()
        except Exception:  # the synchronous read raises it again, where the step expects errors
            del self._pending[key]
            self.stats.misses += 1
            return None
        self.stats.wait_s += time.perf_counter() - t0
        if entry[1] is None:  # first side taken: the batch's host time counts once
            entry[1] = set(out)
            self.stats.host_s += seconds
        entry[1].discard(side)
        if not entry[1]:
            del self._pending[key]
        if side not in out:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return out[side]

    def close(self) -> None:
        """Cancel the reads not started, wait for the one running; later submits are no-ops."""
        if self._pool is None:
            return
        for fut, _ in self._pending.values():
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._pool = None
        self._pending.clear()

    @property
    def closed(self) -> bool:
        return self._pool is None


_HELD, _END = object(), object()


class _Failed:
    def __init__(self, error: Exception):
        self.error = error


class LookAhead:
    """The items of ``inner`` in order, one pulled ahead: when item t is handed out, item
    t + 1 has been pulled and ``hook`` called on it (item 0's hook just before it goes),
    so that its cache read runs while item t trains. An error pulling an item is raised
    when that item is asked for, as without the lookahead."""

    def __init__(self, inner, hook: Callable):
        self._src = inner
        self._itr = iter(inner)
        self._hook = hook
        self._next = _HELD  # nothing pulled yet

    def __len__(self):
        return len(self._src)

    def __iter__(self):
        return self

    def take(self, n):
        # fairseq's CountingIterator.take propagates a truncation (before any item is pulled)
        if hasattr(self._src, "take"):
            self._src.take(n)
        return self

    def _pull(self):
        try:
            item = next(self._itr)
        except StopIteration:
            return _END
        except Exception as e:  # noqa: BLE001 -- re-raised in order by __next__
            return _Failed(e)
        self._hook(item)
        return item

    def __next__(self):
        item = self._pull() if self._next is _HELD else self._next
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failed):
            self._next = _HELD
            raise item.error
        self._next = self._pull()
        return item


def look_ahead_in(epoch_itr, hook: Callable) -> None:
    """Make every epoch iterator of fairseq's ``epoch_itr`` (an EpochBatchIterator, also
    those made to resume mid-epoch) look one batch ahead, calling ``hook(batch)``. The
    lookahead sits under fairseq's CountingIterator, whose count (the checkpoint's
    iterations_in_epoch) stays that of the batches handed out. Idempotent."""
    if getattr(epoch_itr, "_arch_look_ahead", False) or not hasattr(epoch_itr, "_get_iterator_for_epoch"):
        return
    make = epoch_itr._get_iterator_for_epoch

    def looking_ahead(*args, **kwargs):
        itr = make(*args, **kwargs)
        if itr is not None and hasattr(itr, "_itr"):  # a CountingIterator (None: nothing left)
            itr._itr = LookAhead(itr._itr, hook)
        return itr

    epoch_itr._get_iterator_for_epoch = looking_ahead
    epoch_itr._arch_look_ahead = True
