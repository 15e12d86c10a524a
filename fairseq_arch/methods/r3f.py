"""``r3f``: CE + lambda * KL(f(x) || f(x + noise)), seeded gaussian noise, no ascent
(Aghajanyan et al. 2020; symmetric KL by default)."""

import logging

import torch

from . import register_method
from .kl_regularised import KLRegularised

logger = logging.getLogger(__name__)

# R3F's noise against the model's precision. Measured (transformer_iwslt_de_en dims, C = 512,
# fairseq's init; the noise as it reaches the layer-0 input embed_scale * (lookup + noise) +
# positions, computed in the model's dtype): coordinates changed / cosine with the noise
#   std 1e-5 (R3F's):  bf16  1.9% / 0.12    fp16 23.1% / 0.61
#   std 1e-4:          bf16 28.8% / 0.67    fp16 83.1% / 0.98
#   std 1e-3:          bf16 86.4% / 0.985   fp16 98.3% / 1.00
# Below about finfo(dtype).eps / 8 (bf16 9.8e-4, fp16 1.2e-4) most of it is rounded away.
# (--amp keeps the parameters, the lookup and the residual stream in fp32.)
NOISE_FLOOR = {"--bf16": torch.finfo(torch.bfloat16).eps / 8, "--fp16": torch.finfo(torch.float16).eps / 8}


def warn_noise_below_precision(space, flag) -> None:
    """At start: --bf16 / --fp16 with a normal noise below the dtype's resolution."""
    if flag is None or space.init_kind != "normal" or space.init_scale >= NOISE_FLOOR[flag]:
        return
    floor = NOISE_FLOOR[flag]
    logger.warning(
        f"--adv-method r3f with {flag}: its noise (std {space.init_scale:g}, --adv-init-scale) is "
        f"below {flag[2:]}'s resolution at the embeddings it is added to: most of it is rounded away "
        f"(measured at std 1e-5 with C=512: bf16 changes 1.9% of the layer-0 input's coordinates, fp16 23%). "
        f"Use --adv-init-scale {floor:.0e} or more, or --amp / fp32, which keep the embeddings in fp32")


@register_method("r3f")
class R3F(KLRegularised):
    default_init = "normal"
    default_kl = "symmetric"
    counts = ((2, 0), (1, 0))

    def __init__(self, criterion):
        super().__init__(criterion)
        warn_noise_below_precision(criterion.space, criterion.precision_flag)

    def perturbation(self, core, sample, masks, teacher, result):
        return self.criterion.space.init(core, sample, masks, self.noise_key(), project_to_ball=False)
