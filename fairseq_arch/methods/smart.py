"""``smart``: CE + lambda * KL(f(x) || f(x + delta)), delta by S projected ascent steps
every update (the adversarial part of Jiang et al. 2020)."""

from . import register_method
from .kl_regularised import KLRegularised, fresh_ascent


@register_method("smart")
class SMART(KLRegularised):
    runs_ascent = True
    # S + 2 forwards, S + 1 backwards (Table 1 counts 1 + S: not the forward at the random start)
    counts = ((2, 1), (1, 1))

    def perturbation(self, core, sample, masks, teacher, result):
        return fresh_ascent(self.criterion, core, sample, masks, teacher, self.noise_key(), result)
