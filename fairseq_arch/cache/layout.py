"""The immutable layout of a cache dir: which sentences are cached and where their rows
lie. ``layout.json`` (the fingerprint of the run the dir belongs to) and
``cached_ids.npy`` (the sorted dataset indices of the M cached sentences) are written
once, when the dir is made; every rank reads them."""

import hashlib
import os
from typing import Dict

import numpy as np

from .files import DAMAGED, CacheCorruptError, CacheMismatchError, atomic_save_npy, read_json_dict

SIDES = ("source", "target")
DTYPES = {"float16": np.float16, "float32": np.float32}
FORMAT = 1
LAYOUT_FILE = "layout.json"
IDS_FILE = "cached_ids.npy"


def sizes_digest(src_sizes: np.ndarray, tgt_sizes: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(np.asarray(src_sizes, dtype=np.int64).tobytes())
    h.update(np.asarray(tgt_sizes, dtype=np.int64).tobytes())
    return h.hexdigest()


def num_cached_of(n_sentences: int, fraction: float) -> int:
    """M, the number of cached sentences: p N, at least one (neighbours always exist)."""
    return n_sentences if fraction >= 1.0 else max(1, int(round(fraction * n_sentences)))


def choose_cached_ids(n_sentences: int, fraction: float, seed: int) -> np.ndarray:
    """The p N sentences whose perturbations are cached: a fixed-seed sample, sorted."""
    assert 0.0 < fraction <= 1.0, f"cache fraction must be in (0, 1], got {fraction}"
    if fraction >= 1.0:
        return np.arange(n_sentences, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0xA4C4])
    m = num_cached_of(n_sentences, fraction)
    return np.sort(rng.choice(n_sentences, size=m, replace=False)).astype(np.int64)


