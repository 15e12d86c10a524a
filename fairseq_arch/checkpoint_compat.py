"""Let fairseq load its own checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default; fairseq 0.12's
``checkpoint_utils`` calls ``torch.load(f, map_location=...)`` on checkpoints that
hold its config, meters and optimizer history, so ``fairseq-generate`` fails with an
``UnpicklingError``; ``distributed.utils`` does the same when rank 0 broadcasts a
loaded checkpoint to the other ranks (multi-GPU resume fails on rank 1). We give
those two fairseq modules (and only them) a ``torch`` whose ``load`` defaults to
``weights_only=False``, fairseq's behaviour before torch 2.6. As always with fairseq
checkpoints (pickles): load only files you trust.
"""

import types

import torch


class _TorchWithTrustedLoad(types.ModuleType):
    """``torch`` for one module: everything delegates, ``load`` trusts the file."""

    def __init__(self, real):
        super().__init__(real.__name__)
        self.__dict__["_real"] = real

    def __getattr__(self, name):
        return getattr(self.__dict__["_real"], name)

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self.__dict__["_real"].load(*args, **kwargs)


def install() -> None:
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    for module in (checkpoint_utils, distributed_utils):
        if not isinstance(module.torch, _TorchWithTrustedLoad):
            module.torch = _TorchWithTrustedLoad(torch)
