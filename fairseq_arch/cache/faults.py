"""Test hooks of the crash-consistency tests, at named points of the cache's work."""

import errno
import logging
import os
import signal
import time

logger = logging.getLogger(__name__)

_hits = {"count": 0}


def fault_point(name: str) -> None:
    """``FAIRSEQ_ARCH_FAULT=<name>:<n>`` SIGKILLs this process the n-th time it passes
    ``name``; ``FAIRSEQ_ARCH_SLEEP=<name>:<seconds>`` sleeps there every time (a slow step,
    e.g. a long finalisation on rank 0); ``FAIRSEQ_ARCH_ENOSPC=<name>`` raises "no space left
    on device" there (a full disk, e.g. ``write@state.json``: the atomic writes of files.py).
    Unset in normal runs (three dict lookups)."""
    if os.environ.get("FAIRSEQ_ARCH_ENOSPC") == name:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (FAIRSEQ_ARCH_ENOSPC={name})")
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
    _hits["count"] += 1
    if _hits["count"] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
