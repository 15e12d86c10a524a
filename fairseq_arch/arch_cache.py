"""ARCH's cache at training time: the epoch schedule (Alg. 1), per-batch reads and
EMA writes (Eq. 2), neighbour rebuilds (Eq. 3) and the end-of-refresh neighbour
search (Eq. 4). Files are in :mod:`cache_store`, the math in :mod:`cache_math`.

Timeline. Epochs before E (``--arch-first-refresh-epoch``) are *off*: plain label
smoothing, no cache. Epoch e is a *refresh* epoch when ``is_refresh_epoch(e, Tc, E)``
(E, E + Tc, E + 2 Tc, ...):
  - begin_epoch(e): a new generation ``gen-e<e>`` is created as a copy of the
    current one; batches write EMA-updated rows of their cached sentences into it
    (each rank into shards of its own, see :mod:`cache_store`), reading the previous
    values from the current (immutable) generation.
  - begin_epoch(e + 1): rank 0 merges the ranks' shards into the new generation and
    finalises it (row means, neighbours from the model's embeddings at that time,
    COMPLETE marker); it becomes current. The other ranks wait for it in the cache's
    collectives, on a process group with a long timeout (:mod:`distributed`).
Other epochs only read the current generation: cached sentences read their rows,
the others get the mean of their K neighbours' row means on every token, rescaled
to a target size with ``--arch-rebuild-norm neighbor|eps``. With
``--arch-neighbor-search epoch`` every reuse epoch after the first of a generation
searches the neighbours again at its start (the generation's rows and means stay);
that table lives in ``<cache dir>/neighbors/e<epoch>`` (not in the immutable
generation), so a run resumed mid-epoch uses the table of the epoch's start.
"""

import json
import os
import shutil

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import cache_math
from .cache_store import (CacheMismatchError, PerturbationCacheStore, _atomic_write_json, fault_point,
                          file_crc32)
from .distributed import all_gather_object, dist_info, on_rank0
from .neighbors import CosineIndex, choose_backend
from .perturbation import check_lengths, place_rows, rows_to_host, scatter_rows, to_device

logger = logging.getLogger(__name__)

ProjectFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# sentences per chunk of the neighbour search: bounds memory at chunk x C floats
NEIGHBOR_CHUNK = 32768


def load_embedding_matrix(path: str) -> Dict[str, torch.Tensor]:
    """Word-embedding matrices for Eq. 4 from a file: a fairseq checkpoint (its
    encoder/decoder ``embed_tokens``), a ``.npy`` matrix, or a ``.pt`` tensor or dict
    with ``source``/``target`` tensors. Returns ``{"source": W, "target": W}``."""
    if path.endswith(".npy"):
        w = torch.from_numpy(np.load(path)).float()
        return {"source": w, "target": w}
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if torch.is_tensor(obj):
        return {"source": obj.float(), "target": obj.float()}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
        keys = {"source": "encoder.embed_tokens.weight", "target": "decoder.embed_tokens.weight"}
        missing = [k for k in keys.values() if k not in sd]
        if missing:
            raise ValueError(f"--arch-neighbor-embeddings {path}: checkpoint has no {missing}")
        return {s: sd[k].float() for s, k in keys.items()}
    if isinstance(obj, dict) and "source" in obj and "target" in obj:
        return {"source": torch.as_tensor(obj["source"]).float(),
                "target": torch.as_tensor(obj["target"]).float()}
    raise ValueError(
        f"--arch-neighbor-embeddings {path}: expected a fairseq checkpoint, a .npy matrix, "
        "or a .pt tensor / dict with 'source' and 'target'"
    )


class ReuseReader:
    """A reuse epoch's access to the cache: ``read`` (cached rows, neighbour rebuilds)."""

    def __init__(self, cache: "ArchCache"):
        self._cache = cache

    def read(self, sample_ids, side: str, mask: torch.Tensor, project: ProjectFn) -> Tuple[torch.Tensor, int, int]:
        return self._cache.read(sample_ids, side, mask, project)


