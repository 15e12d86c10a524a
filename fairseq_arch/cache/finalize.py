"""The end of a refresh (rank 0, at the next epoch start, the other ranks waiting):
merge the ranks' shards, fill the rows no batch wrote, compute the row means, sizes
and neighbour table, seal the generation and make it current."""

import logging
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .. import cache_math
from .faults import fault_point
from .search import NeighborSearch
from .sizes import RebuildSizer
from .store import PerturbationCacheStore

logger = logging.getLogger(__name__)


class RefreshFinalizer:
    def __init__(self, store: PerturbationCacheStore, search: NeighborSearch, sizer: RebuildSizer):
        self.store, self.search, self.sizer = store, search, sizer
        self.last_search_seconds: Optional[float] = None  # of the last finalisation, until read

    def fill_unwritten(self, name: str, side: str, model, epoch: int) -> Tuple[int, Optional[np.ndarray]]:
        """Cached rows that no batch of the refresh wrote: sentences fairseq's batching
        left out of training (the remainder of --required-batch-size-multiple, default
        8; with --skip-invalid-size-inputs-valid-test, sentences over the max positions
        or --max-tokens), batches skipped for non-finite values, or batches of a resumed
        epoch that another --max-tokens / world size re-batched. Their rows still hold
        the previous generation (stale) or zeros (first refresh), and a reuse epoch
        would train on them and hand them to neighbours. No fresh perturbation can be
        computed here (no batch, no criterion), so they are rebuilt from their K nearest
        *written* cached neighbours exactly as uncached sentences are (Eq. 3): an
        estimate of this refresh instead of a stale or zero one, stored in the row itself
        (projected onto the ball, as a read projects it) so that reads, means, neighbours
        and the next refresh's EMA need no special case. (Marking them as "rebuild at
        read" would also need the next EMA to skip them.) Returns (#filled, cached
        positions that were written, or None when all were)."""
        store = self.store
        written = store.written_flags(name, side)
        missing = np.nonzero(~written)[0]
        have = np.nonzero(written)[0]
        if len(missing) == 0:
            return 0, None
        if len(have) == 0:
            logger.warning(f"ARCH cache: no batch of the refresh in epoch {epoch} wrote a {side} row; "
                           "the cached rows are left as they were")
            return 0, None
        k = min(self.search.num_neighbors, len(have))
        nbr = self.search.nearest_cached(side, model, epoch, store.cached_ids[missing], have, k, salt=1)  # n x k
        rows_now = store.perturbation_rows(name, side)
        means = cache_math.row_means(rows_now, store.offsets[side])  # M x C
        # sized as uncached sentences are at read time (--arch-rebuild-norm)
        norms = None
        if self.sizer.mode == "neighbor":
            norms = torch.from_numpy(self.sizer.sizes_of(rows_now, store.offsets[side])[nbr])
        rows = self.sizer.rows(torch.from_numpy(means[nbr]), store.lengths[side][missing], norms)
        # stored as a read would use them: inside the ball (Eq. 3's mean row on every token
        # can be larger than the ball, e.g. a long sentence of a short neighbour's mean)
        rows = self.sizer.project_rows(rows)
        store.write_rows(name, side, missing, [r.numpy() for r in rows], mark_written=False)
        store.merge_shards(name)  # rank 0 holds the generation alone here
        return len(missing), have

    def _finish_side(self, name: str, side: str, model, epoch: int) -> Tuple[int, float]:
        """One side's fill, means, sizes and neighbours: (#filled, search seconds)."""
        store = self.store
        t1 = time.perf_counter()
        # idempotent: a finalisation cut short and redone fills the same rows the same
        # way (the flags are removed only once the generation is complete)
        filled, written = self.fill_unwritten(name, side, model, epoch)
        if filled:
            logger.warning(
                f"ARCH cache: {filled} of {store.num_cached} cached {side} rows got no fresh perturbation "
                f"in the refresh of epoch {epoch} (in no batch: fairseq's batching drops the remainder of "
                "--required-batch-size-multiple and, with --skip-invalid-size-inputs-valid-test, sentences over "
                "the max positions or --max-tokens; or skipped or re-batched on resume): rebuilt from their "
                "nearest written neighbours")
        search_s = time.perf_counter() - t1
        rows = store.perturbation_rows(name, side)
        store.save_array(name, side, "means", cache_math.row_means(rows, store.offsets[side]))
        # each cached sentence's size in the ball's measure: what --arch-rebuild-norm
        # neighbor gives its uncached neighbours (stored so that reads stay one lookup;
        # checksummed with the other files)
        store.save_array(name, side, "sizes", self.sizer.sizes_of(rows, store.offsets[side]))
        if written is not None:
            # the positions neighbours may come from, for the searches of
            # --arch-neighbor-search epoch in later epochs
            store.save_array(name, side, "neighbor_db", np.asarray(written, dtype=np.int64))
        t1 = time.perf_counter()
        # uncached sentences take their neighbours among the written rows only: a
        # filled row is itself a neighbour estimate
        store.save_array(name, side, "neighbors", self.search.compute_neighbors(side, model, epoch, written))
        return filled, search_s + time.perf_counter() - t1

    def finalize(self, in_progress: dict, model) -> None:
        """Seal the generation ``in_progress`` (state.json's entry) and make it current.
        A generation already sealed (a crash between its COMPLETE marker and state.json)
        only needs the switch."""
        store = self.store
        name, epoch = in_progress["name"], in_progress["epoch"]
        t0 = time.perf_counter()
        search_s = 0.0
        if not store.is_complete(name):
            # every rank's rows into the .bin files (and write flags) before anything reads them
            merged = store.merge_shards(name)
            logger.info(f"ARCH cache: merged the ranks' rows of epoch {epoch} ({merged} records) in "
                        f"{time.perf_counter() - t0:.2f}s")
            filled: Dict[str, int] = {}
            with torch.no_grad():
                for side in store.sides:
                    filled[side], seconds = self._finish_side(name, side, model, epoch)
                    search_s += seconds
                    fault_point(f"finalize@{epoch}")
            store.mark_complete(name, {"epoch": epoch, "search_seconds": search_s,
                                       "backend": self.search.last_backend, "filled": filled,
                                       "norm_measure": self.sizer.measure})
        self.last_search_seconds = search_s
        store.remove_written_flags(name)
        state = store.read_state()
        state["current"] = {"name": name, "epoch": epoch}
        if in_progress.get("recovery"):
            state["current"]["recovery"] = True  # recomputed by a reuse epoch (lifecycle.py: Recovery)
        state["in_progress"] = None
        store.write_state(state)
        store.remove_generations_except([name])
        logger.info(f"ARCH cache: generation of epoch {epoch} complete; neighbour search {search_s:.2f}s "
                    f"({self.search.last_backend}), total {time.perf_counter() - t0:.2f}s")
