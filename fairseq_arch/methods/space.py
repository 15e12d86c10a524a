"""The perturbation space of a run: which embeddings are perturbed, the ball they live
in, how a perturbation starts and how one ascent step moves it. One object, built from
the criterion's config, shared by every method and by ARCH's cache (which projects
with it)."""

import copy
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..perturbation import ascent_step, project, seeded_init

# the "side" part of a sample's init seed: source and target draw different noise
SIDE_IDS = {"source": 0, "target": 1}

# R3F's per-coordinate noise std (Aghajanyan et al. 2020): the default scale of a normal init
NORMAL_INIT_STD = 1e-5


class PerturbationSpace:
    """``sides``: the perturbed embeddings (``source``: the encoder's lookup, ``target``:
    the decoder input's); ``eps``, ``norm``, ``granularity``: the ball; ``init``,
    ``init_scale``: the seeded start; ``step_size``: eta of ``Proj(delta + eta g/||g||)``.
    Every delta is ``B x T x C`` float32, padding 0."""

    def __init__(self, sides: Sequence[str], eps: float, norm: str, granularity: str, init: str,
                 init_scale: float, step_size: float, seed: int):
        self.sides = list(sides)
        self.eps, self.norm, self.granularity = float(eps), str(norm), str(granularity)
        self.init_kind, self.init_scale = str(init), float(init_scale)
        self.step_size, self.seed = float(step_size), int(seed)

    @classmethod
    def from_config(cls, cfg, default_init: str) -> "PerturbationSpace":
        """The space of ``--adv-*`` options; ``default_init``: the method's, used when
        ``--adv-init`` is unset (and with it the default scale: eps for uniform, R3F's
        std for normal)."""
        init = str(cfg.adv_init) if cfg.adv_init is not None else default_init
        scale = cfg.adv_init_scale
        if scale is None:
            scale = cfg.adv_eps if init == "uniform" else NORMAL_INIT_STD
        sides = ["source", "target"] if str(cfg.adv_sides) == "both" else [str(cfg.adv_sides)]
        return cls(sides, cfg.adv_eps, cfg.adv_norm, cfg.adv_granularity, init, scale, cfg.adv_step_size, cfg.seed)

    def with_sides(self, sides: Sequence[str]) -> "PerturbationSpace":
        """The same space restricted to ``sides`` (the probe perturbs one side at a time)."""
        out = copy.copy(self)
        out.sides = list(sides)
        return out

    @property
    def ball(self) -> Tuple[float, str, str]:
        """(eps, norm, granularity): the measure ARCH's cache sizes rebuilt rows in."""
        return self.eps, self.norm, self.granularity

    def project(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return project(delta, mask, self.eps, self.norm, self.granularity)

    def init(self, core, sample, masks: Dict[str, torch.Tensor], key: int,
             project_to_ball: bool = True) -> Dict[str, torch.Tensor]:
        """Seeded start of every perturbed side, generated on the batch's device from the
        ids there (no host round trip); ``key``: the epoch part of the seed."""
        dims = embedding_dims(core)
        delta = {}
        for side in self.sides:
            d = seeded_init(sample["id"], masks[side], dims[side], self.seed, key, SIDE_IDS[side],
                            self.init_kind, self.init_scale, self.norm, self.granularity)
            delta[side] = self.project(d, masks[side]) if project_to_ball else d
        return delta

    def zeros(self, core, masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A zero perturbation of every perturbed side (fairseq's dummy batches)."""
        dims = embedding_dims(core)
        return {s: torch.zeros(*masks[s].shape, dims[s], device=masks[s].device) for s in self.sides}

    def step(self, delta: Dict[str, torch.Tensor], grads: Sequence[torch.Tensor], masks: Dict[str, torch.Tensor],
             finite: Optional[torch.Tensor] = None, move: Optional[Callable] = None):
        """One ascent step of every side (``grads`` in ``sides`` order): ``move(delta, g,
        mask)``, by default the projected step ``Proj(delta + eta g/||g||)``. Returns (the
        new delta, whether every gradient so far was finite): accumulated on the device, so
        an ascent costs one host-device sync, not one per step."""
        out = {}
        for side, g in zip(self.sides, grads):
            ok = torch.isfinite(g).all()
            finite = ok if finite is None else finite & ok
            if move is None:
                out[side] = ascent_step(delta[side].detach(), g, masks[side], self.eps, self.step_size,
                                        self.norm, self.granularity)
            else:
                out[side] = move(delta[side], g, masks[side])
        return out, finite


def embedding_dims(core) -> Dict[str, int]:
    return {"source": core.encoder.embed_tokens.embedding_dim, "target": core.decoder.embed_tokens.embedding_dim}
