"""Pure tensor math of embedding perturbations: norm balls, ascent steps, seeded init.

Nothing here knows about fairseq. Conventions used throughout:

- ``delta`` is ``B x T x C`` (batch, time, embedding dim), always float32 so that
  the ascent works the same whatever the model precision.
- ``mask`` is ``B x T`` bool, True on real tokens. Padding may be on the left
  (fairseq sources) or on the right (targets); nothing here assumes either.
- ``granularity="sentence"`` puts one norm ball around a whole sentence (all its
  tokens of one side); ``"word"`` puts one ball around every token.
- Per-sample rows (``length x C``) are the ragged, unpadded form used by the cache;
  :func:`scatter_rows` / :func:`gather_rows` convert between the two forms.
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

NORMS = ("l2", "linf")
GRANULARITIES = ("sentence", "word")
INITS = ("uniform", "normal")

# Smallest norm we divide by; a zero gradient or zero delta then gives a zero step.
_TINY = 1e-12


def _check(norm: str, granularity: str) -> None:
    assert norm in NORMS, f"norm must be one of {NORMS}, got {norm!r}"
    assert granularity in GRANULARITIES, (
        f"granularity must be one of {GRANULARITIES}, got {granularity!r}"
    )


def masked(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero every padding position of ``delta`` (B x T x C) given ``mask`` (B x T)."""
    assert delta.dim() == 3 and mask.shape == delta.shape[:2], (
        f"delta {tuple(delta.shape)} and mask {tuple(mask.shape)} do not match"
    )
    return delta * mask.unsqueeze(-1).to(delta.dtype)


def ball_norms(delta: torch.Tensor, mask: torch.Tensor, norm: str, granularity: str) -> torch.Tensor:
    """Norm of every sentence (B x 1 x 1) or every token (B x T x 1), padding excluded."""
    _check(norm, granularity)
    d = masked(delta.float(), mask)
    dims = (1, 2) if granularity == "sentence" else (2,)
    if norm == "l2":
        return d.pow(2).sum(dim=dims, keepdim=True).sqrt()
    return d.abs().amax(dim=dims, keepdim=True)


def project(delta: torch.Tensor, mask: torch.Tensor, eps: float, norm: str, granularity: str) -> torch.Tensor:
    """Euclidean projection onto the eps-ball; identity inside it; padding set to 0."""
    _check(norm, granularity)
    assert eps > 0, f"eps must be positive, got {eps}"
    d = masked(delta.float(), mask)
    if norm == "linf":
        # the l_inf ball is a box: sentence and word granularity coincide
        return d.clamp(-eps, eps)
    n = ball_norms(d, mask, norm, granularity)
    return d * (eps / n.clamp_min(_TINY)).clamp(max=1.0)


def normalized_direction(grad: torch.Tensor, mask: torch.Tensor, norm: str, granularity: str) -> torch.Tensor:
    """``g / ||g||`` per ball (dual-norm free, scale invariant, so fp16 loss scaling
    cancels out). A zero gradient gives a zero direction instead of NaN."""
    g = masked(grad.float(), mask)
    return g / ball_norms(g, mask, norm, granularity).clamp_min(_TINY)


def ascent_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    step_size: float,
    norm: str,
    granularity: str,
) -> torch.Tensor:
    """One projected gradient ascent step: ``Proj(delta + eta * g / ||g||)``."""
    step = step_size * normalized_direction(grad, mask, norm, granularity)
    return project(delta.float() + step, mask, eps, norm, granularity)


# ----------------------------------------------------------------------------
# ragged rows <-> padded batch
# ----------------------------------------------------------------------------


