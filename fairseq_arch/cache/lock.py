"""One training job per cache dir: the lock on ``owner.token``.

Two fairseq-train jobs on one ``--arch-cache-dir`` (say, the same ``--save-dir`` with
another ``--adv-eps``) would both write into the same generation and each read the
other's rows: a silently wrong cache. So rank 0 of a job takes an exclusive lock on
``owner.token`` when it opens the dir and keeps the file open for the rest of the
process's life; a second job's rank 0 is refused at start with a message naming the
holder. The other ranks of a job take no lock: they read rank 0's token back from the
file (:class:`fairseq_arch.cache.state.OwnerToken`), which only proves that they see
the same directory.

The file holds a JSON record of the holder: its token (fresh at every start), host,
pid, the pid's start time (to tell a reused pid apart), boot id and the start time.
It is rewritten in place, never replaced: a lock belongs to an inode, and a renamed-over
file would leave the holder locking a file nobody else opens.

What is guaranteed, and where:
  - ``fcntl.flock`` is the authority wherever it works: the OS drops the lock when the
    holder ends in any way (exit, exception, SIGKILL, OOM kill), so a killed job never
    blocks its resume (forked children, DataLoader workers, close their copies of the
    fd: a lock lives while any copy is open). On local filesystems it is exact. On NFS, Linux emulates flock
    with byte-range locks on the server (NFSv3 with lockd, NFSv4), so jobs on different
    nodes exclude each other too. A holder whose *node* died (not just its process)
    keeps its lock until the server notices: NFSv4 when the client's lease runs out
    (90 s by default), NFSv3 when that node reboots (statd tells the server) -- until
    then the resume is refused, naming the dead holder.
  - NFS mounted ``nolock`` (or ``local_lock=flock``) keeps locks local to each node:
    two jobs on *different* nodes are then not detected. Nothing in a file can tell a
    live job on another node from one that died there without a heartbeat; use a
    filesystem with working locks, or one cache dir per job.
  - A filesystem that refuses flock (ENOLCK, EOPNOTSUPP, ENOSYS: e.g. Lustre without
    ``-o flock``): the holder record decides, logged once. A holder on this host is
    alive while its pid runs with the recorded start time; a holder on another host
    counts as alive unless its record says it was released (at a normal exit, by an
    atexit hook; processes of multiprocessing's spawn, as fairseq starts one rank per
    GPU, leave without running it) -- the refusal then says which file to delete once
    that job is known to be gone.
  - A process that opens the same dir again (in-process tests, a second task in one
    interpreter) keeps its lock and restamps the token.
"""

import atexit
import errno
import json
import logging
import os
import socket
import time
import uuid
from typing import Dict, Optional

from .files import disk_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: only the holder record
    fcntl = None

logger = logging.getLogger(__name__)

# errnos of a filesystem that does not do flock at all (not "held by someone")
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_HELD: Dict[str, int] = {}  # real path of a lock file -> the fd this process holds it by
_WARNED = set()
_ATEXIT = []  # registered once


class CacheInUseError(RuntimeError):
    """Another training job holds the cache dir."""


