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
import tempfile
import zlib
from typing import BinaryIO, Callable, Dict, Iterator, Optional

import numpy as np

from .faults import fault_point

# the advice every check of a damaged cache file gives; it works: a resumed epoch that finds
# no cache recomputes it from the checkpoint (lifecycle.py: Recovery)
DAMAGED = ("the cache dir is damaged; delete the cache dir and resume: the resumed epoch recomputes it "
           "from the checkpoint")


class CacheMismatchError(RuntimeError):
    """The cache dir does not belong to this run (other data, settings, or epoch)."""


class CacheCorruptError(RuntimeError):
    """A cache file is truncated or its contents changed since it was written."""


class CacheIOError(RuntimeError):
    """The cache dir cannot be written: a full disk, a read-only or missing directory."""


def _replace_with(path: str, tmp: str, write: Callable[[BinaryIO], None], nbytes: int) -> None:
    """Write ``tmp`` with ``write``, make it durable, rename it to ``path``. An OSError
    (a full disk, a read-only dir) leaves no temporary file behind and is raised as the
    error a user can act on, naming the file (:func:`disk_error`)."""
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            fault_point(f"write@{os.path.basename(path)}")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise disk_error(e, f"writing {path}", nbytes, where=path) from e


def atomic_write_json(path: str, obj) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    _replace_with(path, path + ".tmp", lambda f: f.write(data), len(data))


def atomic_write_text(path: str, text: str) -> None:
    data = text.encode()
    _replace_with(path, path + ".tmp", lambda f: f.write(data), len(data))


def atomic_save_npy(path: str, arr: np.ndarray) -> None:
    _replace_with(path, path + ".tmp.npy", lambda f: np.save(f, arr), arr.nbytes + 128)


def load_npy(path: str) -> np.ndarray:
    """A ``.npy`` file the cache wrote, memory-mapped; a missing or unreadable one is
    reported as :class:`CacheCorruptError` naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CacheCorruptError(f"{path} is missing: {DAMAGED}") from None
    except (ValueError, OSError, EOFError) as e:
        raise CacheCorruptError(f"{path} is unreadable ({e}): {DAMAGED}") from None


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


def make_cache_dir(path: str) -> None:
    """Create ``--arch-cache-dir`` if needed and check that this process can write in it:
    refused at start, naming the option, instead of a FileExistsError or OSError from the
    first write. (A write probe, not os.access: root passes os.access on any directory.)"""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CacheIOError(f"--arch-cache-dir {path} is a file, not a directory: point --arch-cache-dir at a "
                           "directory (a missing one is created), or move the file away")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_error(e, f"creating a file in --arch-cache-dir {path}", 0, where=path) from e
        raise CacheIOError(f"--arch-cache-dir {path} cannot be created or written ({e.strerror}): point "
                           "--arch-cache-dir at a directory this process can write (a missing one is created), "
                           "or fix its permissions") from e


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


def disk_error(e: OSError, what: str, nbytes: Optional[int] = None, where: Optional[str] = None) -> CacheIOError:
    """An OSError of the cache's writes as the error a user can act on; ``nbytes`` (the
    size of what was being written) and the free space of ``where`` (a path on that
    disk) are said when the disk is full."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = "" if nbytes is None else f" (needs {nbytes} bytes, {free_bytes(where)} free)"
        return CacheIOError(
            f"no space left on device while {what}{need}. Nothing already in the cache was changed; "
            "free some space (or move --arch-cache-dir) and resume from checkpoint_last.pt"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheIOError(f"cannot write to the cache while {what} ({e.strerror}): --arch-cache-dir must be a "
                            "directory this process can write; fix its permissions or point it elsewhere, "
                            "then resume from checkpoint_last.pt")
    return CacheIOError(f"I/O error while {what}: {e}")


def free_bytes(where: Optional[str]) -> str:
    """The free bytes of the filesystem holding ``where`` (its nearest existing parent), or "?"."""
    d = os.path.abspath(where) if where else None
    while d and not os.path.isdir(d):
        d = os.path.dirname(d) if os.path.dirname(d) != d else None
    try:
        return str(shutil.disk_usage(d).free) if d else "?"
    except OSError:
        return "?"


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