def scatter_rows(rows: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Place per-sample rows (``len_b x C``, in batch order) on the real positions of
    a padded ``B x T x C`` tensor. Works for left and right padding alike because
    boolean-mask assignment walks positions in row-major order."""
    assert len(rows) == mask.size(0), f"{len(rows)} rows for a batch of {mask.size(0)}"
    lengths = mask.sum(dim=1).tolist()
    for b, (r, n) in enumerate(zip(rows, lengths)):
        assert r.size(0) == n, (
            f"sample {b} has {n} real tokens but its cached row has {r.size(0)}; "
            "the cache does not belong to this data"
        )
    dim = rows[0].size(-1)
    out = torch.zeros(mask.size(0), mask.size(1), dim, dtype=torch.float32, device=mask.device)
    out[mask] = torch.cat([r.float().to(mask.device) for r in rows], dim=0)
    return out


def gather_rows(delta: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
    """Inverse of :func:`scatter_rows`: the real positions of each sample, ``len_b x C``."""
    lengths = mask.sum(dim=1).tolist()
    return list(torch.split(delta[mask], lengths, dim=0))


# ----------------------------------------------------------------------------
# seeded initialisation
# ----------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, sample_id: int, epoch: int, side: int) -> int:
    """A 63-bit seed for one sample's initial perturbation.

    Depends only on (seed, sample id, epoch, side): the same sample starts from the
    same noise whichever rank, batch or accumulation step it lands in.
    """
    h = 0
    for v in (seed, sample_id, epoch, side):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def init_rows(
    length: int,
    dim: int,
    generator: torch.Generator,
    init: str,
    scale: float,
    norm: str,
    granularity: str,
) -> torch.Tensor:
    """Initial perturbation of one sentence side, ``length x dim`` float32.

    ``uniform``: uniformly distributed inside the ball of radius ``scale`` (of the
    chosen norm and granularity); ``normal``: i.i.d. N(0, scale^2) per coordinate.
    """
    _check(norm, granularity)
    assert init in INITS, f"init must be one of {INITS}, got {init!r}"
    if init == "normal":
        return torch.randn(length, dim, generator=generator) * scale
    if norm == "linf":
        return (torch.rand(length, dim, generator=generator) * 2 - 1) * scale
    # uniform in an l2 ball of n dimensions: gaussian direction, radius r * U^(1/n)
    if granularity == "sentence":
        n = length * dim
        z = torch.randn(length, dim, generator=generator)
        u = torch.rand((), generator=generator)
        return z / z.norm().clamp_min(_TINY) * scale * u.pow(1.0 / n)
    z = torch.randn(length, dim, generator=generator)
    u = torch.rand(length, 1, generator=generator)
    return z / z.norm(dim=1, keepdim=True).clamp_min(_TINY) * scale * u.pow(1.0 / dim)


def seeded_init(
    sample_ids: Sequence[int],
    mask: torch.Tensor,
    dim: int,
    seed: int,
    epoch: int,
    side: int,
    init: str,
    scale: float,
    norm: str,
    granularity: str,
) -> torch.Tensor:
    """Initial ``B x T x C`` perturbation of a batch, each sample from its own seed."""
    lengths = mask.sum(dim=1).tolist()
    gen = torch.Generator()
    rows = []
    for sid, n in zip(sample_ids, lengths):
        gen.manual_seed(sample_seed(seed, sid, epoch, side))
        rows.append(init_rows(int(n), dim, gen, init, scale, norm, granularity))
    return scatter_rows(rows, mask)


# ----------------------------------------------------------------------------
# divergences
# ----------------------------------------------------------------------------


def divergence(
    teacher_lprobs: torch.Tensor,
    student_lprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward",
) -> torch.Tensor:
    """Token-summed divergence between the clean (teacher) and perturbed (student)
    output distributions, over real target tokens only. Inputs are log-probs of any
    shape ``... x V``; ``mask`` has the shape without V. Computed in float32.

    ``forward``: KL(p || q) with p the clean prediction (the paper's R_adv);
    ``symmetric``: (KL(p || q) + KL(q || p)) / 2.
    """
    v = teacher_lprobs.size(-1)
    keep = mask.reshape(-1)
    # padding rows first: the vocabulary-wide ops below are the regularizer's main cost
    p_log = teacher_lprobs.reshape(-1, v)[keep].float()
    q_log = student_lprobs.reshape(-1, v)[keep].float()
    kl_pq = F.kl_div(q_log, p_log, reduction="sum", log_target=True)
    if kind == "forward":
        return kl_pq
    if kind == "symmetric":
        return 0.5 * (kl_pq + F.kl_div(p_log, q_log, reduction="sum", log_target=True))
    raise ValueError(f"unknown divergence {kind!r}: use forward or symmetric")


def sentence_norms(delta: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sentence-level l2 norm of each sample (B,), for logging."""
    if delta is None:
        return torch.zeros(mask.size(0))
    return ball_norms(delta, mask, "l2", "sentence").view(-1)
