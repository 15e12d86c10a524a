"""The immutable layout of a cache dir: which sentences are cached and where their rows
lie. ``layout.json`` (the fingerprint of the run the dir belongs to) and
``cached_ids.npy`` (the sorted dataset indices of the M cached sentences) are written
once, when the dir is made; every rank reads them."""

import hashlib
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .files import DAMAGED, CacheCorruptError, CacheMismatchError, atomic_save_npy, read_json_dict

SIDES = ("source", "target")
DTYPES = {"float16": np.float16, "float32": np.float32}
# 2: the tokens' digest, the sides, the ball (--adv-eps/-norm/-granularity), --arch-ema and
# --arch-recipe joined the fingerprint
FORMAT = 2
# the keys each format's layout.json has: a file with all the keys of an older format was
# written by an older fairseq-arch (not damaged)
FORMAT_KEYS = {1: ("format", "n_sentences", "sizes_sha1", "dims", "cache_fraction", "seed", "dtype",
                   "num_neighbors")}
# what sets each fingerprint entry, for the messages
OPTIONS = {
    "format": "the fairseq-arch version that made it",
    "n_sentences": "the training data", "sizes_sha1": "the training data", "tokens_sha1": "the training data",
    "sides": "--adv-sides", "dims": "the model's --encoder-embed-dim / --decoder-embed-dim",
    "cache_fraction": "--arch-cache-fraction", "seed": "--seed", "dtype": "--arch-cache-dtype",
    "num_neighbors": "--arch-neighbors", "adv_eps": "--adv-eps", "adv_norm": "--adv-norm",
    "adv_granularity": "--adv-granularity", "arch_ema": "--arch-ema", "arch_recipe": "--arch-recipe",
}
DATA_KEYS = ("n_sentences", "sizes_sha1", "tokens_sha1")
# how to start anew; it works for a resumed run too (a resumed epoch that finds no cache recomputes it)
FRESH = "point --arch-cache-dir to an empty directory, or delete this one to start the cache from scratch"
LAYOUT_FILE = "layout.json"
IDS_FILE = "cached_ids.npy"


