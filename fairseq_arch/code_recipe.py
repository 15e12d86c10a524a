"""The official code's ARCH computation (SimiaoZuo/Caching-Adv at e5719e3,
``fairseq/criterions/cache_loss.py``, ``adv_dataset.py``), as pure tensor functions.

The paper's text and its code differ; ``--arch-recipe text`` (our ``arch``) follows the
text, these functions the code. Shapes: ``B x T x C`` float32, norms per sentence over the
whole padded ``T x C`` slice: the code masks no padding, neither in the norms nor in delta.

- init: uniform [0, 1) draws over the padded tensor (every coordinate >= 0), scaled to
  norm eps per sentence (``F.normalize(.., dim=(1, 2), eps=1e-6) * eps``);
- step: ``delta + lr * g / max(||g||, 1e-6)``, then ``torch.renorm(.., p=2, dim=0,
  maxnorm=eps)``: a cap at eps (identity inside the ball);
- cached: the displacement (final minus initial delta), not the perturbation;
- reuse: a cached sentence trains on its cached displacement, capped; an uncached one on
  its neighbours' displacement summed over tokens / their length, averaged over K, on
  every position (padding included), capped;
- refresh epochs 1, Tc, 2Tc, ...: the trained delta is the ascent's final delta; after the
  first refresh the stored displacement becomes ``d (1 - a) + prev a + d a (1 - m)``
  (m = 1 where a cached value exists, i.e. a cached sentence; for an uncached one ``prev``
  is its rebuilt vector), and that value is added to the trained delta (not capped again).

Not reproduced (defects of the official collater, ``fairseq/data/language_pair_dataset.py``
``pad_adv``): it writes a cached sentence's rows at positions ``0 .. len-1`` although fairseq's
sources are left-padded, so a source displacement lands on padding and on the wrong tokens;
and it never reorders the target displacements to the batch's length sort
(``tgt_adv.index_select(0, sort_order)`` discards its result), so a target displacement is
read for another sentence of the batch. Here rows go to their own tokens.
"""

from typing import Sequence

import torch
import torch.nn.functional as F

# the official run.sh (IWSLT'14 De-En): --eps 0.3 --inner-steps 2 --inner-lr 1e-4
CODE_EPS, CODE_STEPS, CODE_STEP_SIZE = 0.3, 2, 1e-4


def is_code_refresh_epoch(epoch: int, interval: int) -> bool:
    """``epoch > 1 and epoch % cache_every_epoch > 0`` reuses: epochs 1, Tc, 2Tc, ... refresh
    (``interval`` 0: epoch 1 only)."""
    return epoch == 1 or (interval > 0 and epoch % interval == 0)


def code_last_refresh_epoch(epoch: int, interval: int) -> int:
    """The refresh epoch whose cache a reuse epoch ``epoch`` reads."""
    return 1 if interval <= 0 or epoch < interval else epoch - epoch % interval


def cap(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Each sentence's ``T x C`` slice with l2 norm above eps scaled to eps (``torch.renorm``)."""
    return torch.renorm(delta, p=2, dim=0, maxnorm=eps)


def code_init(uniform01: torch.Tensor, eps: float) -> torch.Tensor:
    """The random start from ``uniform01`` (B x T x C draws in [0, 1)): norm eps per sentence."""
    return F.normalize(uniform01, p=2, dim=(1, 2), eps=1e-6) * eps


def code_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float) -> torch.Tensor:
    """One ascent step: normalised gradient per sentence, then the cap."""
    norm = torch.norm(grad, p=2, dim=(1, 2), keepdim=True).clamp(min=1e-6)
    return cap(delta.detach() + step_size * (grad / norm), eps)


def code_ema(displacement: torch.Tensor, prev: torch.Tensor, alpha: float, has_prev: torch.Tensor) -> torch.Tensor:
    """The stored value after a refresh that has a previous one, as the code writes it:
    ``d (1 - a) + prev a + d a (1 - m)``, ``has_prev`` (B,) the mask m."""
    m = has_prev.to(displacement.dtype).view(-1, 1, 1)
    return displacement * (1.0 - alpha) + prev * alpha + displacement * alpha * (1 - m)


def code_rebuilt_vector(neighbor_rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """An uncached sentence's vector (1 x C): each neighbour's cached displacement rows
    (``len x C``) summed and divided by its length, averaged over the K neighbours."""
    return sum(r.sum(0, keepdim=True) / r.size(0) for r in neighbor_rows) / len(neighbor_rows)


def code_reuse_delta(rows, vectors, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """A reuse batch's delta (B x T x C on ``mask``'s device): sentence b's cached
    displacement ``rows[b]`` (len x C) on its real positions (``mask[b]``), or, where
    ``rows[b]`` is None, ``vectors[b]`` (1 x C) on every position, padding included; capped."""
    batch, length = mask.shape
    dim = next(r.size(-1) for r in list(rows) + list(vectors) if r is not None)
    out = torch.zeros(batch, length, dim, device=mask.device)
    for b in range(batch):
        if rows[b] is None:
            out[b] = vectors[b].to(out.device).expand(length, dim)
        else:
            out[b, mask[b]] = rows[b].to(out.device)
    return cap(out, eps)