def _proc_start(pid: int) -> Optional[int]:
    """The start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _record() -> dict:
    pid = os.getpid()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid, "pid_start": _proc_start(pid),
            "boot_id": _boot_id(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "released": None}


def parse_record(text: str) -> Optional[dict]:
    """The holder record of a lock file's text; a bare token (written by fairseq-arch
    before the lock existed) is a record with only a token; None when empty or garbled."""
    text = text.strip()
    if not text:
        return None
    try:
        rec = json.loads(text)
    except ValueError:
        return {"token": text} if all(c in "0123456789abcdef" for c in text) else None
    return rec if isinstance(rec, dict) and isinstance(rec.get("token"), str) else None


def _read_fd(fd: int) -> Optional[dict]:
    try:
        return parse_record(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    except OSError:
        return None


def _write_fd(fd: int, record: dict, path: str = "owner.token") -> None:
    data = json.dumps(record, sort_keys=True).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)  # on NFS: the other nodes' ranks read the token next
    except OSError as e:
        raise disk_error(e, f"writing {path}", len(data), where=path) from None


def held_token(path: str) -> Optional[str]:
    """The token this process wrote into ``path``, if it holds its lock (else None)."""
    fd = _held_fd(path)
    rec = _read_fd(fd) if fd is not None else None
    return rec["token"] if rec else None


def _held_fd(path: str) -> Optional[int]:
    """This process's fd of ``path``, if it holds it and the path still names that file
    (a dir deleted and made again holds a new, unlocked file)."""
    key = os.path.realpath(path)
    fd = _HELD.get(key)
    if fd is None:
        return None
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(key))
    except OSError:
        same = False
    if not same:
        os.close(fd)
        del _HELD[key]
        return None
    return fd


def acquire(path: str, cache_dir: str) -> str:
    """Lock ``path`` for this process (or keep the lock it has), write a fresh holder
    record, return its token. Raises CacheInUseError naming the holder."""
    fd = _held_fd(path)
    if fd is None:
        for held in list(_HELD):  # close the fds of dirs deleted since (tests make many)
            _held_fd(held)
        fd = _lock(path, cache_dir)
        if not _ATEXIT:
            _ATEXIT.append(atexit.register(_release_all))
        _HELD[os.path.realpath(path)] = fd
    record = _record()
    _write_fd(fd, record, path)
    return record["token"]


def _lock(path: str, cache_dir: str) -> int:
    """Open and lock ``path``: the fd, held from now on; refused if a live job holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _try_flock(fd, path)
        previous = _read_fd(fd)
        if locked is False or (locked is None and holder_alive(previous)):
            raise CacheInUseError(in_use_message(cache_dir, path, previous, checked=locked is False))
    except BaseException:
        os.close(fd)  # a flock belongs to its open file: closing ours leaves the holder's
        raise
    if previous and not previous.get("released") and previous.get("pid") not in (None, os.getpid()):
        logger.info(f"ARCH cache: {cache_dir} was last held by {describe(previous)}, which ended without "
                    "releasing it (killed?); taking it over")
    return fd


def _try_flock(fd: int, path: str) -> Optional[bool]:
    """True: locked; False: another open file holds the lock; None: no flock here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        if path not in _WARNED:
            _WARNED.add(path)
            logger.warning(f"ARCH cache: the filesystem of {path} does not support file locks ({e.strerror}): "
                           "a second job on this cache dir is detected from the holder it records only "
                           "(exact on this host; a holder on another host must be released or deleted)")
        return None


def holder_alive(rec: Optional[dict]) -> bool:
    """Without flock: whether the recorded holder may still run (lock.py docstring)."""
    if not rec or rec.get("released") or "pid" not in rec:
        return False
    if rec.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    pid = rec["pid"]
    if pid == os.getpid() or (rec.get("boot_id") and rec["boot_id"] != _boot_id()):
        return False  # this process, or a holder from before a reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    start = rec.get("pid_start")
    return start is None or _proc_start(pid) in (None, start)


def describe(rec: Optional[dict]) -> str:
    if not rec or "pid" not in rec:
        return "a job that left no record of itself"
    return f"host {rec.get('host')}, pid {rec.get('pid')}, started {rec.get('started')}"


def in_use_message(cache_dir: str, path: str, rec: Optional[dict], checked: bool) -> str:
    msg = (f"--arch-cache-dir {cache_dir} is in use by another training job ({describe(rec)}; recorded in "
           f"{path}): two jobs on one cache would mix their perturbations. Wait for that job to end, or stop "
           f"it (kill {rec.get('pid') if rec else '<pid>'} on {rec.get('host') if rec else 'its host'}), or "
           "give this job a cache of its own: another --save-dir, or --arch-cache-dir pointing elsewhere.")
    if not checked and rec and rec.get("host") != socket.gethostname():
        msg += (f" This filesystem has no file locks, so whether that job still runs cannot be checked from "
                f"{socket.gethostname()}: once it is known to be gone, delete {path} and start again.")
    return msg


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) inherits the held fds: it closes its copies,
    so that it neither keeps a killed parent's lock alive nor marks it released at its
    own exit (a flock lasts while any copy is open; the parent's stays)."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _release_all() -> None:
    """At a normal exit: mark the records released (what the no-flock fallback reads),
    then close (which drops the locks; a killed process drops them too)."""
    for fd in list(_HELD.values()):
        rec = _read_fd(fd)
        try:
            if rec is not None:
                _write_fd(fd, dict(rec, released=time.strftime("%Y-%m-%d %H:%M:%S %Z")))
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
