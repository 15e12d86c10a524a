"""The generation lifecycle at an epoch start (rank 0): finish a finished refresh, check
that the cache belongs to this epoch (resume rules), start the generation of a refresh
epoch, search the neighbours of a reuse epoch (``--arch-neighbor-search epoch``).

Resume rules. The cache keeps one complete generation (the current one) and at most
one unfinished one. A run resumed from the right checkpoint finds the cache as the
interrupted run left it: a refresh of an earlier epoch is finalised, a refresh of this
epoch is resumed (the interrupted run's shards merged first, so that every shard holds
one process's rows only). Nothing on disk is changed before the checks: a run resumed
from the wrong (older) checkpoint must not cost the cache of the right one its
unfinished generation. An unfinished generation of a later epoch comes from an
abandoned run (resumed from an older checkpoint that still reads the current
generation): it is dropped and recomputed when training gets there.

Recovery. A damaged cache is refused with the advice to delete the cache dir. A reuse
epoch that then finds no generation at all (the dir deleted, or a new --arch-cache-dir)
recomputes one from the checkpoint: the epoch runs as a refresh (a fresh ascent, written
to ``gen-e<epoch>`` marked ``recovery`` in state.json; logged at WARNING and counted in
state.json's ``recoveries``). The schedule does not move: the reuse epochs up to the
next scheduled refresh read that generation, and that refresh blends into it. A
generation refreshed between the last scheduled refresh and this epoch is accepted
only with that mark; one of a later epoch is still refused (the cache is ahead).
"""

import logging
from typing import Optional, Tuple

from .. import cache_math
from .epoch_search import EpochSearch
from .files import CacheMismatchError
from .finalize import RefreshFinalizer
from .store import PerturbationCacheStore

logger = logging.getLogger(__name__)

AHEAD = ("the cache is ahead of the checkpoint (resumed from an older checkpoint?): resume "
         "from this run's newest checkpoint_last.pt, or start a new cache dir")
# advice that works: a reuse epoch that finds no generation recomputes one (recovers())
RECOMPUTE = ("delete the cache dir (or point --arch-cache-dir at a new one) and resume: the resumed epoch "
             "recomputes it from the checkpoint")


def check_epoch(cache_dir: str, epoch: int, mode: str, cur: Optional[dict], interval: int, first: int,
                schedule: str = "text") -> None:
    """Refuse a cache whose current generation (``cur``) cannot be this epoch's."""
    if mode == "off":
        # before --arch-first-refresh-epoch nothing is cached yet: a complete generation
        # can only come from a later point of training
        if cur is not None:
            raise CacheMismatchError(
                f"epoch {epoch} comes before the first refresh epoch {first} (--arch-first-refresh-epoch), "
                f"but {cache_dir} already holds the perturbations refreshed in epoch {cur['epoch']}: {AHEAD}")
    elif mode == "refresh":
        if cur is not None and cur["epoch"] >= epoch:
            raise CacheMismatchError(
                f"{cache_dir} already holds the perturbations refreshed in epoch {cur['epoch']}, but "
                f"training is at epoch {epoch}: {AHEAD}")
    else:
        want = cache_math.last_refresh_epoch(epoch, interval, first, schedule)
        if cur is None:  # but an unfinished generation of a later epoch (recovers() takes the rest)
            raise CacheMismatchError(
                f"epoch {epoch} reuses the perturbations of epoch {want}, but {cache_dir} holds no complete "
                f"generation, only an unfinished one of a later epoch: {AHEAD}")
        if cur["epoch"] == want:
            return
        if cur["epoch"] >= epoch:
            raise CacheMismatchError(
                f"epoch {epoch} reuses the perturbations of epoch {want}, but {cache_dir} holds those of "
                f"epoch {cur['epoch']}: {AHEAD}")
        if cur["epoch"] > want and cur.get("recovery"):
            return  # recomputed by a reuse epoch since the last scheduled refresh
        raise CacheMismatchError(
            f"epoch {epoch} reuses the perturbations of epoch {want}, but {cache_dir} holds those of epoch "
            f"{cur['epoch']}: the cache dir does not belong to this checkpoint (replaced, or written with "
            f"another --arch-refresh-interval / --arch-first-refresh-epoch?); {RECOMPUTE}")


