"""The per-batch hot path: an epoch's access to the cache. A refresh epoch writes
through a :class:`RefreshWriter` (Eq. 2), a reuse epoch reads through a
:class:`ReuseReader` (cached rows, Eq. 3 rebuilds); ``ArchCache.begin_epoch`` returns
the epoch's one."""

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import cache_math
from ..perturbation import rows_to_host, scatter_rows, to_device
from .faults import fault_point
from .read_ahead import HostRead, ReadAhead, ReadStats, finish, host_read
from .search import NeighborSearch
from .sizes import RebuildSizer
from .store import PerturbationCacheStore

ProjectFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _BatchPositions:
    """(host ids, cache positions; -1 = uncached) of a batch's sample ids (a sequence or
    an int tensor). Ids on a device come to the host once per batch, one sync that both
    sides' calls share."""

    def __init__(self, pos_of: np.ndarray):
        self.pos_of = pos_of
        self._memo: Optional[Tuple[torch.Tensor, np.ndarray]] = None

    def __call__(self, sample_ids) -> Tuple[np.ndarray, np.ndarray]:
        if torch.is_tensor(sample_ids):
            if self._memo is None or self._memo[0] is not sample_ids:
                self._memo = (sample_ids, sample_ids.cpu().numpy().astype(np.int64))
            ids = self._memo[1]
        else:
            ids = np.asarray(sample_ids, dtype=np.int64)
        return ids, self.pos_of[ids]


