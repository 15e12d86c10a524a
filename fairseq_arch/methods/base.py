"""What every ``--adv-method`` declares, and what one training step of it returns.

A method is a small class registered by name (``fairseq_arch/methods/__init__.py``). The
criterion builds one instance from its config and asks it two things per training
batch: whether this batch is plain label-smoothed CE (:meth:`Method.is_plain`), and
otherwise for the step's losses (:meth:`Method.step`). Everything else the code needs
to know about a method is a class attribute read at start.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch


@dataclass
class StepResult:
    """One training step's losses (summed over the batch's target tokens) and counts."""

    total: torch.Tensor  # what the trainer backpropagates
    ls_loss: torch.Tensor  # the label-smoothed CE (mean of the passes that have one)
    nll_loss: torch.Tensor
    reg: torch.Tensor  # the regulariser before lambda (0 when skipped or none)
    delta: Dict[str, torch.Tensor] = field(default_factory=dict)  # side -> B x T x C trained on
    net_output: Any = None  # the clean forward's output, for --report-accuracy (None: not kept)
    fwd: int = 0  # model forwards of the step
    bwd: int = 0  # gradient computations (each autograd.grad, plus the trainer's backward)
    fresh: int = 0  # ARCH: sentences with a fresh ascent
    cached: int = 0  # ARCH: sentences read from the cache
    rebuilt: int = 0  # ARCH: sentences rebuilt from neighbours
    skipped: int = 0  # 1 when the regulariser was dropped (non-finite)

    def stats(self) -> Dict[str, int]:
        return {"arch_fresh": self.fresh, "arch_cached": self.cached, "arch_rebuilt": self.rebuilt,
                "adv_skipped": self.skipped}


class Method:
    """Base of every method; subclasses set the declarations and implement :meth:`step`."""

    name = ""  # set by register_method
    # takes torch.autograd.grad w.r.t. delta (so refuses fairseq's activation checkpointing)
    runs_ascent = False
    # loss = CE(f(x)) + lambda * R with f(x) detached in R: the clean CE's gradient is final
    # right after the clean forward (arch_translation backpropagates it early, early_backward.py)
    detached_teacher = False
    # reads and writes ARCH's perturbation cache (needs --task arch_translation)
    needs_cache = False
    default_init = "uniform"  # --adv-init when unset
    default_kl = "forward"  # --adv-kl when unset
    # (forwards, backwards) of one training batch, each as (fixed, per ascent step): smart's
    # ((2, 1), (1, 1)) is S + 2 forwards, S + 1 backwards; reuse_counts: ARCH's reuse epochs
    counts = ((1, 0), (1, 0))
    reuse_counts = None

    @classmethod
    def passes(cls, steps: int, refresh: bool = True) -> Tuple[int, int]:
        """(forwards, backwards) of one regularised training batch, S = ``steps``;
        ``refresh``: an ARCH refresh epoch (else a reuse epoch, for a method that has them)."""
        (f0, fs), (b0, bs) = cls.counts if refresh or cls.reuse_counts is None else cls.reuse_counts
        return f0 + fs * steps, b0 + bs * steps

    @classmethod
    def check_config(cls, cfg, task) -> None:
        """Refuse, at start and naming the option, settings this method cannot run with."""

    def __init__(self, criterion):
        self.criterion = criterion
        # --adv-teacher grad: the gradient flows through the clean branch too (no early backward)
        self.detached_teacher = type(self).detached_teacher and not criterion.teacher_grad
        self.batches_seen = 0  # regularised training batches: seeds noise without an epoch

    def is_plain(self) -> bool:
        """Whether the next training batch is plain label-smoothed CE (1 forward, 1 backward)."""
        return self.criterion.adv_lambda == 0

    def noise_key(self) -> int:
        """The "epoch" part of a sample's init seed: the epoch with arch_translation's cache
        (the same noise for a sample whatever rank or batch it is in), else a batch counter."""
        cache = getattr(self.criterion.task, "arch_cache", None)
        if cache is not None and cache.epoch is not None:
            return cache.epoch
        return 1_000_000 + self.batches_seen

    def step(self, model, sample) -> StepResult:
        raise NotImplementedError

    def train(self, model, sample) -> StepResult:
        """One regularised training step (the criterion's forward when not plain)."""
        self.batches_seen += 1
        return self.step(model, sample)


def zero(like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(())


def padding_masks(net_input, padding_idx: int) -> Dict[str, torch.Tensor]:
    """B x T True on the real tokens of each side's embedding input."""
    return {"source": net_input["src_tokens"].ne(padding_idx),
            "target": net_input["prev_output_tokens"].ne(padding_idx)}


def finite_or_skipped(reg: torch.Tensor, result_like: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """A non-finite regulariser is dropped (never trained on) and counted."""
    if not torch.isfinite(reg):
        return zero(result_like), True
    return reg, False