def recovers(epoch: int, mode: str, state: dict) -> bool:
    """Whether reuse epoch ``epoch`` recomputes its generation (module docstring:
    Recovery): the cache dir holds no generation at all, or the one this epoch's
    interrupted recovery left unfinished."""
    if mode != "reuse" or state.get("current") is not None:
        return False
    ip = state.get("in_progress")
    return ip is None or (ip["epoch"] == epoch and bool(ip.get("recovery")))


def live_mode(epoch: int, mode: str, state: dict) -> str:
    """What epoch ``epoch`` does given state.json as :meth:`GenerationLifecycle.advance`
    left it (every rank gets that state): a recovering reuse epoch is a refresh."""
    ip = state.get("in_progress")
    if mode == "reuse" and ip is not None and ip["epoch"] == epoch:
        return "refresh"
    return mode


class GenerationLifecycle:
    def __init__(self, store: PerturbationCacheStore, finalizer: RefreshFinalizer, epoch_search: EpochSearch,
                 refresh_interval: int, first_refresh_epoch: int, schedule: str = "text"):
        self.store, self.finalizer, self.epoch_search = store, finalizer, epoch_search
        self.refresh_interval = refresh_interval
        self.first_refresh_epoch = first_refresh_epoch
        self.schedule = schedule  # cache_math.SCHEDULES: the paper's refresh epochs, or the official code's
        self.verified = False  # the current generation's checksums, once per process

    def mode(self, epoch: int) -> str:
        return cache_math.epoch_mode(epoch, self.refresh_interval, self.first_refresh_epoch, self.schedule)

    def advance(self, epoch: int, model) -> Tuple[dict, Optional[dict]]:
        """Rank 0: returns (the new state, the epoch search's info or None). The epoch
        runs as :func:`live_mode` of that state says."""
        store = self.store
        mode = self.mode(epoch)
        state = store.read_state()
        ip = state.get("in_progress")
        if ip is not None and ip["epoch"] < epoch:
            self.finalizer.finalize(ip, model)
            state = store.read_state()
        cur = state.get("current")
        if not self.verified and cur is not None:
            store.verify_generation(cur["name"])  # a resumed run reads it
            self.verified = True
        recovery = recovers(epoch, mode, state)
        if recovery:
            mode = "refresh"
            logger.warning(
                f"ARCH cache: {store.dir} holds no generation for reuse epoch {epoch} (deleted, or a new "
                f"--arch-cache-dir): " + ("recomputing it in this epoch from the checkpoint (a fresh ascent, as a "
                                          "refresh); the next epochs read it" if ip is None else
                                          "resuming its recomputation in this epoch"))
        check_epoch(store.dir, epoch, mode, cur, self.refresh_interval, self.first_refresh_epoch, self.schedule)
        if ip is not None and ip["epoch"] > epoch:
            logger.warning(f"ARCH cache: dropping the unfinished generation of epoch {ip['epoch']}")
            state["in_progress"] = None
            store.write_state(state)
            store.remove_generations_except([cur["name"]] if cur else [])
        if mode == "refresh":
            self._start_refresh(epoch, state, cur, recovery)
        info = None
        if mode == "reuse" and self.epoch_search.searches_in(epoch, cur):
            info = self.epoch_search.search_epoch(epoch, cur, model)
        # per-epoch neighbour tables of other epochs: older ones are no longer read, later
        # ones come from an abandoned run (and are recomputed when training gets there)
        store.epoch_tables.remove_except(keep=epoch if info is not None else None)
        return state, info

    def _start_refresh(self, epoch: int, state: dict, cur: Optional[dict], recovery: bool = False) -> None:
        store = self.store
        ip = state.get("in_progress")
        if ip is None or ip["epoch"] != epoch:
            name = store.gen_name(epoch)
            base = cur["name"] if cur else None
            if base is None and epoch > self.first_refresh_epoch and not recovery:
                logger.warning(f"ARCH cache: {store.dir} holds no generation for the refresh of epoch {epoch} to "
                               "blend into (deleted, or a new --arch-cache-dir): it starts from its fresh "
                               "perturbations alone, as the first refresh does")
            store.create_generation(name, base)
            state["in_progress"] = {"name": name, "epoch": epoch, "base": base}
            if recovery:
                # the mark that lets the next reuse epochs read it (check_epoch), and the count
                state["in_progress"]["recovery"] = True
                state["recoveries"] = int(state.get("recoveries", 0)) + 1
            store.write_state(state)
        else:
            # resumed inside this refresh epoch: fold in the rows the interrupted run
            # wrote (its shards), so that every shard holds one process's rows only
            store.merge_shards(ip["name"])