class ReuseReader:
    """Reads a complete generation: ``means[side]`` (M x C row means), ``neighbors[side]``
    (N x K cached positions; the generation's table or the epoch's own), ``sizes`` (the
    cached sentences' sizes, ``--arch-rebuild-norm neighbor`` only, else None)."""

    def __init__(self, store: PerturbationCacheStore, generation: str, search: NeighborSearch,
                 sizer: RebuildSizer, neighbors: Dict[str, np.ndarray], epoch: Optional[int]):
        assert store.is_complete(generation), f"generation {generation} is not complete"
        self.store = store
        self.generation = generation
        self.search = search
        self.sizer = sizer
        self.epoch = epoch
        self.means = {s: store.load_array(generation, s, "means") for s in store.sides}
        self.neighbors = neighbors
        self.sizes = sizer.load_sizes(store, generation)
        self.positions = _BatchPositions(store.pos_of)
        self.ahead: Optional[ReadAhead] = None  # enable_prefetch: reads prepared ahead of the step
        self._pin = False

    @property
    def rebuild_norm(self) -> str:
        return self.sizer.mode

    @property
    def dicts(self):
        return self.search.dicts

    def sentence_tokens(self, side: str, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(flat token ids, offsets) of dataset sentences ``ids``."""
        return self.search.sentence_tokens(side, ids)

    def embedding_matrix(self, side: str, model) -> torch.Tensor:
        return self.search.embedding_matrix(side, model)

    def read_rows(self, side: str, positions: Sequence[int]) -> List[np.ndarray]:
        """The generation's rows of cached ``positions`` (float32)."""
        return self.store.read_rows(self.generation, side, positions)

    def rebuild(self, neighbor_means: torch.Tensor, lengths, neighbor_sizes: Optional[torch.Tensor]):
        """Eq. 3 rows (``len_b x C`` per sentence) from B x K x C neighbour means."""
        return self.sizer.rows(neighbor_means, lengths, neighbor_sizes)

    def rebuilt_table(self, side: str, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One Eq. 3 vector per sentence ``ids`` (uncached): n x C."""
        nbr = np.asarray(self.neighbors[side][ids], dtype=np.int64)  # n x K
        means = np.asarray(self.means[side][nbr.reshape(-1)], dtype=np.float32)
        means = torch.from_numpy(means).view(len(ids), nbr.shape[1], -1)  # n x K x C
        sizes = None
        if self.sizes is not None:
            sizes = np.asarray(self.sizes[side][nbr.reshape(-1)], dtype=np.float32)
            sizes = torch.from_numpy(sizes).view(len(ids), nbr.shape[1])  # n x K
        return self.sizer.vectors(means, lengths, sizes).numpy()

    def enable_prefetch(self, pin: bool) -> None:
        """Prepare batches' host reads ahead on a worker thread (:mod:`.read_ahead`);
        ``pin``: into pinned memory (the model is on CUDA)."""
        if self.ahead is None:
            self._pin = bool(pin)
            self.ahead = ReadAhead(self._host_reads)

    def _host_reads(self, ids: np.ndarray) -> Dict[str, HostRead]:
        pos = self.store.pos_of[ids]
        return {s: host_read(self, ids, pos, s, self._pin) for s in self.store.sides}

    def prefetch(self, sample_ids) -> None:
        """Start the host read of a coming batch (its ``sample["id"]`` on the host)."""
        if self.ahead is not None:
            self.ahead.submit(np.asarray(sample_ids, dtype=np.int64))

    def close_prefetch(self) -> Optional[ReadStats]:
        """Stop preparing reads (the generation's maps may close next); the epoch's stats."""
        if self.ahead is None:
            return None
        self.ahead.close()
        return self.ahead.stats

    def read(self, sample_ids, side: str, mask: torch.Tensor, project: ProjectFn) -> Tuple[torch.Tensor, int, int]:
        """(delta B x T x C, #read from cache, #rebuilt from neighbours).
        The host reads the cached sentences' token rows (memory-mapped) and makes one Eq. 3
        vector per rebuilt sentence from the row means -- ahead of the step when a prefetch
        of these ids is ready (:mod:`.read_ahead`); that table (about p of the batch's
        tokens plus one row per rebuilt sentence), the index of each token's row and the
        lengths reach the device in one pinned, non-blocking copy, where the rows are
        expanded: the host never builds the rebuilt sentences' token rows (most of the
        batch; on a GPU that would make the read ~10% of a reuse update)."""
        ids, pos = self.positions(sample_ids)
        host = self.ahead.take(ids, side) if self.ahead is not None else None
        if host is None:
            t0 = time.perf_counter()
            host = host_read(self, ids, pos, side, pin=mask.device.type == "cuda")
            if self.ahead is not None:
                dt = time.perf_counter() - t0
                self.ahead.stats.wait_s += dt
                self.ahead.stats.host_s += dt
        delta = finish(host, mask, project)
        fault_point(f"reuse_batch@{self.epoch}")
        return delta, host.n_cached, host.n_rebuilt


class RefreshWriter:
    """Writes the generation of a refresh epoch (``generation``), blending into the rows of
    ``base`` (the current generation; None on the first refresh)."""

    def __init__(self, store: PerturbationCacheStore, generation: str, base: Optional[str], ema: float,
                 epoch: int):
        self.store = store
        self.generation = generation
        self.base = base
        self.ema = ema
        self.epoch = epoch
        self.stored_dtype = torch.float16 if store.dtype == np.float16 else torch.float32
        self.positions = _BatchPositions(store.pos_of)

    def store_fresh(self, sample_ids, side: str, fresh: torch.Tensor, mask: torch.Tensor,
                    project: ProjectFn) -> torch.Tensor:
        """Blend fresh perturbations of cached sentences into the new generation (Eq. 2,
        re-projected, rounded to the cache dtype) and return the perturbation to train on:
        the cache value for cached sentences (so refresh and reuse epochs apply the same
        numbers), the fresh one for the others. Device traffic: one pinned copy of the
        previous rows in, one copy of the new out."""
        ids, pos = self.positions(sample_ids)
        cached_b = np.nonzero(pos >= 0)[0]
        if len(cached_b) == 0:
            return fresh
        sel = to_device(torch.from_numpy(cached_b), fresh.device)
        mask_c = mask.index_select(0, sel)
        fresh_c = fresh.index_select(0, sel)
        base = None
        if self.base is not None:
            base = scatter_rows(self.store.read_rows(self.base, side, pos[cached_b]), mask_c)
        new_c = project(cache_math.ema_update(base, fresh_c, self.ema), mask_c)
        rows = rows_to_host(new_c, mask_c, self.store.lengths_all[side][ids[cached_b]])
        self.store.write_rows(self.generation, side, pos[cached_b], rows)
        fault_point(f"refresh_batch@{self.epoch}")
        # train on exactly what a reuse epoch will read back
        return fresh.index_copy(0, sel, project(new_c.to(self.stored_dtype).float(), mask_c))
