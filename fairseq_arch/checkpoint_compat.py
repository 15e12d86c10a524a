"""Let fairseq load its own checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default; fairseq 0.12's
``checkpoint_utils`` calls ``torch.load(f, map_location=...)`` on checkpoints that
hold its config, meters and optimizer history, so ``fairseq-generate`` fails with an
``UnpicklingError``. We give ``fairseq.checkpoint_utils`` (and only it) a ``torch``
whose ``load`` defaults to ``weights_only=False``, fairseq's behaviour before torch
2.6. As always with fairseq checkpoints (pickles): load only files you trust.
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

    if not isinstance(checkpoint_utils.torch, _TorchWithTrustedLoad):
        checkpoint_utils.torch = _TorchWithTrustedLoad(torch)
