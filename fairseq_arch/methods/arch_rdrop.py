"""``arch-rdrop``: R-Drop's objective with ARCH's cached adversarial delta on its second
branch: ``(LS(p1) + LS(p2)) / 2 + lambda / 2 * symKL(p1, p2)``, p1 = f(x), p2 = f(x + delta),
both under dropout, gradients through both (the scale convention of ``rdrop.py``). delta
is ARCH's (``arch.py``): a fresh ascent on refresh epochs (from p1, detached), stored in
the cache; the cached or neighbour-rebuilt rows on reuse epochs. So a reuse epoch costs
what R-Drop costs (2 forwards, one backward through both), a refresh epoch adds the ascent."""

from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from ..injection import unwrap_model
from . import register_method
from .arch import UsesArchCache, arch_perturbation
from .base import Method, StepResult, padding_masks
from .rdrop import rdrop_objective


@register_method("arch-rdrop")
class ARCHRDrop(UsesArchCache, Method):
    default_kl = "symmetric"

    def step(self, model, sample) -> StepResult:
        crit = self.criterion
        net_input = sample["net_input"]
        core = unwrap_model(model)
        masks = padding_masks(net_input, crit.padding_idx)
        out1 = model(**net_input)
        lp1, target = crit.get_lprobs_and_target(model, out1, sample)
        ls1, nll1 = label_smoothed_nll_loss(lp1, target, crit.eps, ignore_index=crit.padding_idx, reduce=True)
        result = StepResult(ls1, ls1, nll1, ls1.new_zeros(()), net_output=out1, fwd=1)
        if crit.dummy_batch:
            delta = crit.space.zeros(core, masks)
        else:  # the detached teacher is the ascent's objective only: reuse epochs never read it
            refresh = crit.task.arch_cache is not None and crit.task.arch_cache.mode == "refresh"
            teacher = crit.teacher(lp1, target, sample) if refresh else None
            delta = arch_perturbation(crit, core, sample, masks, teacher, result)
        if delta is None:  # a non-finite ascent: this batch trains on the first branch's CE
            result.skipped, result.bwd = 1, result.bwd + 1
            return result
        out2 = crit.perturbed_forward(model, net_input, delta)
        lp2, _ = crit.get_lprobs_and_target(model, out2, sample)
        loss, nll_loss, reg, result.total, skipped = rdrop_objective(crit, (ls1, nll1), lp1, lp2, target, crit.adv_kl)
        result.ls_loss, result.nll_loss, result.reg, result.delta = loss, nll_loss, reg, delta
        result.fwd, result.bwd, result.skipped = result.fwd + 1, result.bwd + 1, int(skipped)
        return result
