"""``zero-delta``: the control that separates dropout consistency from the perturbation:
the KL step of r3f / smart / arch with delta = 0, i.e. CE + lambda * KL(f(x) || f'(x)) with
f' a second forward under its own dropout masks (a one-sided R-Drop; with ``--adv-teacher
grad --adv-kl symmetric`` its regulariser is R-Drop's, without R-Drop's second CE)."""

from . import register_method
from .kl_regularised import KLRegularised


@register_method("zero-delta")
class ZeroDelta(KLRegularised):
    counts = ((2, 0), (1, 0))

    def perturbation(self, core, sample, masks, teacher, result):
        return self.criterion.space.zeros(core, masks)
