"""Small torch.distributed helpers for the cache: rank-0 work whose failure is
raised on every rank (instead of leaving the others waiting in a barrier).

The cache's collectives run on a process group of their own, with a long timeout.
While rank 0 finalises a refresh (merging the ranks' shards, row means, checksums,
the neighbour search: minutes, up to tens of minutes at WMT scale) every other rank
waits in a cache collective. On fairseq's default group that wait is bounded by the
group's timeout -- NCCL's default is 10 minutes (gloo's 30) -- and a long
finalisation would crash the run. So every cache collective (the
broadcast of rank 0's result, the all-gathers of the cache and of the task's epoch
start) runs on a gloo group made once, on every rank, with the timeout
``CACHE_TIMEOUT`` (6 hours; the environment variable ``FAIRSEQ_ARCH_CACHE_TIMEOUT``,
in seconds, overrides it). gloo reaches the other ranks over TCP, like the store of
``init_process_group`` (``GLOO_SOCKET_IFNAME`` picks the network interface).
"""

import os
from datetime import timedelta
from typing import Any, Callable, Optional, Tuple

import torch.distributed as dist

# how long a rank waits in a cache collective for the others (rank 0's finalisation)
CACHE_TIMEOUT = timedelta(hours=6)
TIMEOUT_ENV = "FAIRSEQ_ARCH_CACHE_TIMEOUT"
# how long making the group may take (every rank connects to every other)
CONNECT_TIMEOUT = timedelta(minutes=10)


class RankZeroError(RuntimeError):
    """Raised on the other ranks when the work rank 0 did for them (:func:`on_rank0`)
    failed: opening the cache dir, finalising a refresh, an epoch's checks."""


def dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cache_timeout() -> timedelta:
    """CACHE_TIMEOUT, or FAIRSEQ_ARCH_CACHE_TIMEOUT seconds when set."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return CACHE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


# (the default group it was made for, the cache's group): made again only if the
# default group is destroyed and initialised anew in the same process
_GROUP: Optional[Tuple[Any, Any]] = None


def cache_group():
    """The cache's process group (gloo, timeout ``cache_timeout()``); None in a single
    process. Made at the first cache collective: every rank makes the cache's
    collectives in the same order, at the same point of training, so every rank makes
    this group at the same point of its sequence of ``new_group`` calls, as torch
    requires (fairseq makes its own groups the same way, on every rank)."""
    global _GROUP
    if dist_info()[1] == 1:
        return None
    world = dist.group.WORLD
    if _GROUP is None or _GROUP[0] is not world:
        timeout = cache_timeout()
        # gloo connects every pair of ranks when the group is made, retrying until the
        # timeout: connect within CONNECT_TIMEOUT (a network gloo cannot use fails in
        # minutes, not hours), then wait up to the cache's timeout in its collectives
        settable = hasattr(dist.distributed_c10d, "_set_pg_timeout")
        try:
            group = dist.new_group(backend="gloo", timeout=min(timeout, CONNECT_TIMEOUT) if settable else timeout)
        except RuntimeError as e:
            raise RuntimeError(
                f"the ARCH cache could not make its gloo process group ({e}); gloo connects the ranks "
                "over TCP: set GLOO_SOCKET_IFNAME to a network interface every node can reach") from e
        if settable:
            dist.distributed_c10d._set_pg_timeout(timeout, group)
        _GROUP = (world, group)
    return _GROUP[1]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=cache_group())
    return box[0]


def all_gather_object(obj: Any) -> list:
    if dist_info()[1] == 1:
        return [obj]
    out = [None] * dist_info()[1]
    dist.all_gather_object(out, obj, group=cache_group())
    return out


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error."""
    rank, world = dist_info()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            if world == 1:
                raise
            error = f"{type(e).__name__}: {e}"
    result, error = broadcast_object((result, error))
    if error is not None:
        raise RankZeroError(f"rank 0 failed in the ARCH cache's work: {error}")
    return result
