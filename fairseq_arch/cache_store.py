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
        source.written     while being written: one byte per cached sentence, 1 once a
                           batch wrote its row (removed when the generation is complete)
        source.r00001.shard  while being written: the rows rank 1 wrote since the
                           last merge (an append-only log; see "Shards" below)
        COMPLETE           written last; a generation without it is never read

A refresh epoch writes a *new* generation (copied from the current one, then
updated row by row with the EMA), so the generation being read is never modified;
``state.json`` is replaced atomically once the new generation is complete. Process
memory does not grow with the cached tokens: rows are read through ``numpy.memmap``
and only the touched pages are resident.

Shards. The ranks of a refresh epoch never write the shared ``.bin`` files: on
several nodes over NFS, pages are written back whole and the rows of neighbouring
sentences share pages, so the last node to flush a page would overwrite the other
nodes' rows with stale bytes (silently: the checksums are computed afterwards).
Each rank appends its rows to a shard of its own, ``<side>.r<rank>.shard``: records
of a 32-byte header (magic, crc32 of the row, cached position, row bytes, flags)
followed by the row in the cache dtype. Only rank 0 writes ``.bin`` files and
write flags, and only while it holds the generation alone (at an epoch start, the
other ranks waiting with their shards closed): ``merge_shards`` folds every shard
in, in rank order then record order (the last record of a position wins, as the
last write into a memory map did), makes ``.bin`` and flags durable, then deletes
the shards. Rank 0 merges at finalisation and also when a run resumes in the middle
of a refresh epoch, so a shard only ever holds rows of one process's lifetime. A
refresh therefore needs room for the shards too: up to one more generation's rows.
A process reads back the rows it wrote itself (``read_rows`` of the generation
being written looks into its own open shard first).
"""

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

SIDES = ("source", "target")
# suffix of a generation's per-side "row written by a batch" flags (only while it is
# being written; not a .bin/.npy, so not part of the checksums of a complete one)
WRITTEN = ".written"
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


def fault_point(name: str) -> None:
    """Crash-consistency tests: ``FAIRSEQ_ARCH_FAULT=<name>:<n>`` SIGKILLs this process
    the n-th time it passes ``name``; ``FAIRSEQ_ARCH_SLEEP=<name>:<seconds>`` sleeps there
    every time (a slow step, e.g. a long finalisation on rank 0). Unset in normal runs
    (two dict lookups)."""
    slow = os.environ.get("FAIRSEQ_ARCH_SLEEP")
    if slow:
        point, _, seconds = slow.rpartition(":")
        if point == name:
            logger.warning(f"FAIRSEQ_ARCH_SLEEP: sleeping {seconds} s at {name}")
            time.sleep(float(seconds))
    spec = os.environ.get("FAIRSEQ_ARCH_FAULT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    fault_point.hits = getattr(fault_point, "hits", 0) + 1
    if fault_point.hits >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


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
    """The cache dir does not belong to this run (other data, settings, or epoch)."""


class CacheCorruptError(RuntimeError):
    """A cache file is truncated or its contents changed since it was written."""


def file_crc32(path: str, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


# the same advice as the crc32 checks give for a damaged generation
DAMAGED = "the cache dir is damaged; delete the cache dir to recompute it"


def _read_json_dict(path: str) -> dict:
    """A JSON object from one of the cache's own files, or CacheCorruptError naming the
    file: these files are written atomically, so anything unreadable was damaged
    outside this program and must not surface as a traceback deep inside the run."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CacheCorruptError(f"{path} is missing: {DAMAGED}") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CacheCorruptError(f"{path} is not valid JSON ({e}): {DAMAGED}") from None
    if not isinstance(obj, dict):
        raise CacheCorruptError(f"{path} holds a JSON {type(obj).__name__}, expected an object: {DAMAGED}")
    return obj


