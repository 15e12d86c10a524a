"""The projected ascent on delta, and the dynamic scale that keeps its gradient alive
in an fp16 backward.

A fresh perturbation: the seeded start in the ball, then S steps
``delta <- Proj(delta + eta g/||g||)`` with ``g = d objective / d delta`` only
(``torch.autograd.grad``: parameter ``.grad`` and DDP hooks are never touched; the
forwards go through the unwrapped model with the parameters frozen).
"""

import contextlib
import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from ..injection import checkpointed

logger = logging.getLogger(__name__)


def refuse_activation_checkpointing(method: str, flags) -> None:
    """fairseq's activation checkpointing (reentrant) raises on torch.autograd.grad, which
    an ascent takes w.r.t. delta: refuse it with the flag's name instead of crashing in
    the first batch."""
    raise ValueError(
        f"--adv-method {method} cannot run with {' / '.join(flags)}: fairseq's activation "
        "checkpointing refuses torch.autograd.grad, which the ascent needs for its gradient "
        f"w.r.t. delta. Drop {' / '.join(flags)} (or use --adv-method r3f, rdrop or none: no ascent)")


def backward_runs_in_fp16(model) -> bool:
    """Whether ``model``'s backward runs in fp16 (fp16 parameters, --fp16; or fp16 autocast on
    its device, --amp), where small gradients underflow. bf16 has fp32's exponent range."""
    p = next(model.parameters())
    if p.dtype == torch.float16:
        return True
    device = p.device.type
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    except (TypeError, AttributeError):  # torch < 2.4: no device_type argument
        if device == "cuda":
            return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.float16
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.float16


@contextlib.contextmanager
def frozen_parameters(model):
    """The ascent's forwards with ``requires_grad`` off on every parameter (restored after,
    also on an exception): the ascent needs d KL / d delta only, and autograd then keeps
    only what that gradient needs (a linear layer keeps its weight, not its input), so
    the ascent's graph holds a fraction of a training forward's activations. The
    gradient w.r.t. delta is the same computation either way."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class AscentScaler:
    """The factor on an ascent's objective: 1, but for an fp16 backward (--fp16, --amp),
    where the KL's gradient w.r.t. delta (about 1e-4 in norm, spread over B x T x C
    coordinates) underflows and the ascent would not move. There it is dynamic, as
    torch's GradScaler (which starts at the same 2**15): halved and the ascent run again
    when a gradient was not finite, at most ``max_retries`` times; doubled back after
    ``growth_interval`` clean ascents in a row. The normalised step g / ||g|| does not
    depend on it. bf16 is never scaled."""

    def __init__(self, init_scale: float = 2.0 ** 15, max_retries: int = 4, growth_interval: int = 200):
        self.init_scale = init_scale
        self.max_retries = max_retries
        self.growth_interval = growth_interval
        self.scale = init_scale  # persists across batches: the next ones start from a reduced one
        self._clean_runs = 0

    def scale_for(self, core) -> float:
        return self.scale if backward_runs_in_fp16(core) else 1.0

    def needs_retry(self, finite, scale: float) -> bool:
        """Whether an ascent run at ``scale`` must run again (one sync on ``finite``):
        True after halving the scale for the retry. Raises FloatingPointError when the
        ascent is not finite at scale 1 (the caller skips the batch's regulariser)."""
        if finite is None or bool(finite):
            if scale > 1.0 and self.scale < self.init_scale:
                self._clean_runs += 1
                if self._clean_runs >= self.growth_interval:
                    self.scale, self._clean_runs = self.scale * 2, 0
            return False
        self._clean_runs = 0
        if scale <= 1.0:
            raise FloatingPointError("non-finite ascent gradient")
        self.scale = max(1.0, scale / 2)
        logger.info(f"adversarial ascent: non-finite gradient at scale {scale:g}, retrying at {self.scale:g}")
        return True

    def run(self, core, attempt: Callable[[float], Tuple[object, torch.Tensor]]):
        """``attempt(scale)`` -> (result, finite), at the current scale, run again while it
        was not finite; its result once finite."""
        for _ in range(self.max_retries + 1):
            scale = self.scale_for(core)
            result, finite = attempt(scale)
            if not self.needs_retry(finite, scale):
                return result
        raise FloatingPointError(f"non-finite ascent gradient after {self.max_retries} smaller scales")


class ProjectedAscent:
    """S projected ascent steps in ``space`` (a :class:`PerturbationSpace`) on an
    objective of delta, scaled by ``scaler`` in fp16."""

    def __init__(self, space, steps: int, scaler: AscentScaler, method: str):
        self.space, self.steps, self.scaler, self.method = space, int(steps), scaler, method
        self._checked_models = set()  # ids of models checked for activation checkpointing

    def with_space(self, space) -> "ProjectedAscent":
        """The same ascent (and scaler) in another space, e.g. one side only."""
        out = ProjectedAscent(space, self.steps, self.scaler, self.method)
        out._checked_models = self._checked_models
        return out

    def check_model(self, core) -> None:
        """Any task (arch_translation refuses the flags at start): the first ascent on a
        model with fairseq's activation checkpointing raises, naming the flag."""
        if id(core) not in self._checked_models:
            if checkpointed(core):
                refuse_activation_checkpointing(self.method, ["--checkpoint-activations", "--offload-activations"])
            self._checked_models.add(id(core))

    def run(self, core, sample, masks, key: int, objective: Callable, counts: Dict[str, int],
            init: Optional[Dict[str, torch.Tensor]] = None, move: Optional[Callable] = None):
        """Fresh perturbations of the batch: ``objective(delta)`` is the divergence of a
        perturbed forward (through the unwrapped ``core``; it counts its forward).
        ``init``, ``move``: the start and each side's step (default the space's seeded start
        and projected step; ``--arch-recipe code`` passes its own). Returns the detached deltas;
        FloatingPointError when no scale gives a finite ascent."""
        self.check_model(core)
        init = self.space.init(core, sample, masks, key) if init is None else init
        sides = self.space.sides

        def attempt(scale):
            delta, finite = dict(init), None
            for _ in range(self.steps):
                for side in sides:
                    delta[side] = delta[side].detach().requires_grad_(True)
                with frozen_parameters(core):
                    out = objective.forward(delta)
                obj = objective.divergence(out) * scale
                del out  # the logits stay alive in the divergence's graph only
                grads = torch.autograd.grad(obj, [delta[s] for s in sides])
                counts["bwd"] += 1
                delta, finite = self.space.step(delta, grads, masks, finite, move)
            return {s: d.detach() for s, d in delta.items()}, finite

        return self.scaler.run(core, attempt)
