"""``rdrop``: R-Drop (Liang et al., NeurIPS 2021): two forwards of the same batch with
dropout on (different masks), no perturbation, no cache; the label-smoothed CE of both
plus alpha * symmetric KL between the two predictions, gradients through both.
alpha = ``--adv-lambda`` (their IWSLT'14 De-En setting: 5).

Followed: the authors' fairseq criterion (github.com/dropreg/R-Drop,
``reg_label_smoothed_cross_entropy``: ``forward_reg`` + ``compute_kl_loss``). It forwards
the batch concatenated with itself once and minimises
``LS(p1) + LS(p2) + alpha * (KL(p1||p2) + KL(p2||p1)) / 2``, every term summed over the
real target tokens, divided by the tokens of ONE copy (sample_size = ntokens), with no
detach. We run two forwards of the batch instead (the same computation and masks
distribution, counted as 2 forwards like r3f's), and the symmetric KL is
:func:`~fairseq_arch.perturbation.divergence` ``(.., "symmetric")``, their ``compute_kl_loss``.

Scale: we minimise half of their objective, ``(LS1 + LS2)/2 + alpha/2 * symKL``, so that
the logged ``loss`` / ``nll_loss`` / ``ls_loss`` (the mean of the two passes) and
``gnorm`` are on the one-pass scale of every other method (``adv_loss`` is the symmetric
KL per token). A constant factor on the whole objective changes neither its minimiser,
nor Adam's updates (up to Adam's epsilon), nor fp16 loss scaling; only an absolute
``--clip-norm`` sees it (the recipes use ``--clip-norm 0``).
"""

from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from ..perturbation import divergence
from . import register_method
from .base import Method, StepResult, finite_or_skipped


def rdrop_objective(crit, first, lp1, lp2, target, kind: str):
    """R-Drop's objective (at half scale, module docstring) from the two passes' log-probs;
    ``first``: the first pass's (LS, nll). Returns (LS mean, nll mean, KL, total, skipped)."""
    ls1, nll1 = first
    ls2, nll2 = label_smoothed_nll_loss(lp2, target, crit.eps, ignore_index=crit.padding_idx, reduce=True)
    reg = divergence(lp1.float(), lp2.float(), target.ne(crit.padding_idx), kind)
    loss, nll_loss = (ls1 + ls2) / 2, (nll1 + nll2) / 2
    reg, skipped = finite_or_skipped(reg, loss)
    return loss, nll_loss, reg, loss + 0.5 * crit.adv_lambda * reg.to(loss.dtype), skipped


@register_method("rdrop")
class RDrop(Method):
    counts = ((2, 0), (1, 0))

    def step(self, model, sample) -> StepResult:
        crit = self.criterion
        net_input = sample["net_input"]
        out1 = model(**net_input)
        out2 = model(**net_input)
        lp1, target = crit.get_lprobs_and_target(model, out1, sample)
        lp2, _ = crit.get_lprobs_and_target(model, out2, sample)
        first = label_smoothed_nll_loss(lp1, target, crit.eps, ignore_index=crit.padding_idx, reduce=True)
        loss, nll_loss, reg, total, skipped = rdrop_objective(crit, first, lp1, lp2, target, "symmetric")
        return StepResult(total, loss, nll_loss, reg, net_output=out1, fwd=2, bwd=1, skipped=int(skipped))