def _check_state(path: str, state: dict) -> dict:
    """state.json: {"current": None | {name, epoch}, "in_progress": None | {name, epoch, base}}."""
    def bad(why):
        return CacheCorruptError(f"{path} is invalid ({why}): {DAMAGED}")

    for key, fields in (("current", ("name", "epoch")), ("in_progress", ("name", "epoch", "base"))):
        if key not in state:
            raise bad(f"no {key!r} entry")
        entry = state[key]
        if entry is None:
            continue
        if not isinstance(entry, dict) or any(f not in entry for f in fields):
            raise bad(f"{key!r} must be null or an object with {list(fields)}, got {entry!r}")
        if not isinstance(entry["name"], str) or not entry["name"].startswith("gen-") \
                or type(entry["epoch"]) is not int or entry["epoch"] < 1:
            raise bad(f"{key!r} must name a generation gen-* and a positive integer epoch, got {entry!r}")
        if key == "in_progress" and not (entry["base"] is None or isinstance(entry["base"], str)):
            raise bad(f"'in_progress' base must be null or a generation name, got {entry['base']!r}")
    return state


def _disk_error(e: OSError, what: str) -> RuntimeError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RuntimeError(
            f"no space left on device while {what}. The previous cache generation is intact; "
            "free some space (or move --arch-cache-dir) and resume from checkpoint_last.pt"
        )
    return RuntimeError(f"I/O error while {what}: {e}")


# -- per-rank shards of a generation being written (see the module docstring) -------

SHARD = ".shard"
SHARD_MAGIC = b"ARCR"
# magic, crc32 of the row bytes, cached position, row bytes, flags, reserved
SHARD_RECORD = struct.Struct("<4sIqqII")
SHARD_WRITTEN = 1  # record flag: a batch wrote the row (sets the generation's write flag)
# how long rank 0 waits for a shard another rank reported to show its reported size
# (a filesystem shared by the nodes makes a closed file visible at once; NFS on open)
SHARD_WAIT_S = 300.0


def shard_file(side: str, rank: int) -> str:
    return f"{side}.r{int(rank):05d}{SHARD}"


def encode_records(positions: Sequence[int], rows: Sequence[np.ndarray], dtype,
                   written: bool = True) -> Tuple[bytes, np.ndarray]:
    """Shard records of ``rows`` (cast to ``dtype``) at cached ``positions``: the bytes,
    and where each row's bytes start in them."""
    parts, starts, at = [], [], 0
    flags = SHARD_WRITTEN if written else 0
    for p, r in zip(positions, rows):
        payload = np.ascontiguousarray(np.asarray(r).astype(dtype, copy=False)).tobytes()
        parts.append(SHARD_RECORD.pack(SHARD_MAGIC, zlib.crc32(payload), int(p), len(payload), flags, 0))
        parts.append(payload)
        starts.append(at + SHARD_RECORD.size)
        at += SHARD_RECORD.size + len(payload)
    return b"".join(parts), np.asarray(starts, dtype=np.int64)


def iter_shard(path: str, row_bytes: Callable[[int], Optional[int]],
               buffering: int = 1 << 24) -> Iterator[Tuple[int, bool, bytes]]:
    """The records ``(position, written, row bytes)`` of a shard, in order.
    ``row_bytes(position)`` is the size a row at that position must have (None: no
    such position). Stops, with a warning, at the first record that is cut short or
    does not check out: a write interrupted by a full disk or a machine crash (the
    records before it are whole; the lost rows are rewritten when the epoch is resumed
    from its checkpoint, or found unwritten and rebuilt at finalisation)."""
    with open(path, "rb", buffering=buffering) as f:
        n = 0
        while True:
            head = f.read(SHARD_RECORD.size)
            if not head:
                return
            problem, payload = None, b""
            if len(head) < SHARD_RECORD.size:
                problem = "header cut short"
            else:
                magic, crc, pos, nbytes, flags, _ = SHARD_RECORD.unpack(head)
                want = row_bytes(pos) if magic == SHARD_MAGIC else None
                if magic != SHARD_MAGIC:
                    problem = "no record header"
                elif want is None or nbytes != want:
                    problem = f"cached position {pos} with {nbytes} bytes does not fit the layout"
                else:
                    payload = f.read(nbytes)
                    if len(payload) < nbytes:
                        problem = "row cut short"
                    elif zlib.crc32(payload) != crc:
                        problem = "crc32 mismatch"
            if problem is not None:
                logger.warning(f"ARCH cache: {path}: record {n} and the rest ignored ({problem}): a write "
                               "was cut short")
                return
            yield pos, bool(flags & SHARD_WRITTEN), payload
            n += 1