class CacheLayout:
    """The fingerprint of a run's cache and, once :meth:`open_layout` read ``cached_ids.npy``,
    the cached positions: ``cached_ids`` (M), ``pos_of`` (N: cached position or -1),
    ``lengths[side]`` (M tokens) and ``offsets[side]`` (M + 1: the first row of each
    cached sentence in the side's ``.bin``)."""

    def __init__(self, cache_dir: str, src_sizes: np.ndarray, tgt_sizes: np.ndarray, dims: Dict[str, int],
                 fraction: float, seed: int, dtype: str, num_neighbors: int):
        assert dtype in DTYPES, f"cache dtype must be one of {list(DTYPES)}, got {dtype!r}"
        assert set(dims) <= set(SIDES) and dims, f"dims must name sides among {SIDES}"
        self.dir = cache_dir
        self.sides = [s for s in SIDES if s in dims]
        self.dims = dict(dims)
        self.dtype = DTYPES[dtype]
        self.fraction, self.seed = fraction, seed
        self.num_neighbors = num_neighbors
        self.n_sentences = len(src_sizes)
        self.lengths_all = {"source": np.asarray(src_sizes, dtype=np.int64),
                            "target": np.asarray(tgt_sizes, dtype=np.int64)}
        self.fingerprint = {
            "format": FORMAT,
            "n_sentences": int(self.n_sentences),
            "sizes_sha1": sizes_digest(src_sizes, tgt_sizes),
            "dims": {s: int(d) for s, d in self.dims.items()},
            "cache_fraction": float(fraction),
            "seed": int(seed),
            "dtype": dtype,
            "num_neighbors": int(num_neighbors),
        }
        self.layout_path = os.path.join(cache_dir, LAYOUT_FILE)
        self.ids_path = os.path.join(cache_dir, IDS_FILE)
        self.cached_ids = np.zeros(0, dtype=np.int64)
        self.num_cached = 0
        self.pos_of = np.zeros(0, dtype=np.int64)
        self.lengths: Dict[str, np.ndarray] = {}
        self.offsets: Dict[str, np.ndarray] = {}

    def check_existing(self) -> bool:
        """Whether the dir has a layout; if so, it must be this run's."""
        if not os.path.exists(self.layout_path):
            return False
        found = read_json_dict(self.layout_path)
        missing = [k for k in self.fingerprint if k not in found]
        if missing:
            raise CacheCorruptError(f"{self.layout_path} is invalid (no {missing}): {DAMAGED}")
        diffs = [f"{k}: cache has {found.get(k)!r}, this run has {v!r}"
                 for k, v in self.fingerprint.items() if found.get(k) != v]
        if diffs:
            raise CacheMismatchError(
                f"--arch-cache-dir {self.dir} belongs to another run (" + "; ".join(diffs)
                + "). Point --arch-cache-dir to an empty directory, or delete this one "
                "to start the cache from scratch.")
        return True

    def write_ids(self) -> None:
        atomic_save_npy(self.ids_path, choose_cached_ids(self.n_sentences, self.fraction, self.seed))

    def open_layout(self) -> None:
        """Load the layout; every rank calls this after rank 0 made it."""
        if not os.path.exists(self.layout_path):
            raise FileNotFoundError(f"{self.layout_path} is missing: every rank must see the same "
                                    "--arch-cache-dir (a filesystem shared by all nodes)")
        if read_json_dict(self.layout_path) != self.fingerprint:
            raise CacheMismatchError(f"{self.layout_path} differs from this rank's settings")
        self.cached_ids = self._load_cached_ids()
        self.num_cached = len(self.cached_ids)
        assert self.num_neighbors <= self.num_cached, (
            f"--arch-neighbors {self.num_neighbors} exceeds the {self.num_cached} cached sentences")
        self.pos_of = np.full(self.n_sentences, -1, dtype=np.int64)
        self.pos_of[self.cached_ids] = np.arange(self.num_cached)
        self.lengths = {s: self.lengths_all[s][self.cached_ids] for s in SIDES}
        self.offsets = {s: np.concatenate([[0], np.cumsum(self.lengths[s])]).astype(np.int64) for s in SIDES}

    def _load_cached_ids(self) -> np.ndarray:
        """cached_ids.npy, checked against the layout: a truncated or foreign file would
        otherwise index the rows wrongly (or fail deep inside numpy)."""
        path = self.ids_path
        try:
            ids = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise CacheCorruptError(f"{path} is missing: {DAMAGED}") from None
        except (ValueError, OSError, EOFError) as e:
            raise CacheCorruptError(f"{path} is unreadable ({e}): {DAMAGED}") from None
        want = num_cached_of(self.n_sentences, self.fraction)
        problem = None
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            problem = f"a {ids.dtype} array of shape {ids.shape}, expected 1-D integers"
        elif len(ids) != want:
            problem = f"{len(ids)} ids, expected {want} (p={self.fraction} of {self.n_sentences} sentences)"
        elif len(ids) and (ids[0] < 0 or ids[-1] >= self.n_sentences or np.any(np.diff(ids) <= 0)):
            problem = f"ids not strictly increasing within [0, {self.n_sentences})"
        if problem:
            raise CacheCorruptError(f"{path} is invalid ({problem}): {DAMAGED}")
        return ids.astype(np.int64, copy=False)

    def row_count(self, side: str) -> int:
        """Token rows of one side's ``.bin``: the cached sentences' tokens."""
        return int(self.offsets[side][-1])

    def expected_bytes(self, side: str) -> int:
        """Size of one side's ``.bin``: cached tokens x C x bytes (p x tokens x d x b)."""
        return self.row_count(side) * self.dims[side] * np.dtype(self.dtype).itemsize

    def row_bytes(self, side: str, position: int):
        """Bytes of the row of cached ``position`` (None: no such position)."""
        if not 0 <= position < self.num_cached:
            return None
        off = self.offsets[side]
        return int(off[position + 1] - off[position]) * self.dims[side] * np.dtype(self.dtype).itemsize
