"""``freelb``: the mean over t = 0..S of CE(x + delta_t), delta_{t+1} = Proj(delta_t + eta g/||g||)
with g the CE's gradient w.r.t. delta; the parameter gradients of all S + 1 steps
accumulate into one backward ("free" large batch, Zhu et al. 2020). No clean term."""

import torch

from ..injection import unwrap_model
from . import register_method
from .base import Method, StepResult, padding_masks, zero


@register_method("freelb")
class FreeLB(Method):
    runs_ascent = True
    counts = ((1, 1), (1, 1))  # S + 1 forwards and backwards

    @classmethod
    def check_config(cls, cfg, task) -> None:
        if cfg.adv_steps < 1:
            raise ValueError("--adv-method freelb needs --adv-steps >= 1 (its ascent steps)")

    def step(self, model, sample) -> StepResult:
        crit = self.criterion
        masks = padding_masks(sample["net_input"], crit.padding_idx)
        counts = {"fwd": 0, "bwd": 0}
        try:
            loss, nll_loss, delta = self._ascent(model, sample, masks, counts)
            skipped = 0
        except FloatingPointError:
            # a non-finite ascent: train this batch on the clean CE instead, count it
            loss, nll_loss = crit.compute_loss(model, model(**sample["net_input"]), sample, reduce=True)
            counts["fwd"] += 1
            delta, skipped = {}, 1
        return StepResult(loss, loss, nll_loss, zero(loss), delta=delta, fwd=counts["fwd"],
                          bwd=counts["bwd"] + 1, skipped=skipped)

    def _ascent(self, model, sample, masks, counts):
        """The CE at S + 1 perturbations, each one ascent step from the last; the S + 1
        graphs share one backward, so parameter gradients are their mean. Scaled and
        retried in fp16 as the KL methods' ascent (the criterion's AscentScaler)."""
        crit = self.criterion
        core = unwrap_model(model)
        crit.ascent.check_model(core)
        space, steps = crit.space, crit.ascent.steps
        init = space.init(core, sample, masks, self.noise_key())

        def attempt(scale):
            delta, finite, losses, nlls = dict(init), None, [], []
            for t in range(steps + 1):
                for side in space.sides:
                    delta[side] = delta[side].detach().requires_grad_(True)
                out = crit.perturbed_forward(model, sample["net_input"], delta)
                counts["fwd"] += 1
                loss_t, nll_t = crit.compute_loss(model, out, sample, reduce=True)
                losses.append(loss_t)
                nlls.append(nll_t.detach())
                if t < steps:
                    grads = torch.autograd.grad(loss_t * scale, [delta[s] for s in space.sides], retain_graph=True)
                    counts["bwd"] += 1
                    delta, finite = space.step(delta, grads, masks, finite)
            result = torch.stack(losses).mean(), torch.stack(nlls).mean(), {s: d.detach() for s, d in delta.items()}
            return result, finite

        return crit.ascent.scaler.run(core, attempt)
