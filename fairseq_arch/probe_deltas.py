"""The perturbations the mechanism probe (probe.py) measures, for each ``--arch-recipe``:
what a refresh epoch trains on (``fresh``) and what a reuse epoch reads (``cached`` for the
cached sentences, ``rebuilt[...]`` for the others), one side at a time.

- ``text``: the criterion's own ascent; the cache's rows, and the rows rebuilt from
  neighbours with every ``--arch-rebuild-norm`` mode.
- ``code``: the official code's ascent (non-negative start of norm eps over the padded
  sentence, S capped steps; the delta a refresh trains on, before the blended value that
  later refreshes add); the capped cached displacement, and the neighbour vector on every
  position, capped (``rebuilt[code]``). The displacement is what the code caches, so on
  reuse epochs its delta is about S x eta in norm (fairseq_arch/code_recipe.py).
"""

from typing import Dict, Iterator, Tuple

import torch

from .cache.code_access import code_read
from .methods.arch_code import code_start
from .code_recipe import code_step


def fresh_delta(criterion, core, batch, teacher, masks, side: str, key: int) -> torch.Tensor:
    """B x T x C: a fresh ascent on ``side`` alone (FloatingPointError when not finite)."""
    if getattr(criterion, "recipe", "text") != "code":
        return criterion.fresh_perturbation(core, batch, teacher, masks, key, sides=[side])[side]
    space = criterion.space.with_sides([side])
    init = code_start(space, core, batch, masks, key)
    return criterion.fresh_perturbation(core, batch, teacher, masks, key, sides=[side], init=init,
                                        move=lambda d, g, m: code_step(d, g, space.step_size, space.eps))[side]


def reuse_deltas(criterion, readers: Dict[str, object], ids, side: str, mask) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, B x T x C) of what a reuse epoch reads for the batch: "cached" (measure it on
    the cached sentences) then one rebuild per mode, "rebuilt[<mode>]" (on the others)."""
    if getattr(criterion, "recipe", "text") == "code":
        reader = next(iter(readers.values()))
        delta, _, _ = code_read(reader, torch.as_tensor(ids), side, mask, criterion.space.eps)
        yield "cached", delta
        yield "rebuilt[code]", delta
        return
    for i, (mode, reader) in enumerate(readers.items()):
        delta, _, _ = reader.read(ids, side, mask, criterion.project)
        if i == 0:
            yield "cached", delta  # the same rows whatever the mode
        yield f"rebuilt[{mode}]", delta