def sizes_digest(src_sizes: np.ndarray, tgt_sizes: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(np.asarray(src_sizes, dtype=np.int64).tobytes())
    h.update(np.asarray(tgt_sizes, dtype=np.int64).tobytes())
    return h.hexdigest()


def describe_diff(key: str, found: dict, want: dict) -> str:
    return f"{key}: cache has {found.get(key)!r}, this run has {want.get(key)!r} ({OPTIONS.get(key, key)})"


def mismatch_message(cache_dir: str, found: dict, want: dict, diffs: Sequence[str]) -> str:
    """A layout of another run: each differing setting with its option, and what to do."""
    data = [k for k in diffs if k in DATA_KEYS]
    lead = ("the training data changed since this cache was made (it holds one row per training sentence, "
            "by index): resume on the data it was made for, or start anew: " if data else
            "resume with the settings the cache was made with (the values it has, above), or start anew: ")
    return (f"--arch-cache-dir {cache_dir} belongs to another run ("
            + "; ".join(describe_diff(k, found, want) for k in diffs) + "): " + lead + FRESH + ".")


def format_message(cache_dir: str, layout_path: str, fmt: int) -> str:
    return (f"--arch-cache-dir {cache_dir} was made by an older fairseq-arch ({layout_path} has layout format "
            f"{fmt}; this version writes format {FORMAT} and checks more settings against it: the training "
            "tokens, --adv-eps/--adv-norm/--adv-granularity, --adv-sides, --arch-ema, --arch-recipe). Finish "
            f"that training with the fairseq-arch version that started it, or start anew: {FRESH}.")


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
    cached sentence in the side's ``.bin``).

    The fingerprint holds every setting that changes what is stored (:data:`OPTIONS`):
    the data (sizes and tokens), the rows' shape and dtype, which sentences are cached,
    K, and what the rows are -- the ball they were projected into, the EMA that blends
    them, the recipe that computes them. ``ball``, ``ema``, ``recipe`` and ``tokens``
    are None in unit tests of the store alone."""

    def __init__(self, cache_dir: str, src_sizes: np.ndarray, tgt_sizes: np.ndarray, dims: Dict[str, int],
                 fraction: float, seed: int, dtype: str, num_neighbors: int, *,
                 ball: Optional[Tuple[float, str, str]] = None, ema: Optional[float] = None,
                 recipe: Optional[str] = None, tokens: Optional[str] = None):
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
        eps, norm, gran = ball if ball is not None else (None, None, None)
        self.fingerprint = {
            "format": FORMAT,
            "n_sentences": int(self.n_sentences),
            "sizes_sha1": sizes_digest(src_sizes, tgt_sizes),
            "tokens_sha1": tokens,
            "sides": list(self.sides),
            "dims": {s: int(d) for s, d in self.dims.items()},
            "cache_fraction": float(fraction),
            "seed": int(seed),
            "dtype": dtype,
            "num_neighbors": int(num_neighbors),
            "adv_eps": None if eps is None else float(eps),
            "adv_norm": norm,
            "adv_granularity": gran,
            "arch_ema": None if ema is None else float(ema),
            "arch_recipe": recipe,
        }
        self.layout_path = os.path.join(cache_dir, LAYOUT_FILE)
        self.ids_path = os.path.join(cache_dir, IDS_FILE)
        self.cached_ids = np.zeros(0, dtype=np.int64)
        self.num_cached = 0
        self.pos_of = np.zeros(0, dtype=np.int64)
        self.lengths: Dict[str, np.ndarray] = {}
        self.offsets: Dict[str, np.ndarray] = {}

    def check_settings(self) -> None:
        """What the settings alone must satisfy; checked before anything is written, so
        that a corrected rerun is not refused by the layout of the refused one."""
        m = num_cached_of(self.n_sentences, self.fraction)
        if self.num_neighbors > m:
            raise ValueError(
                f"--arch-neighbors {self.num_neighbors} exceeds the {m} cached sentences (--arch-cache-fraction "
                f"{self.fraction} of {self.n_sentences} training sentences): use --arch-neighbors {m} or fewer, "
                "or a larger --arch-cache-fraction")

    def check_existing(self) -> bool:
        """Whether the dir has a layout; if so, it must be this run's (CacheMismatchError
        naming each setting that differs, or the older format; CacheCorruptError when
        keys are missing)."""
        if not os.path.exists(self.layout_path):
            return False
        found = read_json_dict(self.layout_path)
        fmt = found.get("format")
        if fmt != FORMAT and isinstance(fmt, int) and fmt in FORMAT_KEYS \
                and all(k in found for k in FORMAT_KEYS[fmt]):
            raise CacheMismatchError(format_message(self.dir, self.layout_path, fmt))
        missing = [k for k in self.fingerprint if k not in found]
        if missing:
            raise CacheCorruptError(f"{self.layout_path} is invalid (no {missing}): {DAMAGED}")
        diffs = [k for k, v in self.fingerprint.items() if found.get(k) != v]
        if diffs:
            raise CacheMismatchError(mismatch_message(self.dir, found, self.fingerprint, diffs))
        return True

    def write_ids(self) -> None:
        atomic_save_npy(self.ids_path, choose_cached_ids(self.n_sentences, self.fraction, self.seed))

    def open_layout(self) -> None:
        """Load the layout; every rank calls this after rank 0 made it."""
        if not os.path.exists(self.layout_path):
            raise FileNotFoundError(f"{self.layout_path} is missing: every rank must see the same "
                                    "--arch-cache-dir (a filesystem shared by all nodes)")
        found = read_json_dict(self.layout_path)
        if found != self.fingerprint:
            diffs = [k for k, v in self.fingerprint.items() if found.get(k) != v]
            raise CacheMismatchError(f"{self.layout_path} differs from this rank's settings ("
                                     + "; ".join(describe_diff(k, found, self.fingerprint) for k in diffs)
                                     + "): every rank must run with the same options and the same data")
        self.check_settings()
        self.cached_ids = self._load_cached_ids()
        self.num_cached = len(self.cached_ids)
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
