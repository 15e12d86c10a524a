"""ARCH's cache at training time (the façade the task uses): the epoch schedule
(Alg. 1), per-batch reads and EMA writes (Eq. 2, :mod:`.access`), neighbour rebuilds
(Eq. 3, :mod:`.sizes`) and the end-of-refresh neighbour search (Eq. 4,
:mod:`.search`). Files are in :mod:`.store`, the math in :mod:`fairseq_arch.cache_math`.

Timeline. Epochs before E (``--arch-first-refresh-epoch``) are *off*: plain label
smoothing, no cache. Epoch e is a *refresh* epoch when ``is_refresh_epoch(e, Tc, E)``
(E, E + Tc, E + 2 Tc, ...):
  - begin_epoch(e): a new generation ``gen-e<e>`` is created as a copy of the
    current one; batches write EMA-updated rows of their cached sentences into it
    (each rank into shards of its own, see :mod:`.shards`), reading the previous
    values from the current (immutable) generation.
  - begin_epoch(e + 1): rank 0 merges the ranks' shards into the new generation and
    finalises it (:mod:`.finalize`: row means, neighbours from the model's embeddings
    at that time, COMPLETE marker); it becomes current. The other ranks wait for it in
    the cache's collectives, on a process group with a long timeout
    (:mod:`fairseq_arch.distributed`).
Other epochs only read the current generation (a reuse epoch that finds none, the
cache dir deleted, recomputes it as a refresh: :mod:`.lifecycle`, Recovery): cached
sentences read their rows, the others get the mean of their K neighbours' row means
on every token, rescaled to a target size with ``--arch-rebuild-norm neighbor|eps``. With
``--arch-neighbor-search epoch`` every reuse epoch after the first of a generation
searches the neighbours again at its start (:mod:`.epoch_search`). A reuse epoch's
reads are prepared on a worker thread while the previous batch trains
(:mod:`.read_ahead`; ``--arch-prefetch off``, and on a CPU by default: in the step), closed at the next epoch start.
"""

import logging
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .. import cache_math
from ..distributed import all_gather_object, dist_info, on_rank0
from .access import RefreshWriter, ReuseReader
from .data_digest import tokens_digest
from .epoch_search import EpochSearch, summarize
from .files import CacheMismatchError
from .finalize import RefreshFinalizer
from .lifecycle import GenerationLifecycle, live_mode
from .search import NeighborSearch
from .sizes import RebuildSizer
from .store import PerturbationCacheStore

logger = logging.getLogger(__name__)


