"""Small torch.distributed helpers for the cache: rank-0 work whose failure is
raised on every rank (instead of leaving the others waiting in a barrier)."""

from typing import Any, Callable, Tuple

import torch.distributed as dist


class CacheSetupError(RuntimeError):
    """Raised on every rank when rank 0 fails to prepare the cache."""


def dist_info() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if dist_info()[1] == 1:
        return [obj]
    out = [None] * dist_info()[1]
    dist.all_gather_object(out, obj)
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
        raise CacheSetupError(f"rank 0 failed to prepare the ARCH cache: {error}")
    return result
