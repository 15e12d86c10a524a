"""File helpers of the cache: atomic writes, checksums, size checks, disk errors.

Every file the cache reads back was written atomically (a temporary name, then
``os.replace``), so a file that is unreadable or has the wrong size was damaged
outside this program: it is reported as :class:`CacheCorruptError` naming the file,
never as a traceback deep inside a run.
"""

import contextlib
import errno
import json
import os
import shutil
import zlib
from typing import Dict, Iterator, Optional

import numpy as np

# the advice every check of a damaged cache file gives
DAMAGED = "the cache dir is damaged; delete the cache dir to recompute it"


class CacheMismatchError(RuntimeError):
    """The cache dir does not belong to this run (other data, settings, or epoch)."""


class CacheCorruptError(RuntimeError):
    """A cache file is truncated or its contents changed since it was written."""


def atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def atomic_save_npy(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


@contextlib.contextmanager
def replaced_dir(path: str) -> Iterator[str]:
    """Yields an empty temporary directory; once the block has filled it, it replaces
    ``path`` whole (a reader finds the old directory, the new one, or none)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def read_json_dict(path: str) -> dict:
    """A JSON object from one of the cache's own files, or CacheCorruptError naming it."""
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


def file_crc32(path: str, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def crc32_problem(directory: str, sums: Dict[str, str]) -> Optional[str]:
    """Why the files of ``directory`` do not match their recorded ``sums`` (``{file name:
    crc32}``), or None when every one does."""
    for fname, want in sums.items():
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
            return f"{path} is missing"
        got = file_crc32(path)
        if got != want:
            return f"{path} is corrupted (crc32 {got}, written as {want})"
    return None


def check_size(path: str, want: int) -> None:
    """A file the layout fixes the size of (a ``.bin`` of rows, the write flags)."""
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size != want:
        raise CacheCorruptError(
            f"{path} has the wrong size ({'missing' if size is None else f'{size} bytes'}, expected {want} "
            f"bytes): truncated or from another run; {DAMAGED}")


def disk_error(e: OSError, what: str) -> RuntimeError:
    """An OSError of the cache's writes as the error a user can act on."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RuntimeError(
            f"no space left on device while {what}. The previous cache generation is intact; "
            "free some space (or move --arch-cache-dir) and resume from checkpoint_last.pt"
        )
    return RuntimeError(f"I/O error while {what}: {e}")


def write_all(fd: int, data: bytes, what: str) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise disk_error(e, what) from e


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def size_now(path: str) -> int:
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


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (files created in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
