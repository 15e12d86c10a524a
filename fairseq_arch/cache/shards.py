"""Per-rank shards of a generation being written.

The ranks of a refresh epoch never write the shared ``.bin`` files: on several nodes
over NFS, pages are written back whole and the rows of neighbouring sentences share
pages, so the last node to flush a page would overwrite the other nodes' rows with
stale bytes (silently: the checksums are computed afterwards). Each rank appends its
rows to a shard of its own, ``<side>.r<rank>.shard``: records of a 32-byte header
(magic, crc32 of the row, cached position, row bytes, flags) followed by the row in
the cache dtype. Only rank 0 writes ``.bin`` files and write flags, and only while it
holds the generation alone (at an epoch start, the other ranks waiting with their
shards closed): :meth:`ShardLog.merge_side` folds every shard in, in rank order then
record order (the last record of a position wins, as the last write into a memory map
did), makes the ``.bin`` durable, then the shards are deleted. Rank 0 merges at
finalisation and also when a run resumes in the middle of a refresh epoch, so a shard
only ever holds rows of one process's lifetime. A refresh therefore needs room for the
shards too: up to one more generation's rows. A process reads back the rows it wrote
itself (its open shard's index of the last record of each position).
"""

import logging
import os
import struct
import time
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .files import CacheCorruptError, check_size, disk_error, fsync_dir, pwrite_all, size_now, write_all
from .layout import CacheLayout

logger = logging.getLogger(__name__)

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


def _record_problem(head: bytes, f, row_bytes: Callable[[int], Optional[int]]):
    """(problem or None, position, written, payload) of the record whose header is ``head``."""
    if len(head) < SHARD_RECORD.size:
        return "header cut short", -1, False, b""
    magic, crc, pos, nbytes, flags, _ = SHARD_RECORD.unpack(head)
    if magic != SHARD_MAGIC:
        return "no record header", pos, False, b""
    want = row_bytes(pos)
    if want is None or nbytes != want:
        return f"cached position {pos} with {nbytes} bytes does not fit the layout", pos, False, b""
    payload = f.read(nbytes)
    if len(payload) < nbytes:
        return "row cut short", pos, False, b""
    if zlib.crc32(payload) != crc:
        return "crc32 mismatch", pos, False, b""
    return None, pos, bool(flags & SHARD_WRITTEN), payload


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
            problem, pos, written, payload = _record_problem(head, f, row_bytes)
            if problem is not None:
                logger.warning(f"ARCH cache: {path}: record {n} and the rest ignored ({problem}): a write "
                               "was cut short")
                return
            yield pos, written, payload
            n += 1


class OpenShard:
    """This process's open shard of one side of a generation being written."""

    __slots__ = ("fd", "path", "fname", "end", "index")

    def __init__(self, fd: int, path: str, fname: str, num_cached: int):
        self.fd, self.path, self.fname = fd, path, fname
        self.end = os.fstat(fd).st_size
        self.index = np.full(num_cached, -1, dtype=np.int64)  # cached position -> offset of its last row


