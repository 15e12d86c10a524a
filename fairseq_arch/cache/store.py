"""Disk-backed, memory-mapped perturbation cache (paper Alg. 2-3): the files of one
``--arch-cache-dir``. Only this module (and the modules it delegates to: layout,
state, flags, shards, epoch_tables) names cache files.

Layout of ``--arch-cache-dir``::

    layout.json            fingerprint: data sizes and tokens, dims, p, seed, dtype, K, sides, the
                           ball, EMA, recipe: what changes what is stored (layout.py)
    cached_ids.npy         sorted dataset indices of the cached sentences (M) (layout.py)
    owner.token            the lock of the one job that uses the dir, and its holder (host, pid,
                           start, a fresh token of its process group): every rank must read
                           rank 0's token back (one dir shared by all nodes) (lock.py, state.py)
    state.json             which generation is current / being written (state.py)
    gen-e0001/             one generation per refresh epoch (here epoch 1)
        source.bin         M ragged token rows of the source side, [sum len x C] raw dtype
        target.bin         same for the target side (decoder input positions)
        source_mean.npy    M x C float32, word-averaged row of each cached sentence
        source_norm.npy    M float32, each cached sentence's size in the ball's measure
                           (--adv-norm / --adv-granularity; --arch-rebuild-norm neighbor)
        source_nbr.npy     N x K int32, cached positions of each sentence's neighbours
        source_nbr_db.npy  the cached positions a batch wrote, among which neighbours are
                           searched (only when some rows got no batch; see finalize.py)
        target_*.npy       same for the target side
        source.written     while being written: one byte per cached sentence, 1 once a
                           batch wrote its row (removed when the generation is complete; flags.py)
        source.r00001.shard  while being written: the rows rank 1 wrote since the
                           last merge (an append-only log, see shards.py)
        COMPLETE           written last (epoch, checksums of every .bin/.npy, the
                           sizes' measure); a generation without it is never read
    gen-e0003.tmp/         a generation being created (renamed when whole)
    neighbors/e0004/       --arch-neighbor-search epoch: the table searched at the start
                           of reuse epoch 4 (<side>_nbr.npy, INFO.json; epoch_tables.py)

Crash consistency. A refresh epoch writes a *new* generation (copied from the current
one, then updated row by row with the EMA), so the generation being read is never
modified; ``state.json`` is replaced atomically once the new generation is complete.
Every JSON and ``.npy`` file is written under a temporary name and renamed. Process
memory does not grow with the cached tokens: rows are read through ``numpy.memmap``
and only the touched pages are resident. Rows of a refresh reach the ``.bin`` files
through per-rank shards that rank 0 merges (shards.py: why, on NFS).
"""

import logging
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np

from .epoch_tables import EpochNeighborTables
from .faults import fault_point
from .files import (DAMAGED, CacheCorruptError, CacheMismatchError, atomic_save_npy, atomic_write_json, check_size,
                    crc32_problem, disk_error, file_crc32, load_npy, make_cache_dir, read_json_dict)
from .flags import WRITTEN, WriteFlags
from .layout import CacheLayout
from .shards import ShardLog
from .state import EMPTY_STATE, OwnerToken, StateFile, holds_nothing

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
# the per-side arrays of a generation, by what they hold
ARRAYS = {"means": "_mean.npy", "sizes": "_norm.npy", "neighbors": "_nbr.npy", "neighbor_db": "_nbr_db.npy"}


