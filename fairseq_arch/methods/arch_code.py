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
from .kl_regularised import fresh_ascent
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
    """(start, final) of the code's ascent (its start, its capped step; the criterion's
    ascent loop and fp16 scale), or None when no scale gives finite gradients."""
    space = criterion.space
    init = code_start(space, core, sample, masks, key)
    final = fresh_ascent(criterion, core, sample, masks, teacher, key, result, init=init,
                         move=lambda delta, g, mask: code_step(delta, g, space.step_size, space.eps))
    return None if final is None else (init, final)


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