class ArchCache:
    """One training run's cache controller (one per rank)."""

    def __init__(
        self,
        cache_dir: str,
        dataset,
        src_dict,
        tgt_dict,
        *,
        refresh_interval: int,
        ema: float,
        fraction: float,
        num_neighbors: int,
        neighbor_embeddings: str,
        fixed_embeddings: Optional[Dict[str, torch.Tensor]],
        dtype: str,
        seed: int,
        sides: Sequence[str] = ("source", "target"),
        first_refresh_epoch: int = 1,
        rebuild_norm: str = "paper",
        neighbor_search: str = "refresh",
        ball: Tuple[float, str, str],
        schedule: str = "text",
        read_ahead: bool = False,
    ):
        self.cache_dir = cache_dir
        self.dataset = dataset
        self.dicts = {"source": src_dict, "target": tgt_dict}
        self.refresh_interval = refresh_interval
        self.ema = ema
        self.fraction = fraction
        self.num_neighbors = num_neighbors
        self.neighbor_embeddings = neighbor_embeddings
        self.fixed_embeddings = fixed_embeddings
        self.dtype = str(dtype)
        self.seed = seed
        self.sides = list(sides)
        self.first_refresh_epoch = int(first_refresh_epoch)
        assert schedule in cache_math.SCHEDULES, schedule
        self.schedule = schedule  # --arch-recipe: the paper's refresh epochs or the official code's
        # reuse reads prepared ahead of the step (.read_ahead); the code recipe reads its own way
        self.read_ahead = bool(read_ahead) and schedule == "text"
        # the criterion's ball (--adv-eps, --adv-norm, --adv-granularity): the measure in
        # which rebuilt sentences are rescaled and cached sentences' sizes stored
        self.sizer = RebuildSizer(rebuild_norm, ball)
        assert neighbor_search in ("refresh", "epoch"), neighbor_search
        self.neighbor_search = str(neighbor_search)
        self.rank = 0
        # made by open() (the model's embedding sizes give the rows' width)
        self.store: Optional[PerturbationCacheStore] = None
        self.search: Optional[NeighborSearch] = None
        self.lifecycle: Optional[GenerationLifecycle] = None
        self.epoch: Optional[int] = None
        self.mode: Optional[str] = None  # "off" | "refresh" | "reuse" once an epoch began
        self.access: Union[RefreshWriter, ReuseReader, None] = None  # the epoch's, None on off epochs
        self.state: Optional[dict] = None  # state.json as of the epoch start
        self.last_search_seconds = 0.0  # of the last finalisation (rank 0) or epoch search
        self.last_nbr_changed: Optional[Tuple[int, int]] = None  # (changed, uncached) of the last epoch search

    @property
    def rebuild_norm(self) -> str:
        return self.sizer.mode

    @property
    def last_search_backend(self) -> str:
        return self.search.last_backend if self.search is not None else ""

    def open(self, model) -> None:
        """Open the cache dir (every rank; once): rank 0 takes the dir for this job (a
        second job on it is refused, lock.py), creates or checks the layout -- every
        setting that changes what is stored, and the training tokens' digest -- and
        stamps the dir with a token of this process group; every rank must read the same
        token back, else the ranks do not share one cache dir (multi-node without a
        shared filesystem), and the same layout. Nothing else is written."""
        if self.store is not None:
            return
        from ..injection import embedding_modules

        dims = {s: int(m.embedding_dim) for s, m in embedding_modules(model).items() if s in self.sides}
        self.rank = dist_info()[0]
        sizer = self.sizer
        store = PerturbationCacheStore(self.cache_dir, self.dataset.src_sizes, self.dataset.tgt_sizes, dims,
                                       self.fraction, self.seed, self.dtype, self.num_neighbors, rank=self.rank,
                                       ball=(sizer.eps, sizer.norm, sizer.granularity), ema=self.ema,
                                       recipe=self.schedule, tokens=tokens_digest(self.dataset))
        token = on_rank0(store.create_or_check)  # CacheInUseError while another job holds the dir
        seen = all_gather_object(store.read_token())
        if any(t != token for t in seen):
            raise CacheMismatchError(
                f"--arch-cache-dir {self.cache_dir} is not the same directory on every rank "
                f"(tokens seen: {seen}): put it on a filesystem shared by all nodes")
        store.open_layout()
        self.store = store
        self.search = NeighborSearch(store, self.dataset, self.dicts, num_neighbors=self.num_neighbors,
                                     neighbor_embeddings=self.neighbor_embeddings,
                                     fixed_embeddings=self.fixed_embeddings, seed=self.seed)
        self.lifecycle = GenerationLifecycle(store, RefreshFinalizer(store, self.search, self.sizer),
                                             EpochSearch(store, self.search, self.neighbor_search),
                                             self.refresh_interval, self.first_refresh_epoch, self.schedule)
        logger.info(
            f"ARCH cache {self.cache_dir}: {store.num_cached} of {store.n_sentences} sentences cached "
            f"(p={self.fraction}), "
            + ", ".join(f"{s} {store.expected_bytes(s) / 2**20:.1f} MiB" for s in store.sides))

    def begin_epoch(self, epoch: int, model) -> Union[RefreshWriter, ReuseReader, None]:
        """Advance the cache to ``epoch`` (collective: every rank); returns the epoch's
        access (also ``self.access``): a RefreshWriter, a ReuseReader, or None (off)."""
        self.open(model)
        store = self.store
        self._stop_read_ahead()  # before the maps close and the generation changes under it
        # every rank's rows of the last epoch must be in its shards, closed (visible to
        # rank 0 on another node), before rank 0 merges them; rank 0 learns which shards
        # and how many bytes to expect (the gather is also the barrier)
        store.close_maps()
        store.expect_shards(all_gather_object(store.take_shard_sizes()))
        state, info = on_rank0(lambda: self.lifecycle.advance(epoch, model))
        finalizer = self.lifecycle.finalizer
        if finalizer.last_search_seconds is not None:  # rank 0 finalised a refresh
            self.last_search_seconds, finalizer.last_search_seconds = finalizer.last_search_seconds, None
        # the schedule's mode, but a reuse epoch that recomputes a deleted cache refreshes
        scheduled = self.lifecycle.mode(epoch)
        mode = live_mode(epoch, scheduled, state)
        self.epoch, self.mode, self.state = epoch, mode, state
        self.last_nbr_changed = None
        self.access = None
        if mode == "refresh":
            ip = state["in_progress"]
            self.access = RefreshWriter(store, ip["name"], ip["base"], self.ema, epoch)
        elif mode == "reuse":
            gen = state["current"]["name"]
            if info is None:
                neighbors = {s: store.load_array(gen, s, "neighbors") for s in store.sides}
            else:
                # every rank reads the table rank 0 searched (one result, whatever each
                # rank's search backend would have given)
                neighbors = {s: store.epoch_tables.table(epoch, s) for s in store.sides}
                self.last_search_seconds = float(info["search_seconds"])
                self.last_nbr_changed = summarize(epoch, info)
            self.access = ReuseReader(store, gen, self.search, self.sizer, neighbors, epoch)
            if self.read_ahead:
                self.access.enable_prefetch(pin=any(p.is_cuda for p in model.parameters()))
        what = {"refresh": "fresh ascent" + (", recomputing the missing cache" if mode != scheduled else ""),
                "reuse": "cache only",
                "off": f"plain label smoothing until --arch-first-refresh-epoch {self.first_refresh_epoch}"}
        logger.info(f"ARCH epoch {epoch}: {mode} ({what[mode]})")
        return self.access

    def prefetch(self, sample_ids) -> None:
        """A coming training batch (``sample["id"]`` on the host): on reuse epochs its read
        starts now, on a worker thread (--arch-prefetch off: never)."""
        if isinstance(self.access, ReuseReader):
            self.access.prefetch(sample_ids)

    def _stop_read_ahead(self) -> None:
        if isinstance(self.access, ReuseReader):
            stats = self.access.close_prefetch()
            if stats is not None and stats.hits + stats.misses:
                logger.info(f"ARCH epoch {self.epoch} reads: {stats}")

    def open_reader(self, rebuild_norm: Optional[str] = None) -> Optional[ReuseReader]:
        """A reader on the current complete generation whatever the live mode is, its
        rebuilds sized by ``rebuild_norm`` (default the cache's ``--arch-rebuild-norm``);
        None when there is no complete generation yet. The live cache is not touched:
        in a reuse epoch the reader shares the epoch's neighbour table, otherwise it
        reads the generation's."""
        if self.store is None:
            return None
        store = self.store
        cur = store.read_state().get("current")
        if cur is None or not store.is_complete(cur["name"]):
            return None
        live = self.access if isinstance(self.access, ReuseReader) and self.access.generation == cur["name"] else None
        neighbors = live.neighbors if live is not None else {
            s: store.load_array(cur["name"], s, "neighbors") for s in store.sides}
        sizer = self.sizer if rebuild_norm is None else self.sizer.with_mode(rebuild_norm)
        return ReuseReader(store, cur["name"], self.search, sizer, neighbors, self.epoch)

    def flush(self) -> bool:
        """Make this rank's cache writes durable (called on every rank when a checkpoint is
        saved, see checkpoint_flush); whether there was a generation being written."""
        if isinstance(self.access, RefreshWriter):
            self.store.flush(self.access.generation)
            return True
        return False

    def state_dict(self) -> dict:
        if self.store is None:
            return {}
        return {"cache_dir": self.cache_dir, "epoch": self.epoch, "mode": self.mode, "state": self.state}
