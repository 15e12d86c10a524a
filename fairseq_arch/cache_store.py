"""Disk-backed, memory-mapped perturbation cache (paper Alg. 2-3).

Layout of ``--arch-cache-dir``::

    layout.json            fingerprint: data sizes, dims, p, seed, dtype, K, sides
    cached_ids.npy         sorted dataset indices of the cached sentences (M)
    state.json             which generation is current / being written
    gen-e0001/             one generation per refresh epoch (here epoch 1)
        source.bin         M ragged token rows of the source side, [sum len x C] raw dtype
        target.bin         same for the target side (decoder input positions)
        source_mean.npy    M x C float32, word-averaged row of each cached sentence
        source_nbr.npy     N x K int32, cached positions of each sentence's neighbours
        target_*.npy       same for the target side
        COMPLETE           written last; a generation without it is never read

A refresh epoch writes a *new* generation (copied from the current one, then
updated row by row with the EMA), so the generation being read is never modified;
``state.json`` is replaced atomically once the new generation is complete. Process
memory does not grow with the cached tokens: rows are read and written through
``numpy.memmap`` and only the touched pages are resident.
"""

import hashlib
import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SIDES = ("source", "target")
DTYPES = {"float16": np.float16, "float32": np.float32}


def _atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_npy(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def sizes_digest(src_sizes: np.ndarray, tgt_sizes: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(np.asarray(src_sizes, dtype=np.int64).tobytes())
    h.update(np.asarray(tgt_sizes, dtype=np.int64).tobytes())
    return h.hexdigest()


def choose_cached_ids(n_sentences: int, fraction: float, seed: int) -> np.ndarray:
    """The p N sentences whose perturbations are cached: a fixed-seed sample,
    sorted. At least one sentence is cached so that neighbours always exist."""
    assert 0.0 < fraction <= 1.0, f"cache fraction must be in (0, 1], got {fraction}"
    if fraction >= 1.0:
        return np.arange(n_sentences, dtype=np.int64)
    m = max(1, int(round(fraction * n_sentences)))
    rng = np.random.default_rng([int(seed), 0xA4C4])
    return np.sort(rng.choice(n_sentences, size=m, replace=False)).astype(np.int64)


class CacheMismatchError(RuntimeError):
    pass


class PerturbationCacheStore:
    """Files of one cache directory; knows nothing about models or batches."""

    def __init__(
        self,
        cache_dir: str,
        src_sizes: np.ndarray,
        tgt_sizes: np.ndarray,
        dims: Dict[str, int],
        fraction: float,
        seed: int,
        dtype: str,
        num_neighbors: int,
        rank: int = 0,
    ):
        assert dtype in DTYPES, f"cache dtype must be one of {list(DTYPES)}, got {dtype!r}"
        assert set(dims) <= set(SIDES) and dims, f"dims must name sides among {SIDES}"
        self.dir = cache_dir
        self.sides = [s for s in SIDES if s in dims]
        self.dims = dict(dims)
        self.dtype = DTYPES[dtype]
        self.num_neighbors = num_neighbors
        self.n_sentences = len(src_sizes)
        self.lengths_all = {"source": np.asarray(src_sizes, dtype=np.int64),
                            "target": np.asarray(tgt_sizes, dtype=np.int64)}
        self.fingerprint = {
            "format": 1,
            "n_sentences": int(self.n_sentences),
            "sizes_sha1": sizes_digest(src_sizes, tgt_sizes),
            "dims": {s: int(d) for s, d in self.dims.items()},
            "cache_fraction": float(fraction),
            "seed": int(seed),
            "dtype": dtype,
            "num_neighbors": int(num_neighbors),
        }
        self.rank = rank
        self._layout_path = os.path.join(cache_dir, "layout.json")
        self._ids_path = os.path.join(cache_dir, "cached_ids.npy")
        self._state_path = os.path.join(cache_dir, "state.json")
        if rank == 0:
            self._create_or_check(fraction, seed)

    # -- layout ---------------------------------------------------------------

    def _create_or_check(self, fraction: float, seed: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(self._layout_path):
            with open(self._layout_path) as f:
                found = json.load(f)
            diffs = [
                f"{k}: cache has {found.get(k)!r}, this run has {v!r}"
                for k, v in self.fingerprint.items()
                if found.get(k) != v
            ]
            if diffs:
                raise CacheMismatchError(
                    f"--arch-cache-dir {self.dir} belongs to another run ("
                    + "; ".join(diffs)
                    + "). Point --arch-cache-dir to an empty directory, or delete this one "
                    "to start the cache from scratch."
                )
            return
        ids = choose_cached_ids(self.n_sentences, fraction, seed)
        _atomic_save_npy(self._ids_path, ids)
        _atomic_write_json(self._state_path, {"current": None, "in_progress": None})
        _atomic_write_json(self._layout_path, self.fingerprint)

    def open_layout(self) -> None:
        """Load the (immutable) layout; every rank calls this after rank 0 made it."""
        if not os.path.exists(self._layout_path):
            raise FileNotFoundError(
                f"{self._layout_path} is missing: every rank must see the same "
                "--arch-cache-dir (a filesystem shared by all nodes)"
            )
        with open(self._layout_path) as f:
            found = json.load(f)
        if found != self.fingerprint:
            raise CacheMismatchError(f"{self._layout_path} differs from this rank's settings")
        self.cached_ids = np.load(self._ids_path)
        self.num_cached = len(self.cached_ids)
        assert self.num_neighbors <= self.num_cached, (
            f"--arch-neighbors {self.num_neighbors} exceeds the {self.num_cached} cached sentences"
        )
        self.pos_of = np.full(self.n_sentences, -1, dtype=np.int64)
        self.pos_of[self.cached_ids] = np.arange(self.num_cached)
        self.lengths = {s: self.lengths_all[s][self.cached_ids] for s in SIDES}
        self.offsets = {
            s: np.concatenate([[0], np.cumsum(self.lengths[s])]).astype(np.int64) for s in SIDES
        }
        self._maps: Dict[str, Dict[str, np.memmap]] = {}

    def expected_bytes(self, side: str) -> int:
        """Size of one side's token file: cached tokens x C x bytes (p x tokens x d x b)."""
        return int(self.offsets[side][-1]) * self.dims[side] * np.dtype(self.dtype).itemsize

    # -- state ----------------------------------------------------------------

    def read_state(self) -> dict:
        with open(self._state_path) as f:
            return json.load(f)

    def write_state(self, state: dict) -> None:
        _atomic_write_json(self._state_path, state)

    @staticmethod
    def gen_name(epoch: int) -> str:
        return f"gen-e{epoch:04d}"

    def gen_dir(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def is_complete(self, name: Optional[str]) -> bool:
        return name is not None and os.path.exists(os.path.join(self.gen_dir(name), "COMPLETE"))

    # -- generations ----------------------------------------------------------

    def create_generation(self, name: str, base: Optional[str]) -> None:
        """A new writable generation: a byte copy of ``base`` (or zeros)."""
        d = self.gen_dir(name)
        if os.path.exists(d):
            shutil.rmtree(d)
        tmp = d + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        for side in self.sides:
            path = os.path.join(tmp, f"{side}.bin")
            if base is not None:
                shutil.copyfile(os.path.join(self.gen_dir(base), f"{side}.bin"), path)
            else:
                with open(path, "wb") as f:
                    f.truncate(self.expected_bytes(side))  # sparse zeros
        os.replace(tmp, d)

    def _map(self, name: str, side: str, writable: bool) -> np.memmap:
        key = f"{name}/{side}/{'w' if writable else 'r'}"
        cache = self._maps
        if key not in cache:
            path = os.path.join(self.gen_dir(name), f"{side}.bin")
            size = os.path.getsize(path)
            if size != self.expected_bytes(side):
                raise CacheMismatchError(
                    f"{path} has {size} bytes, expected {self.expected_bytes(side)}: "
                    "the cache file is truncated or from another run"
                )
            rows = int(self.offsets[side][-1])
            if rows == 0:
                cache[key] = np.zeros((0, self.dims[side]), dtype=self.dtype)
            else:
                cache[key] = np.memmap(path, dtype=self.dtype, mode="r+" if writable else "r",
                                       shape=(rows, self.dims[side]))
        return cache[key]

    def close_maps(self) -> None:
        for m in getattr(self, "_maps", {}).values():
            if isinstance(m, np.memmap):
                m.flush()
        self._maps = {}

    def read_rows(self, name: str, side: str, positions: Sequence[int]) -> List[np.ndarray]:
        mm = self._map(name, side, writable=False)
        off = self.offsets[side]
        return [np.asarray(mm[off[p]: off[p + 1]], dtype=np.float32) for p in positions]

    def write_rows(self, name: str, side: str, positions: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        mm = self._map(name, side, writable=True)
        off = self.offsets[side]
        for p, r in zip(positions, rows):
            assert r.shape == (off[p + 1] - off[p], self.dims[side]), (
                f"row of cached sentence {p} has shape {r.shape}"
            )
            mm[off[p]: off[p + 1]] = r.astype(self.dtype)

    def flush(self, name: str) -> None:
        for key, m in self._maps.items():
            if key.startswith(name + "/") and isinstance(m, np.memmap):
                m.flush()

    def token_file(self, name: str, side: str) -> np.memmap:
        return self._map(name, side, writable=False)

    def save_array(self, name: str, filename: str, arr: np.ndarray) -> None:
        _atomic_save_npy(os.path.join(self.gen_dir(name), filename), arr)

    def load_array(self, name: str, filename: str) -> np.ndarray:
        return np.load(os.path.join(self.gen_dir(name), filename), mmap_mode="r")

    def mark_complete(self, name: str, info: dict) -> None:
        _atomic_write_json(os.path.join(self.gen_dir(name), "COMPLETE"), info)

    def remove_generations_except(self, keep: Sequence[str]) -> None:
        self.close_maps()
        for entry in os.listdir(self.dir):
            if entry.startswith("gen-") and entry not in keep:
                shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)
