"""The step shared by the KL-regularised methods (r3f, smart, arch):

    loss = LS-CE(f(x)) + lambda * KL(f(x) || f(x + delta)),

f(x) the detached clean prediction (the teacher), summed over the real target tokens.
The methods differ only in where delta comes from (:meth:`KLRegularised.perturbation`):
seeded noise (r3f), a fresh ascent (smart), ARCH's cache (a fresh ascent stored on
refresh epochs, a read on reuse epochs).
"""

from typing import Dict, Optional, Tuple

import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from ..injection import unwrap_model
from .base import Method, StepResult, finite_or_skipped, padding_masks, zero
from .chunked import chunked_regulariser, warn_unchunked


class AscentObjective:
    """The ascent's objective: the divergence from the teacher of a perturbed forward
    through the unwrapped model (counted as a forward)."""

    def __init__(self, criterion, core, sample, teacher, counts: Dict[str, int]):
        self.criterion, self.core, self.sample, self.teacher, self.counts = criterion, core, sample, teacher, counts

    def forward(self, delta):
        out = self.criterion.perturbed_forward(self.core, self.sample["net_input"], delta)
        self.counts["fwd"] += 1
        return out

    def divergence(self, out) -> torch.Tensor:
        return self.criterion.divergence(self.core, out, self.sample, self.teacher)


def fresh_ascent(criterion, core, sample, masks, teacher, key: int, result: StepResult, init=None, move=None):
    """A fresh ascent from the seeded start ``key`` (or ``init``; ``move``: each side's step,
    see ProjectedAscent.run), its passes counted in ``result``; None when it is not finite."""
    counts = {"fwd": 0, "bwd": 0}
    try:
        return criterion.fresh_perturbation(core, sample, teacher, masks, key, counts=counts, init=init, move=move)
    except FloatingPointError:
        return None
    finally:
        result.fwd += counts["fwd"]
        result.bwd += counts["bwd"]


class KLRegularised(Method):
    detached_teacher = True

    def perturbation(self, core, sample, masks, teacher, result: StepResult) -> Optional[Dict[str, torch.Tensor]]:
        """delta of every perturbed side (B x T x C), or None when it could not be
        computed (a non-finite ascent: the batch trains on the clean CE alone)."""
        raise NotImplementedError

    def regulariser(self, model, sample, delta, teacher, loss) -> Tuple[torch.Tensor, bool]:
        """(the KL of the perturbed forward before lambda, whether it was dropped as not
        finite); in ``--adv-chunks`` chunks when the clean CE went backward early."""
        crit = self.criterion
        if crit.adv_chunks > 1:
            if crit.early_backward is not None:
                reg, dropped = chunked_regulariser(crit, model, sample, delta, teacher, crit.adv_chunks)
                return reg, dropped > 0
            warn_unchunked(crit.adv_chunks)
        adv_output = crit.perturbed_forward(model, sample["net_input"], delta)
        reg = crit.divergence(model, adv_output, sample, teacher, through_teacher=crit.teacher_grad)
        del adv_output
        return finite_or_skipped(reg, loss)

    def step(self, model, sample) -> StepResult:
        crit = self.criterion
        net_input = sample["net_input"]
        core = unwrap_model(model)
        masks = padding_masks(net_input, crit.padding_idx)
        net_output = model(**net_input)  # clean forward, through the DDP wrapper
        # one log-softmax serves the label-smoothed loss and the (detached) teacher
        lprobs, target = crit.get_lprobs_and_target(model, net_output, sample)
        loss, nll_loss = label_smoothed_nll_loss(lprobs, target, crit.eps, ignore_index=crit.padding_idx, reduce=True)
        if crit.early_backward is not None:
            # Peak memory: the teacher is detached, so the CE's gradient is final already.
            # Backpropagating it now (locally: the task holds off DDP's all-reduce) frees
            # the clean graph before the ascent and the perturbed forward build theirs;
            # the trainer's backward then runs through lambda * KL only. `loss` keeps its
            # value: the logged and returned loss is still the total.
            if not crit.report_accuracy:
                net_output = None  # the clean logits: read again only for the accuracy
            crit.early_backward(loss)
            loss = loss.detach()
        # the teacher's rows are copied after the early backward: during it the graph holds
        # the log-probs anyway, and the copy would add to the clean backward's peak
        teacher = crit.teacher(lprobs, target, sample)
        del lprobs  # B x T x V, no longer needed (the teacher holds the real rows)
        result = StepResult(loss, loss, nll_loss, zero(loss), net_output=net_output, fwd=1)
        if crit.dummy_batch:
            delta = crit.space.zeros(core, masks)  # a dummy batch's ids never touch the cache
        else:
            delta = self.perturbation(core, sample, masks, teacher, result)
        skip = delta is None
        if not skip:
            result.fwd += 1
            result.reg, skip = self.regulariser(model, sample, delta, teacher, loss)
        result.skipped = int(skip)
        result.delta = {} if skip else delta
        result.bwd += 1  # the trainer's backward of the total loss
        result.total = loss + crit.adv_lambda * result.reg.to(loss.dtype)
        return result
