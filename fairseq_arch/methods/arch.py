"""``arch``: as smart on refresh epochs, whose fresh perturbations go into the cache
(Eq. 2); cached and neighbour-rebuilt perturbations on reuse epochs (Eq. 3); plain CE
before ``--arch-first-refresh-epoch``. The cache is the task's (``arch_translation``)."""

from . import register_method
from .kl_regularised import KLRegularised, fresh_ascent


def check_arch_task(cfg, task) -> None:
    if not hasattr(task, "arch_cache"):
        raise ValueError(
            f"--adv-method {cfg.adv_method} needs ARCH's cache: use --task arch_translation "
            f"(got --task {type(task).__name__}); none, r3f, smart, freelb, rdrop and zero-delta run with any "
            "translation task")


def cache_is_off(criterion) -> bool:
    """Before --arch-first-refresh-epoch: no cache yet, plain CE."""
    cache = criterion.task.arch_cache
    return cache is not None and cache.mode == "off"


def arch_perturbation(criterion, core, sample, masks, teacher, result):
    """ARCH's delta of every perturbed side: on refresh epochs a fresh ascent (None when
    not finite), stored in the cache (trained on as stored); on reuse epochs the cached
    rows, or the rows rebuilt from neighbours."""
    cache, space, ids = criterion.task.arch_cache, criterion.space, sample["id"]
    assert cache is not None and cache.mode in ("refresh", "reuse"), "arch cache not started (begin_epoch not called?)"
    if cache.mode == "refresh":
        fresh = fresh_ascent(criterion, core, sample, masks, teacher, cache.epoch, result)
        if fresh is None:
            return None
        result.fresh = ids.numel()
        return {s: cache.access.store_fresh(ids, s, fresh[s], masks[s], space.project) for s in space.sides}
    delta = {}
    for s in space.sides:
        delta[s], result.cached, result.rebuilt = cache.access.read(ids, s, masks[s], space.project)
    return delta


class UsesArchCache:
    """What the methods on ARCH's cache (arch, arch-rdrop) declare: an ascent on refresh
    epochs, 2 forwards and 1 backward on reuse epochs (Table 1 amortises: 2 + (S - 1) / Tc
    forwards, 1 + S / Tc backwards), plain CE before the first refresh epoch."""

    runs_ascent = True
    needs_cache = True
    counts = ((2, 1), (1, 1))
    reuse_counts = ((2, 0), (1, 0))

    @classmethod
    def check_config(cls, cfg, task) -> None:
        check_arch_task(cfg, task)

    def is_plain(self) -> bool:
        return super().is_plain() or cache_is_off(self.criterion)


@register_method("arch")
class ARCH(UsesArchCache, KLRegularised):

    def __init__(self, criterion):
        super().__init__(criterion)
        if criterion.recipe == "code":  # --arch-recipe code: the official code's computation
            from .arch_code import CodePerturbation

            self._perturbation = CodePerturbation(criterion)
        else:
            self._perturbation = lambda *a: arch_perturbation(criterion, *a)

    def perturbation(self, core, sample, masks, teacher, result):
        return self._perturbation(core, sample, masks, teacher, result)
