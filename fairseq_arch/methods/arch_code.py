"""ARCH under ``--arch-recipe code``: the official code's perturbation (fairseq_arch/code_recipe.py)
in place of the text's, on the same cache (fairseq_arch/cache/code_access.py).

Refresh epochs: a fresh ascent from a non-negative start of norm eps over the padded
sentence, S capped steps; the cache keeps the displacement (final - start), blended as the
code writes its EMA, and a batch trains on the final delta (plus the blended value after
the first refresh). Reuse epochs: cached displacements, and neighbour vectors on every
position, capped at eps."""

import torch

from ..cache.code_access import code_read, code_store
from ..code_recipe import code_init, code_step
from ..perturbation import seeded_init
from .ascent import frozen_parameters
from .kl_regularised import AscentObjective
from .space import SIDE_IDS, embedding_dims


def code_start(space, core, sample, masks, key: int):
    """The random start of every perturbed side: seeded uniform [0, 1) draws over the whole
    padded tensor (the code's ``torch.rand``), scaled to norm eps per sentence."""
    dims = embedding_dims(core)
    out = {}
    for side in space.sides:
        every = torch.ones_like(masks[side])  # padding too: the code draws and scales it
        u = seeded_init(sample["id"], every, dims[side], space.seed, key, SIDE_IDS[side], "uniform", 1.0, "linf",
                        "sentence")  # U(-1, 1)
        out[side] = code_init(u.add_(1.0).mul_(0.5), space.eps)
    return out


def code_ascent(criterion, core, sample, masks, teacher, key: int, result):
    """(start, final) of the code's ascent, or None when no fp16 scale gives finite gradients."""
    space, scaler = criterion.space, criterion.ascent.scaler
    criterion.ascent.check_model(core)
    init = code_start(space, core, sample, masks, key)
    counts = {"fwd": 0, "bwd": 0}
    objective = AscentObjective(criterion, core, sample, teacher, counts)

    def attempt(scale):
        delta, finite = dict(init), None
        for _ in range(criterion.ascent.steps):
            for side in space.sides:
                delta[side] = delta[side].detach().requires_grad_(True)
            with frozen_parameters(core):
                out = objective.forward(delta)
            obj = objective.divergence(out) * scale
            del out
            grads = torch.autograd.grad(obj, [delta[s] for s in space.sides])
            counts["bwd"] += 1
            for side, g in zip(space.sides, grads):
                ok = torch.isfinite(g).all()
                finite = ok if finite is None else finite & ok
                delta[side] = code_step(delta[side], g, space.step_size, space.eps)
        return {s: d.detach() for s, d in delta.items()}, finite

    try:
        return init, scaler.run(core, attempt)
    except FloatingPointError:
        return None
    finally:
        result.fwd += counts["fwd"]
        result.bwd += counts["bwd"]


class CodePerturbation:
    """ARCH's delta under the code recipe, batch by batch (the base generation's tables
    are loaded once per refresh epoch)."""

    def __init__(self, criterion):
        self.criterion = criterion
        self._base_tables = {}  # (generation, side) -> (row means, neighbour table)

    def base_tables(self, writer, side):
        if writer.base is None:
            return None
        key = (writer.base, side)
        if key not in self._base_tables:
            self._base_tables = {key: (writer.store.load_array(writer.base, side, "means"),
                                       writer.store.load_array(writer.base, side, "neighbors"))}
        return self._base_tables[key]

    def __call__(self, core, sample, masks, teacher, result):
        crit = self.criterion
        cache, space, ids = crit.task.arch_cache, crit.space, sample["id"]
        if cache.mode == "reuse":
            delta = {}
            for s in space.sides:
                delta[s], result.cached, result.rebuilt = code_read(cache.access, ids, s, masks[s], space.eps)
            return delta
        out = code_ascent(crit, core, sample, masks, teacher, cache.epoch, result)
        if out is None:
            return None
        init, final = out
        result.fresh = ids.numel()
        delta = {}
        for s in space.sides:
            value = code_store(cache.access, ids, s, final[s] - init[s], masks[s],
                               self.base_tables(cache.access, s))
            delta[s] = final[s] if value is None else final[s] + value
        return delta