class ShardLog:
    """This rank's shards (appends, read-back, durability, sizes reported to rank 0) and
    rank 0's merge of every rank's shards into a generation's ``.bin`` files."""

    def __init__(self, layout: CacheLayout, rank: int):
        self.layout = layout
        self.rank = int(rank)
        self._open: Dict[Tuple[str, str], OpenShard] = {}  # (generation dir, side) -> open shard
        self._sizes: Dict[str, int] = {}  # "<generation>/<shard file>" -> bytes, not yet reported
        self._expected: Dict[str, int] = {}  # the same, of every rank: what rank 0 must find

    def opened(self, gen_dir: str, side: str) -> Optional[OpenShard]:
        return self._open.get((gen_dir, side))

    def append(self, gen_dir: str, side: str, positions: Sequence[int], rows: Sequence[np.ndarray],
               written: bool) -> None:
        data, starts = encode_records(positions, rows, self.layout.dtype, written=written)
        shard = self._shard(gen_dir, side)
        write_all(shard.fd, data, f"writing cache rows to {shard.path}")
        for p, at in zip(positions, starts):  # in order: the last row of a position wins
            shard.index[p] = shard.end + at
        shard.end += len(data)
        self._sizes[f"{os.path.basename(gen_dir)}/{shard.fname}"] = shard.end

    def read_back(self, shard: OpenShard, side: str, position: int) -> Optional[np.ndarray]:
        """The last row this process appended at ``position`` (float32), or None."""
        at = shard.index[position]
        if at < 0:
            return None
        off, dim, dtype = self.layout.offsets[side], self.layout.dims[side], self.layout.dtype
        n = int(off[position + 1] - off[position])
        buf = os.pread(shard.fd, n * dim * np.dtype(dtype).itemsize, int(at))
        return np.frombuffer(buf, dtype=dtype).reshape(n, dim).astype(np.float32)

    def _shard(self, gen_dir: str, side: str) -> OpenShard:
        key = (gen_dir, side)
        if key not in self._open:
            fname = shard_file(side, self.rank)
            path = os.path.join(gen_dir, fname)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as e:
                raise disk_error(e, f"opening {path}") from e
            self._open[key] = OpenShard(fd, path, fname, self.layout.num_cached)
        return self._open[key]

    def close(self, gen_dir: Optional[str] = None) -> None:
        """Close this process's shards (of one generation, or all): closing makes what it
        appended visible to rank 0 on another node (NFS close-to-open)."""
        for key in [k for k in self._open if gen_dir is None or k[0] == gen_dir]:
            os.close(self._open.pop(key).fd)

    def flush(self, gen_dir: str) -> None:
        """fsync this process's shards of a generation and the directory that holds them."""
        shards = [s for k, s in self._open.items() if k[0] == gen_dir]
        for shard in shards:
            os.fsync(shard.fd)
        if shards:
            fsync_dir(gen_dir)

    def take_sizes(self) -> Dict[str, int]:
        """What this process appended since the last call: ``{"<generation>/<shard>":
        bytes}``, gathered from every rank at an epoch start for rank 0 to check."""
        sizes, self._sizes = self._sizes, {}
        return sizes

    def expect(self, reports: Sequence[Dict[str, int]]) -> None:
        """Every rank's ``take_sizes()``: the shards (and sizes at least) that rank 0 must
        find when it merges them, however late a shared filesystem shows them."""
        self._expected = {}
        for report in reports:
            for key, size in report.items():
                self._expected[key] = max(size, self._expected.get(key, 0))

    def gather(self, gen_dir: str) -> Dict[str, List[str]]:
        """Rank 0, before a merge: every shard of a generation, once each reported one
        shows at least its reported size; ``{side: [paths in rank order]}``."""
        self.close(gen_dir)
        name = os.path.basename(gen_dir)
        expected = {k.split("/", 1)[1]: v for k, v in self._expected.items() if k.split("/", 1)[0] == name}
        _wait_for(gen_dir, expected)
        self._expected = {k: v for k, v in self._expected.items() if k.split("/", 1)[0] != name}
        files = sorted(set(f for f in os.listdir(gen_dir) if f.endswith(SHARD)) | set(expected))
        return {side: [os.path.join(gen_dir, f) for f in files if f.startswith(f"{side}.r")]
                for side in self.layout.sides}

    def merge_side(self, bin_path: str, side: str, paths: Sequence[str]) -> Tuple[int, np.ndarray]:
        """Fold the shards ``paths`` into ``bin_path`` and fsync it: (records merged, M
        bools: which positions a batch wrote)."""
        layout = self.layout
        check_size(bin_path, layout.expected_bytes(side))
        row = layout.dims[side] * np.dtype(layout.dtype).itemsize
        off = layout.offsets[side]
        written = np.zeros(layout.num_cached, dtype=bool)
        n = 0
        try:
            fd = os.open(bin_path, os.O_RDWR)
            try:
                for shard in paths:
                    for pos, was_written, payload in iter_shard(shard, lambda p: layout.row_bytes(side, p)):
                        pwrite_all(fd, payload, int(off[pos]) * row)
                        written[pos] |= was_written
                        n += 1
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise disk_error(e, f"merging the ranks' cache rows into {bin_path}") from e
        return n, written


def _wait_for(gen_dir: str, expected: Dict[str, int]) -> None:
    deadline = time.monotonic() + SHARD_WAIT_S
    for fname, size in sorted(expected.items()):
        path = os.path.join(gen_dir, fname)
        while True:
            seen = size_now(path)
            if seen >= size:
                break
            if time.monotonic() > deadline:
                raise CacheCorruptError(
                    f"{path}: a rank wrote {size} bytes to it, but rank 0 sees "
                    + ("no such file" if seen < 0 else f"{seen} bytes")
                    + f" after {SHARD_WAIT_S:.0f} s: --arch-cache-dir must be one directory on a "
                    "filesystem shared by all nodes (NFS: with close-to-open consistency)")
            time.sleep(0.5)