def _write_all(fd: int, data: bytes, what: str) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise _disk_error(e, what) from e


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _size_now(path: str) -> int:
    """Size of ``path`` read through a fresh open (on NFS, open revalidates what the
    client cached: close-to-open consistency); -1 if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return -1
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


class _Shard:
    """This process's open shard of one side of a generation being written."""

    __slots__ = ("fd", "path", "fname", "end", "index")

    def __init__(self, fd: int, path: str, fname: str, num_cached: int):
        self.fd, self.path, self.fname = fd, path, fname
        self.end = os.fstat(fd).st_size
        self.index = np.full(num_cached, -1, dtype=np.int64)  # cached position -> offset of its last row


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
        self.fraction, self.seed = fraction, seed
        self._layout_path = os.path.join(cache_dir, "layout.json")
        self._ids_path = os.path.join(cache_dir, "cached_ids.npy")
        self._state_path = os.path.join(cache_dir, "state.json")
        self._token_path = os.path.join(cache_dir, "owner.token")
        self._maps: Dict[str, np.memmap] = {}
        # the rank whose shards this process writes (see the module docstring)
        self.rank = int(rank)
        self._shards: Dict[Tuple[str, str], _Shard] = {}  # (generation, side) -> open shard
        self._shard_sizes: Dict[str, int] = {}  # "<generation>/<shard file>" -> bytes, not yet reported
        self._expected: Dict[str, int] = {}  # the same, of every rank: what rank 0 must find

    # -- layout ---------------------------------------------------------------

    def create_or_check(self) -> str:
        """Rank 0: make the layout (or check an existing one against this run) and
        stamp the dir with a fresh token; returns the token."""
        self._create_or_check(self.fraction, self.seed)
        token = uuid.uuid4().hex
        with open(self._token_path + ".tmp", "w") as f:
            f.write(token)
        os.replace(self._token_path + ".tmp", self._token_path)
        return token

    def read_token(self):
        try:
            with open(self._token_path) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def _create_or_check(self, fraction: float, seed: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(self._layout_path):
            found = _read_json_dict(self._layout_path)
            missing = [k for k in self.fingerprint if k not in found]
            if missing:
                raise CacheCorruptError(f"{self._layout_path} is invalid (no {missing}): {DAMAGED}")
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
        # layout.json is written last when a cache dir is made: without it the dir is
        # new (or its creation was cut short), unless generations exist -- then it was
        # lost, and remaking the layout would reset state.json and orphan them
        gens = sorted(e for e in os.listdir(self.dir) if e.startswith("gen-"))
        if gens:
            raise CacheCorruptError(f"{self._layout_path} is missing but the dir holds {gens}: {DAMAGED}")
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
        found = _read_json_dict(self._layout_path)
        if found != self.fingerprint:
            raise CacheMismatchError(f"{self._layout_path} differs from this rank's settings")
        self.cached_ids = self._load_cached_ids()
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

    def _load_cached_ids(self) -> np.ndarray:
        """cached_ids.npy, checked against the layout: a truncated or foreign file would
        otherwise index the token files wrongly (or fail deep inside numpy)."""
        path = self._ids_path
        try:
            ids = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise CacheCorruptError(f"{path} is missing: {DAMAGED}") from None
        except (ValueError, OSError, EOFError) as e:
            raise CacheCorruptError(f"{path} is unreadable ({e}): {DAMAGED}") from None
        fraction = self.fingerprint["cache_fraction"]
        want = self.n_sentences if fraction >= 1.0 else max(1, int(round(fraction * self.n_sentences)))
        problem = None
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            problem = f"a {ids.dtype} array of shape {ids.shape}, expected 1-D integers"
        elif len(ids) != want:
            problem = f"{len(ids)} ids, expected {want} (p={fraction} of {self.n_sentences} sentences)"
        elif len(ids) and (ids[0] < 0 or ids[-1] >= self.n_sentences or np.any(np.diff(ids) <= 0)):
            problem = f"ids not strictly increasing within [0, {self.n_sentences})"
        if problem:
            raise CacheCorruptError(f"{path} is invalid ({problem}): {DAMAGED}")
        return ids.astype(np.int64, copy=False)

    def expected_bytes(self, side: str) -> int:
        """Size of one side's token file: cached tokens x C x bytes (p x tokens x d x b)."""
        return int(self.offsets[side][-1]) * self.dims[side] * np.dtype(self.dtype).itemsize

    # -- state ----------------------------------------------------------------

    def read_state(self) -> dict:
        return _check_state(self._state_path, _read_json_dict(self._state_path))

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
                    shutil.copyfile(os.path.join(self.gen_dir(base), f"{side}.bin"), path)
                else:
                    with open(path, "wb") as f:
                        if self.expected_bytes(side) > 0:
                            os.posix_fallocate(f.fileno(), 0, self.expected_bytes(side))
                # one byte per cached sentence, set when a batch writes its row: rows
                # no batch of the refresh wrote are found (and filled) at finalisation
                with open(os.path.join(tmp, f"{side}{WRITTEN}"), "wb") as f:
                    f.write(bytes(self.num_cached))
            fault_point(f"create_generation@{name}")
            os.replace(tmp, d)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error(e, f"creating cache generation {d} "
                                 f"({sum(self.expected_bytes(s) for s in self.sides)} bytes)") from e

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
        """Flush and drop the memory maps; close this process's shards (which makes what
        it appended visible to rank 0 on another node: NFS close-to-open)."""
        for m in self._maps.values():
            if isinstance(m, np.memmap):
                m.flush()
        self._maps = {}
        self._close_shards()

    def read_rows(self, name: str, side: str, positions: Sequence[int]) -> List[np.ndarray]:
        """The rows at cached ``positions`` as float32. Of a generation being written,
        the rows this process wrote (its open shard) are read back as written."""
        mm = self._map(name, side, writable=False)
        off = self.offsets[side]
        shard = self._shards.get((name, side))
        if shard is None:
            return [np.asarray(mm[off[p]: off[p + 1]], dtype=np.float32) for p in positions]
        dim, size = self.dims[side], np.dtype(self.dtype).itemsize
        out = []
        for p in positions:
            at = shard.index[p]
            if at < 0:
                out.append(np.asarray(mm[off[p]: off[p + 1]], dtype=np.float32))
            else:
                n = int(off[p + 1] - off[p])
                buf = os.pread(shard.fd, n * dim * size, int(at))
                out.append(np.frombuffer(buf, dtype=self.dtype).reshape(n, dim).astype(np.float32))
        return out

    def write_rows(self, name: str, side: str, positions: Sequence[int], rows: Sequence[np.ndarray],
                   mark_written: bool = True) -> None:
        """Append rows to this process's shard of generation ``name`` (see the module
        docstring): they reach its ``.bin`` file when rank 0 merges the shards.
        ``mark_written``: the rows come from batches (sets their write flags then)."""
        off = self.offsets[side]
        positions = [int(p) for p in positions]
        rows = list(rows)
        for p, r in zip(positions, rows):
            assert r.shape == (off[p + 1] - off[p], self.dims[side]), (
                f"row of cached sentence {p} has shape {r.shape}"
            )
        if not positions:
            return
        data, starts = encode_records(positions, rows, self.dtype, written=mark_written)
        shard = self._shard(name, side)
        _write_all(shard.fd, data, f"writing cache rows to {shard.path}")
        for p, at in zip(positions, starts):  # in order: the last row of a position wins
            shard.index[p] = shard.end + at
        shard.end += len(data)
        self._shard_sizes[f"{name}/{shard.fname}"] = shard.end

    def _shard(self, name: str, side: str) -> _Shard:
        key = (name, side)
        if key not in self._shards:
            fname = shard_file(side, self.rank)
            path = os.path.join(self.gen_dir(name), fname)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as e:
                raise _disk_error(e, f"opening {path}") from e
            self._shards[key] = _Shard(fd, path, fname, self.num_cached)
        return self._shards[key]

    def _close_shards(self, name: Optional[str] = None) -> None:
        for key in [k for k in self._shards if name is None or k[0] == name]:
            os.close(self._shards.pop(key).fd)

    def take_shard_sizes(self) -> Dict[str, int]:
        """What this process appended since the last call: ``{"<generation>/<shard>":
        bytes}``, gathered from every rank at an epoch start for rank 0 to check."""
        sizes, self._shard_sizes = self._shard_sizes, {}
        return sizes

    def expect_shards(self, reports: Sequence[Dict[str, int]]) -> None:
        """Every rank's ``take_shard_sizes()``: the shards (and sizes at least) that rank 0
        must find when it merges them, however late a shared filesystem shows them."""
        self._expected = {}
        for report in reports:
            for key, size in report.items():
                self._expected[key] = max(size, self._expected.get(key, 0))

    def _wait_for_shards(self, d: str, expected: Dict[str, int]) -> None:
        deadline = time.monotonic() + SHARD_WAIT_S
        for fname, size in sorted(expected.items()):
            path = os.path.join(d, fname)
            while True:
                seen = _size_now(path)
                if seen >= size:
                    break
                if time.monotonic() > deadline:
                    raise CacheCorruptError(
                        f"{path}: a rank wrote {size} bytes to it, but rank 0 sees "
                        + ("no such file" if seen < 0 else f"{seen} bytes")
                        + f" after {SHARD_WAIT_S:.0f} s: --arch-cache-dir must be one directory on a "
                        "filesystem shared by all nodes (NFS: with close-to-open consistency)")
                time.sleep(0.5)

    def merge_shards(self, name: str) -> Dict[str, int]:
        """Rank 0, while the other ranks wait with their shards closed: fold every shard
        of generation ``name`` into its ``.bin`` files (rank order, then record order: the
        last record of a position wins) and its write flags, make both durable, then
        delete the shards. Idempotent: cut short, it is redone from the same shards.
        Returns the records merged per side."""
        self._close_shards(name)
        d = self.gen_dir(name)
        expected = {k.split("/", 1)[1]: v for k, v in self._expected.items() if k.split("/", 1)[0] == name}
        self._wait_for_shards(d, expected)
        files = sorted(set(f for f in os.listdir(d) if f.endswith(SHARD)) | set(expected))
        merged, done = {}, []
        for side in self.sides:
            mine = [f for f in files if f.startswith(f"{side}.r")]
            if mine:
                merged[side] = self._merge_side(name, side, [os.path.join(d, f) for f in mine])
                done += mine
        for f in done:
            try:
                os.remove(os.path.join(d, f))
            except FileNotFoundError:
                pass
        self._expected = {k: v for k, v in self._expected.items() if k.split("/", 1)[0] != name}
        return merged

    def _merge_side(self, name: str, side: str, paths: Sequence[str]) -> int:
        off = self.offsets[side]
        row = self.dims[side] * np.dtype(self.dtype).itemsize
        m = self.num_cached

        def row_bytes(p: int) -> Optional[int]:
            return int(off[p + 1] - off[p]) * row if 0 <= p < m else None

        path = os.path.join(self.gen_dir(name), f"{side}.bin")
        if os.path.getsize(path) != self.expected_bytes(side):
            raise CacheMismatchError(f"{path} has {os.path.getsize(path)} bytes, expected "
                                     f"{self.expected_bytes(side)}: the cache file is truncated or from another run")
        written = np.zeros(m, dtype=bool)
        n = 0
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                for shard in paths:
                    for pos, was_written, payload in iter_shard(shard, row_bytes):
                        _pwrite_all(fd, payload, int(off[pos]) * row)
                        written[pos] |= was_written
                        n += 1
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _disk_error(e, f"merging the ranks' cache rows into {path}") from e
        flags = self._written_map(name, side)
        if flags is not None and written.any():
            flags[written] = 1
            flags.flush()
        return n

    def _written_map(self, name: str, side: str) -> Optional[np.memmap]:
        """The writable per-sentence "row written" flags of a generation being written
        (rank 0 sets them when it merges the shards); None for a generation made before
        the flags existed."""
        key = f"{name}/{side}{WRITTEN}/w"
        if key not in self._maps:
            path = os.path.join(self.gen_dir(name), f"{side}{WRITTEN}")
            if not os.path.exists(path):
                return None
            if self.num_cached == 0 or os.path.getsize(path) != self.num_cached:
                raise CacheCorruptError(f"{path} has {os.path.getsize(path)} bytes, expected "
                                        f"{self.num_cached} (one per cached sentence): {DAMAGED}")
            self._maps[key] = np.memmap(path, dtype=np.uint8, mode="r+", shape=(self.num_cached,))
        return self._maps[key]

    def written_flags(self, name: str, side: str) -> Optional[np.ndarray]:
        """M bools: which cached rows a batch wrote in this generation, as of the last
        merge of its shards (None: unknown)."""
        flags = self._written_map(name, side)
        return None if flags is None else np.asarray(flags) != 0

    def remove_written_flags(self, name: str) -> None:
        """After finalisation the flags mean nothing: the generation is read-only."""
        for side in self.sides:
            self._maps.pop(f"{name}/{side}{WRITTEN}/w", None)
            path = os.path.join(self.gen_dir(name), f"{side}{WRITTEN}")
            if os.path.exists(path):
                os.remove(path)

    def flush(self, name: str) -> None:
        """Make this process's writes to generation ``name`` durable: memory maps and its
        shards (fsync, and the directory that holds them)."""
        for key, m in self._maps.items():
            if key.startswith(name + "/") and isinstance(m, np.memmap):
                m.flush()
        shards = [s for k, s in self._shards.items() if k[0] == name]
        for shard in shards:
            os.fsync(shard.fd)
        if shards:
            fd = os.open(self.gen_dir(name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def token_file(self, name: str, side: str) -> np.memmap:
        return self._map(name, side, writable=False)

    def save_array(self, name: str, filename: str, arr: np.ndarray) -> None:
        _atomic_save_npy(os.path.join(self.gen_dir(name), filename), arr)

    def load_array(self, name: str, filename: str) -> np.ndarray:
        return np.load(os.path.join(self.gen_dir(name), filename), mmap_mode="r")

    def save_array_checked(self, name: str, filename: str, arr: np.ndarray) -> None:
        try:
            self.save_array(name, filename, arr)
        except OSError as e:
            raise _disk_error(e, f"writing {os.path.join(self.gen_dir(name), filename)}") from e

    def mark_complete(self, name: str, info: dict) -> None:
        """Seal a generation: checksums of all its files, then the COMPLETE marker."""
        self.flush(name)
        d = self.gen_dir(name)
        files = sorted(f for f in os.listdir(d) if f.endswith((".bin", ".npy")))
        info = dict(info, crc32={f: file_crc32(os.path.join(d, f)) for f in files})
        _atomic_write_json(os.path.join(d, "COMPLETE"), info)

    def generation_info(self, name: str) -> dict:
        """The COMPLETE record of a complete generation ({} if none)."""
        try:
            with open(os.path.join(self.gen_dir(name), "COMPLETE")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def verify_generation(self, name: str) -> None:
        """Detect truncated or modified files of a complete generation."""
        d = self.gen_dir(name)
        if not self.is_complete(name):
            raise CacheCorruptError(f"{d} is not a complete cache generation (COMPLETE missing)")
        with open(os.path.join(d, "COMPLETE")) as f:
            sums = json.load(f).get("crc32", {})
        for side in self.sides:
            path = os.path.join(d, f"{side}.bin")
            if not os.path.exists(path) or os.path.getsize(path) != self.expected_bytes(side):
                raise CacheCorruptError(
                    f"{path} is missing or has the wrong size (expected {self.expected_bytes(side)} bytes): "
                    "truncated or from another run; delete the cache dir to recompute it"
                )
        for fname, want in sums.items():
            got = file_crc32(os.path.join(d, fname))
            if got != want:
                raise CacheCorruptError(
                    f"{os.path.join(d, fname)} is corrupted (crc32 {got}, written as {want}); "
                    "delete the cache dir to recompute it"
                )

    def remove_generations_except(self, keep: Sequence[str]) -> None:
        self.close_maps()
        for entry in os.listdir(self.dir):
            if entry.startswith("gen-") and entry not in keep:
                shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)