class PerturbationCacheStore(CacheLayout):
    """Files of one cache directory (on top of its layout); knows nothing about models or
    batches."""

    def __init__(self, cache_dir: str, src_sizes: np.ndarray, tgt_sizes: np.ndarray, dims: Dict[str, int],
                 fraction: float, seed: int, dtype: str, num_neighbors: int, rank: int = 0, **stored):
        # stored: the other settings that change what is stored (CacheLayout: ball, ema, recipe, tokens)
        super().__init__(cache_dir, src_sizes, tgt_sizes, dims, fraction, seed, dtype, num_neighbors, **stored)
        self.rank = int(rank)  # the rank whose shards this process writes
        self.shards = ShardLog(self, self.rank)
        self.epoch_tables = EpochNeighborTables(os.path.join(cache_dir, "neighbors"))
        self.state_file = StateFile(cache_dir)
        self.token = OwnerToken(cache_dir)
        self.flags = WriteFlags(self.gen_dir, lambda: self.num_cached)
        self._maps: Dict[str, np.memmap] = {}  # "<generation>/<side>" -> read-only rows

    # -- layout and owner token ---------------------------------------------------

    def create_or_check(self) -> str:
        """Rank 0: take the dir for this job (one job at a time: lock.py), make the layout
        (or check an existing one against this run) and stamp the dir with a fresh token;
        returns the token. The settings are checked before anything is written; a layout
        that holds no perturbations yet is replaced by this run's (nothing is lost)."""
        self.check_settings()
        make_cache_dir(self.dir)  # refused naming --arch-cache-dir: a file, read-only, not creatable
        token = self.token.stamp()  # CacheInUseError while another job holds the dir
        try:
            exists = self.check_existing()
        except CacheMismatchError as e:
            if not holds_nothing(self.dir):
                raise
            logger.warning(f"ARCH cache: {e} -- but it holds no perturbations yet: replacing its layout with "
                           "this run's")
            exists = False
        if not exists:
            # layout.json is written last when a cache dir is made: without it the dir is
            # new (or its creation was cut short), unless generations exist -- then it was
            # lost, and remaking the layout would reset state.json and orphan them
            gens = sorted(e for e in os.listdir(self.dir) if e.startswith("gen-"))
            if gens:
                raise CacheCorruptError(f"{self.layout_path} is missing but the dir holds {gens}: {DAMAGED}")
            self.write_ids()
            self.write_state(dict(EMPTY_STATE))
            atomic_write_json(self.layout_path, self.fingerprint)
        return token

    def read_token(self) -> Optional[str]:
        return self.token.read()

    # -- state ---------------------------------------------------------------------

    def read_state(self) -> dict:
        return self.state_file.read()

    def write_state(self, state: dict) -> None:
        self.state_file.write(state)

    @staticmethod
    def gen_name(epoch: int) -> str:
        return f"gen-e{epoch:04d}"

    def gen_dir(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def is_complete(self, name: Optional[str]) -> bool:
        return name is not None and os.path.exists(os.path.join(self.gen_dir(name), COMPLETE))

    def _bin(self, name: str, side: str) -> str:
        return os.path.join(self.gen_dir(name), f"{side}.bin")

    # -- generations ---------------------------------------------------------------

    def create_generation(self, name: str, base: Optional[str]) -> None:
        """A new writable generation: a byte copy of ``base`` (or zeros), written
        under a temporary name and renamed when whole. Its files are fully
        allocated now, so a full disk fails here with a clear error, not later
        with SIGBUS on a memory-mapped write."""
        d = self.gen_dir(name)
        tmp = d + ".tmp"
        for stale in (d, tmp):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        try:
            os.makedirs(tmp)
            for side in self.sides:
                path = os.path.join(tmp, f"{side}.bin")
                if base is not None:
                    shutil.copyfile(self._bin(base, side), path)
                else:
                    with open(path, "wb") as f:
                        if self.expected_bytes(side) > 0:
                            os.posix_fallocate(f.fileno(), 0, self.expected_bytes(side))
                # rows no batch of the refresh wrote are found (and filled) at finalisation
                self.flags.create(tmp, side)
            fault_point(f"create_generation@{name}")
            os.replace(tmp, d)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(e, f"creating cache generation {d}", sum(self.expected_bytes(s) for s in self.sides),
                             where=self.dir) from e

    def perturbation_rows(self, name: str, side: str) -> np.ndarray:
        """Every cached token row of a side (``sum len x C``, memory-mapped, read-only)."""
        key = f"{name}/{side}"
        if key not in self._maps:
            path = self._bin(name, side)
            check_size(path, self.expected_bytes(side))
            rows = self.row_count(side)
            if rows == 0:
                self._maps[key] = np.zeros((0, self.dims[side]), dtype=self.dtype)
            else:
                self._maps[key] = np.memmap(path, dtype=self.dtype, mode="r", shape=(rows, self.dims[side]))
        return self._maps[key]

    def close_maps(self) -> None:
        """Drop the memory maps; close this process's shards (which makes what it
        appended visible to rank 0 on another node: NFS close-to-open)."""
        self._maps = {}
        self.flags.close()
        self.shards.close()

    def read_rows(self, name: str, side: str, positions: Sequence[int]) -> List[np.ndarray]:
        """The rows at cached ``positions`` as float32. Of a generation being written,
        the rows this process wrote (its open shard) are read back as written."""
        mm = self.perturbation_rows(name, side)
        off = self.offsets[side]
        shard = self.shards.opened(self.gen_dir(name), side)
        out = []
        for p in positions:
            row = None if shard is None else self.shards.read_back(shard, side, p)
            out.append(np.asarray(mm[off[p]: off[p + 1]], dtype=np.float32) if row is None else row)
        return out

    def write_rows(self, name: str, side: str, positions: Sequence[int], rows: Sequence[np.ndarray],
                   mark_written: bool = True) -> None:
        """Append rows to this process's shard of generation ``name``: they reach its
        ``.bin`` file when rank 0 merges the shards. ``mark_written``: the rows come from
        batches (sets their write flags then)."""
        off = self.offsets[side]
        positions = [int(p) for p in positions]
        rows = list(rows)
        for p, r in zip(positions, rows):
            assert r.shape == (off[p + 1] - off[p], self.dims[side]), (
                f"row of cached sentence {p} has shape {r.shape}")
        if positions:
            self.shards.append(self.gen_dir(name), side, positions, rows, written=mark_written)

    def take_shard_sizes(self) -> Dict[str, int]:
        return self.shards.take_sizes()

    def expect_shards(self, reports: Sequence[Dict[str, int]]) -> None:
        self.shards.expect(reports)

    def merge_shards(self, name: str) -> Dict[str, int]:
        """Rank 0, while the other ranks wait with their shards closed: fold every shard
        of generation ``name`` into its ``.bin`` files (rank order, then record order: the
        last record of a position wins) and its write flags, make both durable, then
        delete the shards. Idempotent: cut short, it is redone from the same shards.
        Returns the records merged per side."""
        merged = {}
        shards = self.shards.gather(self.gen_dir(name))
        for side, paths in shards.items():
            if not paths:
                continue
            merged[side], written = self.shards.merge_side(self._bin(name, side), side, paths)
            self.flags.mark(name, side, written)
        for path in (p for paths in shards.values() for p in paths):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        return merged

    def written_flags(self, name: str, side: str) -> np.ndarray:
        """M bools: which cached rows a batch wrote in this generation, as of the last
        merge of its shards."""
        return self.flags.read(name, side)

    def remove_written_flags(self, name: str) -> None:
        """After finalisation the flags mean nothing: the generation is read-only."""
        self.flags.remove(name, self.sides)

    def flush(self, name: str) -> None:
        """Make this process's writes to generation ``name`` durable: its shards (fsync,
        and the directory that holds them); the flags are flushed as they are set."""
        self.shards.flush(self.gen_dir(name))

    # -- a generation's arrays (ARRAYS) ---------------------------------------------

    def _array_path(self, name: str, side: str, kind: str) -> str:
        return os.path.join(self.gen_dir(name), side + ARRAYS[kind])

    def save_array(self, name: str, side: str, kind: str, arr: np.ndarray) -> None:
        atomic_save_npy(self._array_path(name, side, kind), arr)  # a full disk: CacheIOError naming it

    def load_array(self, name: str, side: str, kind: str) -> np.ndarray:
        """A generation's array, memory-mapped; a missing or unreadable one is a damaged
        cache (CacheCorruptError naming it), not a traceback from numpy."""
        return load_npy(self._array_path(name, side, kind))

    def has_array(self, name: str, side: str, kind: str) -> bool:
        return os.path.exists(self._array_path(name, side, kind))

    # -- complete generations ---------------------------------------------------------

    def mark_complete(self, name: str, info: dict) -> None:
        """Seal a generation: checksums of all its files, then the COMPLETE marker."""
        self.flush(name)
        d = self.gen_dir(name)
        files = sorted(f for f in os.listdir(d) if f.endswith((".bin", ".npy")))
        info = dict(info, crc32={f: file_crc32(os.path.join(d, f)) for f in files})
        atomic_write_json(os.path.join(d, COMPLETE), info)

    def generation_info(self, name: str) -> dict:
        """The COMPLETE record of a complete generation."""
        return read_json_dict(os.path.join(self.gen_dir(name), COMPLETE))

    def verify_generation(self, name: str) -> None:
        """Detect truncated or modified files of a complete generation."""
        d = self.gen_dir(name)
        if not self.is_complete(name):
            raise CacheCorruptError(f"{os.path.join(d, COMPLETE)} is missing: {d} is not a complete cache "
                                    f"generation; {DAMAGED}")
        for side in self.sides:
            check_size(self._bin(name, side), self.expected_bytes(side))
        problem = crc32_problem(d, self.generation_info(name).get("crc32", {}))
        if problem is not None:
            raise CacheCorruptError(f"{problem}: {DAMAGED}")

    def remove_generations_except(self, keep: Sequence[str]) -> None:
        self.close_maps()
        for entry in os.listdir(self.dir):
            if entry.startswith("gen-") and entry not in keep:
                shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)


__all__ = ["ARRAYS", "COMPLETE", "WRITTEN", "PerturbationCacheStore"]
