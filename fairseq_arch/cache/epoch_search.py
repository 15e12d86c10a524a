"""``--arch-neighbor-search epoch``: every reuse epoch but the first after a refresh
searches the neighbours again at its start, from the embeddings at that time (the
generation's rows and means stay). The table lives in ``neighbors/e<epoch>`` (the
store's epoch tables, not the immutable generation), so a run resumed mid-epoch uses
the table of the epoch's start."""

import logging
import time
from typing import Optional, Tuple

import numpy as np
import torch

from .. import cache_math
from .search import NeighborSearch
from .store import PerturbationCacheStore

logger = logging.getLogger(__name__)


class EpochSearch:
    def __init__(self, store: PerturbationCacheStore, search: NeighborSearch, neighbor_search: str):
        assert neighbor_search in ("refresh", "epoch"), neighbor_search
        self.store, self.search = store, search
        self.enabled = neighbor_search == "epoch"

    def searches_in(self, epoch: int, cur: Optional[dict]) -> bool:
        """Whether reuse epoch ``epoch`` has its own neighbour table: every reuse epoch but
        the first after a refresh (whose generation's table was searched at that very
        epoch start, with the same parameters), unless the embeddings are a fixed file
        (the table cannot change)."""
        return (self.enabled and cur is not None and epoch > cur["epoch"] + 1
                and self.search.fixed_embeddings is None)

    def _previous_table(self, epoch: int, cur: dict, side: str) -> Optional[np.ndarray]:
        """The table epoch ``epoch - 1`` read (for the count of changed neighbours)."""
        if epoch - 1 == cur["epoch"] + 1 or self.search.fixed_embeddings is not None:
            return np.asarray(self.store.load_array(cur["name"], side, "neighbors"))
        if self.store.epoch_tables.load_info(epoch - 1, cur["name"], self.search.num_neighbors) is None:
            return None  # not kept (resumed from an older checkpoint): no comparison
        return self.store.epoch_tables.table(epoch - 1, side, mmap=False)

    def search_epoch(self, epoch: int, cur: dict, model) -> dict:
        """Rank 0: search this reuse epoch's neighbours from the embeddings at the epoch
        start and write them (a complete directory with checksums), or reuse the table
        already there. A run resumed from a mid-epoch checkpoint has the parameters of
        that checkpoint, not those of the epoch start: searching again would give
        another table than the uninterrupted run's, so the stored one is used."""
        store, tables_dir = self.store, self.store.epoch_tables
        info = tables_dir.load_info(epoch, cur["name"], self.search.num_neighbors)
        if info is not None:
            logger.info(f"ARCH cache: neighbours of epoch {epoch} from {tables_dir.epoch_dir(epoch)} (searched "
                        "at the epoch start)")
            return info
        t0 = time.perf_counter()
        tables, changed = {}, {}
        # the neighbours come from the cached rows the refresh wrote, as at finalisation
        with torch.no_grad():
            for side in store.sides:
                db = None
                if store.has_array(cur["name"], side, "neighbor_db"):
                    db = np.asarray(store.load_array(cur["name"], side, "neighbor_db"))
                tables[side] = self.search.compute_neighbors(side, model, epoch, db)
                prev = self._previous_table(epoch, cur, side)
                changed[side] = None if prev is None else cache_math.neighbor_changes(prev, tables[side])
        info = {"generation": cur["name"], "epoch": epoch, "k": self.search.num_neighbors,
                "search_seconds": time.perf_counter() - t0, "backend": self.search.last_backend,
                "changed": changed, "uncached": int((store.pos_of < 0).sum())}
        return tables_dir.save(epoch, tables, info)


def summarize(epoch: int, info: dict) -> Optional[Tuple[int, int]]:
    """Log an epoch search; returns (changed, uncached) over the sides compared (None
    when none was)."""
    parts, tot_changed, tot = [], 0, 0
    for side, c in info["changed"].items():
        if c is None:
            parts.append(f"{side} not compared (previous table not kept)")
            continue
        n = max(int(info["uncached"]), 1)
        parts.append(f"{side} {c} of {info['uncached']} ({c / n:.1%})")
        tot_changed, tot = tot_changed + c, tot + int(info["uncached"])
    logger.info(f"ARCH epoch {epoch}: neighbours searched again at the epoch start in "
                f"{info['search_seconds']:.2f}s ({info.get('backend', '')}); changed vs the previous epoch: "
                + ", ".join(parts))
    return (tot_changed, tot) if tot else None