class RefreshWriter:
    """A refresh epoch's access to the cache: ``store_fresh`` (EMA writes)."""

    def __init__(self, cache: "ArchCache"):
        self._cache = cache

    def store_fresh(self, sample_ids, side: str, fresh: torch.Tensor, mask: torch.Tensor,
                    project: ProjectFn) -> torch.Tensor:
        return self._cache.store_fresh(sample_ids, side, fresh, mask, project)


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
        ball: Tuple[float, str, str] = (0.1, "l2", "sentence"),
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
        assert rebuild_norm in cache_math.REBUILD_NORMS, rebuild_norm
        self.rebuild_norm = str(rebuild_norm)
        assert neighbor_search in ("refresh", "epoch"), neighbor_search
        self.neighbor_search = str(neighbor_search)
        # the criterion's ball (--adv-eps, --adv-norm, --adv-granularity): the measure
        # in which rebuilt sentences are rescaled and cached sentences' sizes stored
        self.ball_eps, self.ball_norm, self.ball_granularity = float(ball[0]), str(ball[1]), str(ball[2])
        self.last_nbr_changed: Optional[Tuple[int, int]] = None  # (changed, uncached) of the last epoch search
        self.norms: Optional[Dict[str, np.ndarray]] = None  # side -> cached sentence sizes (rebuild norm neighbor)
        self.store: Optional[PerturbationCacheStore] = None
        self.epoch: Optional[int] = None
        self.mode: Optional[str] = None
        self.last_search_seconds = 0.0
        self.last_search_backend = ""
        self.last_filled: Dict[str, int] = {}  # side -> cached rows filled at the last finalisation
        self.access = None  # the epoch's RefreshWriter / ReuseReader (None on off epochs)

    # -- epoch level ------------------------------------------------------------

    def _setup(self, model) -> None:
        from .injection import embedding_modules

        emb = embedding_modules(model)
        dims = {s: int(m.embedding_dim) for s, m in emb.items() if s in self.sides}
        self.rank, self.world_size = dist_info()
        self.store = PerturbationCacheStore(
            self.cache_dir, self.dataset.src_sizes, self.dataset.tgt_sizes, dims,
            self.fraction, self.seed, self.dtype, self.num_neighbors, rank=self.rank,
        )
        # rank 0 creates or checks the layout and stamps the dir with a token of this
        # process group; every rank must read the same token back, else the ranks do
        # not share one cache dir (multi-node without a shared filesystem).
        token = on_rank0(self.store.create_or_check)
        seen = all_gather_object(self.store.read_token())
        if any(t != token for t in seen):
            raise CacheMismatchError(
                f"--arch-cache-dir {self.cache_dir} is not the same directory on every rank "
                f"(tokens seen: {seen}): put it on a filesystem shared by all nodes"
            )
        self.store.open_layout()
        self._verified = False
        logger.info(
            f"ARCH cache {self.cache_dir}: {self.store.num_cached} of {self.store.n_sentences} "
            f"sentences cached (p={self.fraction}), "
            + ", ".join(f"{s} {self.store.expected_bytes(s) / 2**20:.1f} MiB" for s in self.store.sides)
        )

    def _mode(self, epoch: int) -> str:
        return cache_math.epoch_mode(epoch, self.refresh_interval, self.first_refresh_epoch)

    def _advance(self, epoch: int, model) -> Tuple[dict, Optional[dict]]:
        """Rank 0: finalise a finished refresh, check the cache belongs to this epoch,
        start the generation of a refresh epoch, search the neighbours of a reuse epoch
        (``--arch-neighbor-search epoch``). Returns (the new state, the epoch search's info)."""
        store = self.store
        mode = self._mode(epoch)
        refresh = mode == "refresh"
        state = store.read_state()
        ip = state.get("in_progress")
        if ip is not None and ip["epoch"] < epoch:
            self._finalize(ip, model)
            state = store.read_state()
        cur = state.get("current")
        if not self._verified and cur is not None:
            store.verify_generation(cur["name"])  # once per process: a resumed run reads it
            self._verified = True
        # refuse before changing anything on disk: a run resumed from the wrong (older)
        # checkpoint must not cost the cache of the right one its unfinished generation
        ahead = ("the cache is ahead of the checkpoint (resumed from an older checkpoint?): resume "
                 "from this run's newest checkpoint_last.pt, or start a new cache dir")
        if mode == "off":
            # before --arch-first-refresh-epoch nothing is cached yet: a complete
            # generation can only come from a later point of training
            if cur is not None:
                raise CacheMismatchError(
                    f"epoch {epoch} comes before the first refresh epoch {self.first_refresh_epoch} "
                    f"(--arch-first-refresh-epoch), but {self.cache_dir} already holds the perturbations "
                    f"refreshed in epoch {cur['epoch']}: {ahead}"
                )
        elif refresh:
            if cur is not None and cur["epoch"] >= epoch:
                raise CacheMismatchError(
                    f"{self.cache_dir} already holds the perturbations refreshed in epoch "
                    f"{cur['epoch']}, but training is at epoch {epoch}: {ahead}"
                )
        else:
            want = cache_math.last_refresh_epoch(epoch, self.refresh_interval, self.first_refresh_epoch)
            if cur is None or cur["epoch"] != want:
                raise CacheMismatchError(
                    f"epoch {epoch} reuses the perturbations of epoch {want}, but "
                    f"{self.cache_dir} holds {('those of epoch %d' % cur['epoch']) if cur else 'none'}: "
                    + (ahead if cur is not None and cur["epoch"] > want else
                       "the cache dir does not belong to this checkpoint (deleted or replaced?)")
                )
        if ip is not None and ip["epoch"] > epoch:
            # a refresh of a later epoch from an abandoned run (resumed from an older
            # checkpoint that still reads the current generation): it will be
            # recomputed when training gets there
            logger.warning(f"ARCH cache: dropping the unfinished generation of epoch {ip['epoch']}")
            state["in_progress"] = None
            store.write_state(state)
            store.remove_generations_except([cur["name"]] if cur else [])
        if refresh:
            ip = state.get("in_progress")
            if ip is None or ip["epoch"] != epoch:
                name = store.gen_name(epoch)
                store.create_generation(name, cur["name"] if cur else None)
                state["in_progress"] = {"name": name, "epoch": epoch, "base": cur["name"] if cur else None}
                store.write_state(state)
            else:
                # resumed inside this refresh epoch: fold in the rows the interrupted run
                # wrote (its shards), so that every shard holds one process's rows only
                store.merge_shards(ip["name"])
        info = None
        if mode == "reuse" and self._searches_in(epoch, cur):
            info = self._epoch_neighbors(epoch, cur, model)
        # per-epoch neighbour tables of other epochs: older ones are no longer read,
        # later ones come from an abandoned run (and are recomputed when training
        # gets there)
        self._remove_epoch_tables(keep=epoch if info is not None else None)
        return state, info

    # -- --arch-neighbor-search epoch ------------------------------------------------

    def _searches_in(self, epoch: int, cur: Optional[dict]) -> bool:
        """Whether reuse epoch ``epoch`` has its own neighbour table: with
        ``--arch-neighbor-search epoch``, every reuse epoch but the first after a refresh
        (whose generation's table was searched at that very epoch start, with the same
        parameters), unless the embeddings are a fixed file (the table cannot change)."""
        return (self.neighbor_search == "epoch" and cur is not None and epoch > cur["epoch"] + 1
                and self.fixed_embeddings is None)

    def _epoch_dir(self, epoch: int) -> str:
        return os.path.join(self.cache_dir, "neighbors", f"e{epoch:04d}")

    def _load_epoch_table(self, epoch: int, gen: str) -> Optional[dict]:
        """The table of ``epoch`` written earlier (this epoch's start, before a crash or a
        mid-epoch checkpoint), if it is complete, of generation ``gen`` and undamaged."""
        d = self._epoch_dir(epoch)
        try:
            with open(os.path.join(d, "INFO.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        if info.get("generation") != gen or info.get("epoch") != epoch or info.get("k") != self.num_neighbors:
            return None
        for fname, want in info.get("crc32", {}).items():
            path = os.path.join(d, fname)
            if not os.path.exists(path) or file_crc32(path) != want:
                logger.warning(f"ARCH cache: {path} is damaged; searching the neighbours of epoch {epoch} again")
                return None
        return info

    def _previous_table(self, epoch: int, cur: dict, side: str) -> Optional[np.ndarray]:
        """The table epoch ``epoch - 1`` read (for the count of changed neighbours)."""
        if epoch - 1 == cur["epoch"] + 1 or self.fixed_embeddings is not None:
            return np.asarray(self.store.load_array(cur["name"], f"{side}_nbr.npy"))
        prev = self._epoch_dir(epoch - 1)
        if self._load_epoch_table(epoch - 1, cur["name"]) is None:
            return None  # not kept (resumed from an older checkpoint): no comparison
        return np.load(os.path.join(prev, f"{side}_nbr.npy"))

    def _epoch_neighbors(self, epoch: int, cur: dict, model) -> dict:
        """Rank 0: search this reuse epoch's neighbours from the embeddings at the epoch
        start and write them to ``neighbors/e<epoch>`` (atomically: a complete
        directory with checksums), or reuse the table already there. A run resumed
        from a mid-epoch checkpoint has the parameters of that checkpoint, not those of
        the epoch start: searching again would give another table than the
        uninterrupted run's, so the stored one is used."""
        info = self._load_epoch_table(epoch, cur["name"])
        if info is not None:
            logger.info(f"ARCH cache: neighbours of epoch {epoch} from {self._epoch_dir(epoch)} (searched at the "
                        "epoch start)")
            return info
        store = self.store
        t0 = time.perf_counter()
        tables, changed = {}, {}
        # the neighbours come from the cached rows the refresh wrote, as at finalisation
        with torch.no_grad():
            for side in store.sides:
                db = None
                if os.path.exists(os.path.join(store.gen_dir(cur["name"]), f"{side}_nbr_db.npy")):
                    db = np.asarray(store.load_array(cur["name"], f"{side}_nbr_db.npy"))
                tables[side] = self.compute_neighbors(side, model, epoch, db)
                prev = self._previous_table(epoch, cur, side)
                changed[side] = None if prev is None else cache_math.neighbor_changes(prev, tables[side])
        search_s = time.perf_counter() - t0
        d = self._epoch_dir(epoch)
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for side, t in tables.items():
            np.save(os.path.join(tmp, f"{side}_nbr.npy"), t)
        uncached = int((store.pos_of < 0).sum())
        info = {"generation": cur["name"], "epoch": epoch, "k": self.num_neighbors, "search_seconds": search_s,
                "backend": self.last_search_backend, "changed": changed, "uncached": uncached,
                "crc32": {f"{side}_nbr.npy": file_crc32(os.path.join(tmp, f"{side}_nbr.npy")) for side in tables}}
        _atomic_write_json(os.path.join(tmp, "INFO.json"), info)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        return info

    def _remove_epoch_tables(self, keep: Optional[int]) -> None:
        root = os.path.join(self.cache_dir, "neighbors")
        if not os.path.isdir(root):
            return
        for entry in os.listdir(root):
            if keep is None or entry != f"e{keep:04d}":
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)

    def _log_epoch_search(self, epoch: int, info: dict) -> None:
        self.last_search_seconds = float(info["search_seconds"])
        parts, tot_changed, tot = [], 0, 0
        for side, c in info["changed"].items():
            if c is None:
                parts.append(f"{side} not compared (previous table not kept)")
                continue
            n = max(int(info["uncached"]), 1)
            parts.append(f"{side} {c} of {info['uncached']} ({c / n:.1%})")
            tot_changed, tot = tot_changed + c, tot + int(info["uncached"])
        self.last_nbr_changed = (tot_changed, tot) if tot else None
        logger.info(f"ARCH epoch {epoch}: neighbours searched again at the epoch start in "
                    f"{info['search_seconds']:.2f}s ({info.get('backend', '')}); changed vs the previous epoch: "
                    + ", ".join(parts))

    # -- rebuild sizes -----------------------------------------------------------------

    def _norm_measure(self) -> str:
        return f"{self.ball_norm}/{self.ball_granularity}"

    def _load_norms(self, name: str) -> Dict[str, np.ndarray]:
        """Each cached sentence's size in the ball's measure (``--arch-rebuild-norm
        neighbor``): stored at finalisation; recomputed in memory (one pass over the
        rows) for a generation that has none or was sized in another measure (another
        --adv-norm / --adv-granularity than the run that wrote it)."""
        store = self.store
        out = {}
        measure = store.generation_info(name).get("norm_measure")
        for side in store.sides:
            path = os.path.join(store.gen_dir(name), f"{side}_norm.npy")
            if measure == self._norm_measure() and os.path.exists(path):
                out[side] = store.load_array(name, f"{side}_norm.npy")
            else:
                logger.info(f"ARCH cache: {name} has no {side} sentence sizes in the measure "
                            f"{self._norm_measure()} (stored: {measure}); computing them")
                out[side] = cache_math.row_norms(store.token_file(name, side), store.offsets[side],
                                                 self.ball_norm, self.ball_granularity)
        return out

    def begin_epoch(self, epoch: int, model):
        if self.store is None:
            self._setup(model)
        store = self.store
        # every rank's rows of the last epoch must be in its shards, closed (visible to
        # rank 0 on another node), before rank 0 merges them; rank 0 learns which shards
        # and how many bytes to expect (the gather is also the barrier)
        store.close_maps()
        store.expect_shards(all_gather_object(store.take_shard_sizes()))
        state, info = on_rank0(lambda: self._advance(epoch, model))
        mode = self._mode(epoch)
        self.epoch = epoch
        self.mode = mode
        self.last_nbr_changed = None
        if mode == "refresh":
            self.write_gen = state["in_progress"]["name"]
            self.base_gen = state["in_progress"]["base"]
        elif mode == "reuse":
            self.read_gen = state["current"]["name"]
            assert store.is_complete(self.read_gen), f"generation {self.read_gen} is not complete"
            self.means = {s: store.load_array(self.read_gen, f"{s}_mean.npy") for s in store.sides}
            self.norms = self._load_norms(self.read_gen) if self.rebuild_norm == "neighbor" else None
            if info is not None:
                # every rank reads the table rank 0 searched (one result, whatever each
                # rank's search backend would have given)
                self.nbrs = {s: np.load(os.path.join(self._epoch_dir(epoch), f"{s}_nbr.npy"), mmap_mode="r")
                             for s in store.sides}
                self._log_epoch_search(epoch, info)
            else:
                self.nbrs = {s: store.load_array(self.read_gen, f"{s}_nbr.npy") for s in store.sides}
        self.state = state
        what = {"refresh": "fresh ascent", "reuse": "cache only",
                "off": f"plain label smoothing until --arch-first-refresh-epoch {self.first_refresh_epoch}"}
        logger.info(f"ARCH epoch {epoch}: {mode} ({what[mode]})")
        self.access = {"refresh": RefreshWriter, "reuse": ReuseReader}.get(mode, lambda c: None)(self)
        return self.access

    def flush(self) -> bool:
        """Make this rank's cache writes durable (called on every rank when a checkpoint is
        saved, see checkpoint_flush); whether there was a generation being written."""
        if self.store is not None and self.mode == "refresh":
            self.store.flush(self.write_gen)
            return True
        return False

    def state_dict(self) -> dict:
        if self.store is None:
            return {}
        return {"cache_dir": self.cache_dir, "epoch": self.epoch, "mode": self.mode,
                "state": getattr(self, "state", None)}

    # -- end of a refresh: means and neighbours ---------------------------------

    def _embedding_matrix(self, side: str, model) -> torch.Tensor:
        if self.fixed_embeddings is not None:
            w = self.fixed_embeddings[side]
            return w if model is None else w.to(next(model.parameters()).device)
        from .injection import embedding_modules

        return embedding_modules(model)[side].weight.detach()

    def _token_chunk(self, side: str, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        ds = self.dataset.src if side == "source" else self.dataset.tgt
        toks = [np.asarray(ds[int(i)], dtype=np.int64) for i in ids]
        lengths = np.array([len(t) for t in toks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)
        return flat, offsets

    def _vectors(self, side: str, ids: np.ndarray, w: torch.Tensor) -> torch.Tensor:
        d = self.dicts[side]
        flat, offsets = self._token_chunk(side, ids)
        return cache_math.sentence_vectors(flat, offsets, w, ignore=(d.pad(), d.eos(), d.bos()))

    def compute_neighbors(self, side: str, model, epoch: int,
                          db_positions: Optional[np.ndarray] = None) -> np.ndarray:
        """N x K int32 table: for every uncached sentence, the cached positions of its
        K nearest neighbours (cosine of mean word embeddings); -1 for cached ones.
        Neighbours are drawn from ``db_positions`` (cached positions; default all)."""
        store = self.store
        k = self.num_neighbors
        nbr = np.full((store.n_sentences, k), -1, dtype=np.int32)
        uncached = np.nonzero(store.pos_of < 0)[0]
        if len(uncached) == 0:
            return nbr
        nbr[uncached] = self._nearest_cached(side, model, epoch, uncached, db_positions, k, salt=0)
        return nbr

    def _nearest_cached(self, side: str, model, epoch: int, queries_ids: np.ndarray,
                        db_positions: Optional[np.ndarray], k: int, salt: int) -> np.ndarray:
        """len(queries_ids) x k cached positions (among ``db_positions``, default all):
        the nearest by cosine of mean word embeddings, or random ones (R-1-NN)."""
        store = self.store
        if db_positions is None:
            db_positions = np.arange(store.num_cached)
        out = np.zeros((len(queries_ids), k), dtype=np.int32)
        if self.neighbor_embeddings == "random":
            side_id = 0 if side == "source" else 1
            rng = np.random.default_rng([self.seed, epoch, side_id, 0x5EED + salt])
            out[:] = db_positions[rng.integers(0, len(db_positions), size=(len(queries_ids), k))]
            self.last_search_backend = "random"
            return out
        w = self._embedding_matrix(side, model)
        db = self._vectors(side, store.cached_ids[db_positions], w)
        index = CosineIndex(db, device=w.device)
        self.last_search_backend = index.backend
        for start in range(0, len(queries_ids), NEIGHBOR_CHUNK):
            chunk = queries_ids[start: start + NEIGHBOR_CHUNK]
            # identical sentence vectors (repeated sentences, common in crawled or
            # Tatoeba-like corpora) have identical neighbours: search each once
            queries, inverse = torch.unique(self._vectors(side, chunk, w), dim=0, return_inverse=True)
            _, idx = index.search(queries, k)
            out[start: start + len(chunk)] = db_positions[idx[inverse.cpu()].numpy()]
        return out

    def _fill_unwritten(self, name: str, side: str, model, epoch: int) -> Tuple[int, Optional[np.ndarray]]:
        """Cached rows that no batch of the refresh wrote: sentences filtered out of
        training (max positions), batches skipped for non-finite values, or batches
        of a resumed epoch that another --max-tokens / world size re-batched. Their
        rows still hold the previous generation (stale) or zeros (first refresh), and
        a reuse epoch would train on them and hand them to neighbours. No fresh
        perturbation can be computed here (no batch, no criterion), so they are rebuilt
        from their K nearest *written* cached neighbours exactly as uncached sentences
        are (Eq. 3): an estimate of this refresh instead of a stale or zero one, stored
        in the row itself so that reads, means, neighbours and the next refresh's EMA
        need no special case. (Marking them as "rebuild at read" would also need the
        next EMA to skip them.) Returns (#filled, cached positions that were written,
        or None when all were)."""
        store = self.store
        written = store.written_flags(name, side)
        if written is None:
            logger.warning(f"ARCH cache: {name} has no {side} write flags (made by an older version): "
                           "rows no batch wrote cannot be detected")
            return 0, None
        missing = np.nonzero(~written)[0]
        have = np.nonzero(written)[0]
        if len(missing) == 0:
            return 0, None
        if len(have) == 0:
            logger.warning(f"ARCH cache: no batch of the refresh in epoch {epoch} wrote a {side} row; "
                           "the cached rows are left as they were")
            return 0, None
        k = min(self.num_neighbors, len(have))
        nbr = self._nearest_cached(side, model, epoch, store.cached_ids[missing], have, k, salt=1)  # n x k
        means = cache_math.row_means(store.token_file(name, side), store.offsets[side])  # M x C
        # sized as uncached sentences are at read time (--arch-rebuild-norm)
        norms = None
        if self.rebuild_norm == "neighbor":
            norms = cache_math.row_norms(store.token_file(name, side), store.offsets[side],
                                         self.ball_norm, self.ball_granularity)[nbr]
        rows = self._rebuild(torch.from_numpy(means[nbr]), store.lengths[side][missing],
                             None if norms is None else torch.from_numpy(norms))
        store.write_rows(name, side, missing, [r.numpy() for r in rows], mark_written=False)
        store.merge_shards(name)  # rank 0 holds the generation alone here
        return len(missing), have

    def _finalize(self, ip: dict, model) -> None:
        store = self.store
        name = ip["name"]
        t0 = time.perf_counter()
        # every rank's rows into the .bin files (and write flags) before anything reads them
        merged = store.merge_shards(name)
        logger.info(f"ARCH cache: merged the ranks' rows of epoch {ip['epoch']} ({merged} records) in "
                    f"{time.perf_counter() - t0:.2f}s")
        search_s = 0.0
        filled = {}
        with torch.no_grad():
            for side in store.sides:
                t1 = time.perf_counter()
                # idempotent: a finalisation cut short and redone fills the same rows the
                # same way (the flags are removed only once the generation is complete)
                filled[side], written = self._fill_unwritten(name, side, model, ip["epoch"])
                if filled[side]:
                    logger.warning(
                        f"ARCH cache: {filled[side]} of {store.num_cached} cached {side} rows got no "
                        f"fresh perturbation in the refresh of epoch {ip['epoch']} (filtered out of "
                        "training, skipped or re-batched on resume): rebuilt from their nearest "
                        "written neighbours")
                search_s += time.perf_counter() - t1
                store.save_array_checked(name, f"{side}_mean.npy",
                                         cache_math.row_means(store.token_file(name, side), store.offsets[side]))
                # each cached sentence's size in the ball's measure: what
                # --arch-rebuild-norm neighbor gives its uncached neighbours (stored so that
                # reads stay one lookup; checksummed with the other files)
                store.save_array_checked(name, f"{side}_norm.npy",
                                         cache_math.row_norms(store.token_file(name, side), store.offsets[side],
                                                              self.ball_norm, self.ball_granularity))
                if written is not None:
                    # the positions neighbours may come from, for the searches of
                    # --arch-neighbor-search epoch in later epochs
                    store.save_array_checked(name, f"{side}_nbr_db.npy", np.asarray(written, dtype=np.int64))
                t1 = time.perf_counter()
                # uncached sentences take their neighbours among the written rows only:
                # a filled row is itself a neighbour estimate
                store.save_array_checked(name, f"{side}_nbr.npy",
                                         self.compute_neighbors(side, model, ip["epoch"], written))
                search_s += time.perf_counter() - t1
                fault_point(f"finalize@{ip['epoch']}")
        self.last_search_seconds = search_s
        self.last_filled = filled
        store.mark_complete(name, {"epoch": ip["epoch"], "search_seconds": search_s,
                                   "backend": self.last_search_backend, "filled": filled,
                                   "norm_measure": self._norm_measure()})
        store.remove_written_flags(name)
        state = store.read_state()
        state["current"] = {"name": name, "epoch": ip["epoch"]}
        state["in_progress"] = None
        store.write_state(state)
        store.remove_generations_except([name])
        logger.info(
            f"ARCH cache: generation of epoch {ip['epoch']} complete; neighbour search "
            f"{search_s:.2f}s ({self.last_search_backend}), total {time.perf_counter() - t0:.2f}s"
        )

    # -- batch level ---------------------------------------------------------------

    def _rebuild(self, neighbor_means: torch.Tensor, lengths, neighbor_norms: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Eq. 3 rows (``len_b x C`` per sentence) of :meth:`_rebuilt_vectors`."""
        return cache_math.expand_vectors(self._rebuilt_vectors(neighbor_means, lengths, neighbor_norms), lengths)

    def _rebuilt_vectors(self, neighbor_means: torch.Tensor, lengths, neighbor_norms: Optional[torch.Tensor]) -> torch.Tensor:
        """Eq. 3 for a batch of uncached sentences, sized by --arch-rebuild-norm:
        ``paper`` as published (the word average of rows that point different ways
        cancels part of their length, so rebuilt sentences end inside the ball and, the
        KL growing like the squared size, regularise less than cached ones); ``neighbor``: the mean size of the
        K neighbours' cached sentences; ``eps``: the ball's radius. Sizes are in the
        criterion's measure (--adv-norm, --adv-granularity); the caller projects."""
        if self.rebuild_norm == "paper":
            return cache_math.rebuilt_vectors(neighbor_means, lengths)
        if neighbor_norms is None:  # eps mode needs no stored sizes, only the batch size
            neighbor_norms = torch.zeros(neighbor_means.size(0), neighbor_means.size(1), device=neighbor_means.device)
        target = cache_math.rebuild_targets(self.rebuild_norm, neighbor_norms, self.ball_eps)
        return cache_math.rebuilt_vectors(neighbor_means, lengths, target, self.ball_norm, self.ball_granularity)

    def _positions(self, sample_ids) -> Tuple[np.ndarray, np.ndarray]:
        """(host ids, cache positions; -1 = uncached) of a batch's sample ids (a sequence or
        an int tensor). Ids on a device come to the host once per batch, one sync that both
        sides' calls share."""
        if torch.is_tensor(sample_ids):
            memo = getattr(self, "_host_ids", None)
            if memo is None or memo[0] is not sample_ids:
                self._host_ids = (sample_ids, sample_ids.cpu().numpy().astype(np.int64))
            ids = self._host_ids[1]
        else:
            ids = np.asarray(sample_ids, dtype=np.int64)
        return ids, self.store.pos_of[ids]

    def read(self, sample_ids, side: str, mask: torch.Tensor, project: ProjectFn) -> Tuple[torch.Tensor, int, int]:
        """Reuse epochs: (delta B x T x C, #read from cache, #rebuilt from neighbours).
        The host reads the cached sentences' token rows (memory-mapped) and makes one Eq. 3
        vector per rebuilt sentence from the row means; that table (about p of the batch's
        tokens plus one row per rebuilt sentence) and the index of each token's row reach
        the device in pinned, non-blocking copies, where the rows are expanded: the host
        never builds the rebuilt sentences' token rows (most of the batch; on a GPU that
        made the read ~10% of a reuse update)."""
        assert self.mode == "reuse", "read() is for reuse epochs"
        ids, pos = self._positions(sample_ids)
        lengths = self.store.lengths_all[side][ids]  # real tokens per sample, from the data
        cached = pos >= 0
        cached_b, other_b = np.nonzero(cached)[0], np.nonzero(~cached)[0]
        table = self.store.read_rows(self.read_gen, side, pos[cached_b]) if len(cached_b) else []
        if len(other_b):
            nbr = np.asarray(self.nbrs[side][ids[other_b]], dtype=np.int64)  # n x K
            means = np.asarray(self.means[side][nbr.reshape(-1)], dtype=np.float32)
            means = torch.from_numpy(means).view(len(other_b), nbr.shape[1], -1)
            norms = None
            if self.norms is not None:
                norms = np.asarray(self.norms[side][nbr.reshape(-1)], dtype=np.float32)
                norms = torch.from_numpy(norms).view(len(other_b), nbr.shape[1])
            table.append(self._rebuilt_vectors(means, lengths[other_b], norms).numpy())
        check_lengths(lengths, mask)
        dim = self.store.dims[side]
        table = np.concatenate(table, axis=0) if table else np.zeros((0, dim), dtype=np.float32)
        index = to_device(torch.from_numpy(cache_math.row_sources(lengths, cached)), mask.device)
        flat = to_device(torch.from_numpy(table), mask.device).index_select(0, index)  # N x C, batch order
        delta = project(place_rows(flat, mask), mask)
        fault_point(f"reuse_batch@{self.epoch}")
        return delta, len(cached_b), len(other_b)

    def store_fresh(self, sample_ids, side: str, fresh: torch.Tensor, mask: torch.Tensor, project: ProjectFn) -> torch.Tensor:
        """Refresh epochs: blend fresh perturbations of cached sentences into the new
        generation (Eq. 2, re-projected, rounded to the cache dtype) and return the
        perturbation to train on: the cache value for cached sentences (so refresh
        and reuse epochs apply the same numbers), the fresh one for the others.
        Device traffic: one pinned copy of the previous rows in, one copy of the new out."""
        assert self.mode == "refresh", "store_fresh() is for refresh epochs"
        ids, pos = self._positions(sample_ids)
        cached_b = np.nonzero(pos >= 0)[0]
        if len(cached_b) == 0:
            return fresh
        sel = to_device(torch.from_numpy(cached_b), fresh.device)
        mask_c = mask.index_select(0, sel)
        fresh_c = fresh.index_select(0, sel)
        base = None
        if self.base_gen is not None:
            base = scatter_rows(self.store.read_rows(self.base_gen, side, pos[cached_b]), mask_c)
        new_c = project(cache_math.ema_update(base, fresh_c, self.ema), mask_c)
        rows = rows_to_host(new_c, mask_c, self.store.lengths_all[side][ids[cached_b]])
        self.store.write_rows(self.write_gen, side, pos[cached_b], rows)
        fault_point(f"refresh_batch@{self.epoch}")
        # train on exactly what a reuse epoch will read back
        stored_dtype = torch.float16 if self.dtype == "float16" else torch.float32
        return fresh.index_copy(0, sel, project(new_c.to(stored_dtype).float(), mask_c))
