"""``arch``: as smart on refresh epochs, whose fresh perturbations go into the cache
(Eq. 2); cached and neighbour-rebuilt perturbations on reuse epochs (Eq. 3); plain CE
before ``--arch-first-refresh-epoch``. The cache is the task's (``arch_translation``)."""

from . import register_method
from .kl_regularised import KLRegularised


@register_method("arch")
class ARCH(KLRegularised):
    runs_ascent = True
    needs_cache = True
    # refresh epochs as smart, reuse epochs 2 and 1 (Table 1 amortises: 2 + (S - 1) / Tc
    # forwards, 1 + S / Tc backwards)
    counts = ((2, 1), (1, 1))
    reuse_counts = ((2, 0), (1, 0))

    @classmethod
    def check_config(cls, cfg, task) -> None:
        if not hasattr(task, "arch_cache"):
            raise ValueError(
                "--adv-method arch (the default) needs its cache: use --task arch_translation "
                f"(got --task {type(task).__name__}); none, r3f, smart, freelb and rdrop run with any translation task")

    @property
    def cache(self):
        return self.criterion.task.arch_cache

    def is_plain(self) -> bool:
        cache = self.cache
        return super().is_plain() or (cache is not None and cache.mode == "off")

    def perturbation(self, core, sample, masks, teacher, result):
        cache, space, ids = self.cache, self.criterion.space, sample["id"]
        assert cache is not None and cache.mode in ("refresh", "reuse"), "arch cache not started (begin_epoch not called?)"
        if cache.mode == "refresh":
            fresh = self.fresh(core, sample, masks, teacher, cache.epoch, result)
            if fresh is None:
                return None
            result.fresh = ids.numel()
            return {s: cache.access.store_fresh(ids, s, fresh[s], masks[s], space.project) for s in space.sides}
        delta = {}
        for s in space.sides:
            delta[s], result.cached, result.rebuilt = cache.access.read(ids, s, masks[s], space.project)
        return delta
