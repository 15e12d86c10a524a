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

import math
from typing import List, Optional, Sequence

import numpy as np
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
    return _masked_norms(masked(delta.float(), mask), norm, granularity)


def _masked_norms(d: torch.Tensor, norm: str, granularity: str) -> torch.Tensor:
    """:func:`ball_norms` of a float32 ``d`` whose padding is already zeroed: masking it
    again (x * 1, 0 * 0) would change no bit and cost ops (issue 22: per side, per
    projection and ascent step)."""
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
    n = _masked_norms(d, norm, granularity)
    return d * (eps / n.clamp_min(_TINY)).clamp(max=1.0)


def normalized_direction(grad: torch.Tensor, mask: torch.Tensor, norm: str, granularity: str) -> torch.Tensor:
    """``g / ||g||`` per ball (dual-norm free, scale invariant, so fp16 loss scaling
    cancels out). A zero gradient gives a zero direction instead of NaN."""
    _check(norm, granularity)
    g = masked(grad.float(), mask)
    return g / _masked_norms(g, norm, granularity).clamp_min(_TINY)


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


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` in one copy that lets the host run ahead: through
    pinned memory, non-blocking (a copy from pageable memory waits for the device)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def check_lengths(lengths: Sequence[int], mask: torch.Tensor, on_device: Optional[torch.Tensor] = None) -> None:
    """Sample b has ``lengths[b]`` real tokens in ``mask``: checked exactly on the host;
    on an accelerator by an asynchronous device assert (no sync; fatal if it fails).
    ``on_device``: the lengths already on ``mask``'s device (a copy saved)."""
    assert len(lengths) == mask.size(0), f"{len(lengths)} rows for a batch of {mask.size(0)}"
    if mask.device.type == "cpu":
        for b, (n, r) in enumerate(zip(mask.sum(dim=1).tolist(), lengths)):
            assert r == n, (
                f"sample {b} has {n} real tokens but its cached row has {r}; "
                "the cache does not belong to this data"
            )
        return
    want = on_device if on_device is not None else to_device(
        torch.as_tensor(list(lengths), dtype=torch.int64), mask.device)
    torch._assert_async(mask.sum(dim=1).eq(want).all(),
                        "a cached row and its sample differ in length: the cache does not belong to this data")


def _row_index(mask: torch.Tensor) -> torch.Tensor:
    """B x T: the index of each real position among all real tokens of the batch in
    row-major order (what ``tensor[mask]`` would give), computed without a sync."""
    counts = mask.long().cumsum(dim=1)
    starts = counts[:, -1:].cumsum(dim=0) - counts[:, -1:]
    return counts.sub_(1).add_(starts)


def place_rows(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[mask] = flat`` for ``flat`` on ``mask``'s device (``N x C``, all samples'
    rows concatenated in batch order; N must be ``mask.sum()``), padding 0, as a gather:
    boolean-mask indexing would wait for the device to count the mask."""
    batch, length = mask.shape
    if flat.size(0) == 0:
        return flat.new_zeros(batch, length, flat.size(-1))
    index = _row_index(mask).clamp_(0, flat.size(0) - 1).view(-1)
    return flat.index_select(0, index).view(batch, length, -1).mul_(mask.unsqueeze(-1))


def scatter_rows(rows: Sequence, mask: torch.Tensor) -> torch.Tensor:
    """Place per-sample rows (``len_b x C`` tensors or arrays, in batch order) on the real
    positions of a padded float32 ``B x T x C`` tensor on ``mask``'s device; left and right
    padding alike. Host rows go in one concatenated, pinned, non-blocking copy."""
    check_lengths([int(r.shape[0]) for r in rows], mask)
    rows = [torch.as_tensor(r) for r in rows]
    if all(r.device.type == "cpu" for r in rows):
        flat = to_device(torch.cat(rows, dim=0), mask.device)
    else:
        flat = torch.cat([r.to(mask.device) for r in rows], dim=0)
    return place_rows(flat.float(), mask)


def gather_rows(delta: torch.Tensor, mask: torch.Tensor) -> List[torch.Tensor]:
    """Inverse of :func:`scatter_rows`: the real positions of each sample, ``len_b x C``."""
    lengths = mask.sum(dim=1).tolist()
    return list(torch.split(delta[mask], lengths, dim=0))


def rows_to_host(delta: torch.Tensor, mask: torch.Tensor, lengths: Sequence[int]) -> List[np.ndarray]:
    """:func:`gather_rows` as host float32 arrays, in one device-to-host copy (the one sync
    that getting values to the host costs); ``lengths``: each sample's real tokens, as
    the host knows them (checked as in :func:`scatter_rows`)."""
    check_lengths(lengths, mask)
    total, dim = int(sum(lengths)), delta.size(-1)
    # each real position to its row of the packed N x C tensor; padding to a spare row N
    dest = torch.where(mask, _row_index(mask), total).view(-1)
    packed = delta.new_zeros(total + 1, dim).index_copy_(0, dest, delta.detach().reshape(-1, dim))
    flat = packed[:total].float().cpu().numpy()
    return np.split(flat, np.cumsum(lengths)[:-1].astype(np.int64), axis=0)


# ----------------------------------------------------------------------------
# seeded initialisation: a counter-based generator, on the batch's device
# ----------------------------------------------------------------------------
#
# Every random number of a sample's initial perturbation is a hash of (seed, sample id,
# epoch, side, stream, counter), not a draw from a generator's state: a sample gets the
# same noise whichever rank, batch, position in the batch or padding side it has, and the
# whole batch takes a few elementwise tensor ops on its own device (no per-sample host
# loop, no host-to-device copy, no device sync). The hash is SplitMix64: random word i of
# a stream is SplitMix64's output number i for the stream's seed (the generator behind
# Java's SplittableRandom, which passes BigCrush), computed for any i directly. On one
# device the values are bit for bit the same in any batch; across devices (CPU vs CUDA)
# only the last bits of log/cos/sin may differ.

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_MIX64 = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # SplitMix64's finaliser
# the streams of one sample: counters below 2**40, the stream number above them
_STREAM_BITS = 40
_STREAM_GAUSS, _STREAM_UNIFORM, _STREAM_RADIUS = 0, 1, 2
# gaussian coordinates are whole multiples of 2**-14: their squared norms are then sums of
# integers, exact for any order of summation (hence the same in any batch layout); with
# |z| < 5.8 a sentence of up to 2**29 coordinates keeps its sum below 2**63
_QUANT = 2 ** 14
_MAX_COORDS = 2 ** 29


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN64) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX64[0]) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX64[1]) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, sample_id: int, epoch: int, side: int) -> int:
    """A 63-bit key for one sample's initial perturbation (the reference, in Python
    integers, of :func:`sample_keys`).

    Depends only on (seed, sample id, epoch, side): the same sample starts from the
    same noise whichever rank, batch or accumulation step it lands in.
    """
    h = 0
    for v in (seed, sample_id, epoch, side):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


def random_word(key: int, stream: int, counter: int) -> int:
    """Random word ``counter`` of ``stream`` of the sample with ``key`` (the reference, in
    Python integers, of what :func:`seeded_init` computes on tensors)."""
    return _splitmix64((key + ((stream << _STREAM_BITS) + counter) * _GOLDEN64) & _MASK64)


def _signed(v: int) -> int:
    """The int64 (two's complement) value with the low 64 bits of ``v``."""
    v &= _MASK64
    return v - (1 << 64) if v >> 63 else v


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words (``>>`` of a signed tensor is arithmetic)."""
    return (x >> k).bitwise_and_((1 << (64 - k)) - 1)


def _splitmix64_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_splitmix64` of every element of an int64 tensor, in place. int64 addition
    and multiplication wrap around (two's complement), i.e. they are arithmetic mod 2**64;
    the tests check the bits against the Python reference."""
    x.add_(_signed(_GOLDEN64))
    x.bitwise_xor_(_shr(x, 30)).mul_(_signed(_MIX64[0]))
    x.bitwise_xor_(_shr(x, 27)).mul_(_signed(_MIX64[1]))
    return x.bitwise_xor_(_shr(x, 31))


def sample_keys(sample_ids: torch.Tensor, seed: int, epoch: int, side: int) -> torch.Tensor:
    """:func:`sample_seed` of every sample id (an int tensor), on the ids' device."""
    h = _splitmix64(int(seed) & _MASK64)  # the constant prefix, on the host
    h = _splitmix64_(sample_ids.long() ^ _signed(h))
    h = _splitmix64_(h.bitwise_xor_(_signed(int(epoch))))
    h = _splitmix64_(h.bitwise_xor_(_signed(int(side))))
    return h.bitwise_and_((1 << 63) - 1)


def _words(keys: torch.Tensor, stream: int, counter: torch.Tensor) -> torch.Tensor:
    """:func:`random_word` for int64 ``keys`` broadcast with int64 ``counter``."""
    x = torch.add(counter * _signed(_GOLDEN64), keys).add_(_signed((stream << _STREAM_BITS) * _GOLDEN64))
    return _splitmix64_(x)


def _unit(words: torch.Tensor, high: bool = True) -> torch.Tensor:
    """float32 uniforms in [0, 1) on a 2**-24 grid from 24 bits of each word: bits
    40-63 (``high``) or 16-39."""
    bits = _shr(words, 40) if high else (words >> 16).bitwise_and_(0xFFFFFF)
    return bits.float().mul_(2.0 ** -24)


def _gaussian_units(keys: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``N x dim`` standard gaussians in units of 2**-14 (integer-valued float32) for N
    tokens: token i is the ``pos[i]``-th of the sample with key ``keys[i]`` (both ``N x 1``
    int64). Box-Muller on pairs: word j of a token gives its coordinates j (cosine) and
    ``pairs + j`` (sine); the last sine is dropped when dim is odd."""
    pairs = (dim + 1) // 2
    words = _words(keys, _STREAM_GAUSS, torch.arange(pairs, device=pos.device).add(pos * pairs))  # N x pairs
    radius = _unit(words).neg_().add_(1.0).log_().mul_(-2.0).sqrt_().mul_(_QUANT)  # U in (0, 1]
    angle = _unit(words, high=False).mul_(2 * math.pi)
    z = torch.cat((torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)), dim=1)
    return (z if dim == 2 * pairs else z[:, :dim].contiguous()).round_()


def seeded_init(
    sample_ids,
    mask: torch.Tensor,
    dim: int,
    seed: int,
    epoch: int,
    side: int,
    init: str,
    scale: float,
    norm: str,
    granularity: str,
    compact: Optional[bool] = None,
) -> torch.Tensor:
    """Initial ``B x T x C`` float32 perturbation of a batch, on ``mask``'s device, each
    sample from its own key (:func:`sample_keys`); ``sample_ids`` is a sequence or an int
    tensor (on any device). Token ``p`` of a sample (its ``p``-th real token, whatever the
    padding) always gets the same values.

    ``uniform``: uniformly distributed inside the ball of radius ``scale`` (of the chosen
    norm and granularity): l2, a gaussian direction times ``scale * U^(1/n)`` (n the
    ball's dimension); l_inf, i.i.d. U(-scale, scale) per coordinate. ``normal``: i.i.d.
    N(0, scale^2) per coordinate.

    ``compact``: generate the real tokens only (default on the host) or every position
    (default on an accelerator: no sync); both give the same values.
    """
    _check(norm, granularity)
    assert init in INITS, f"init must be one of {INITS}, got {init!r}"
    device = mask.device
    batch, length = mask.shape
    assert length * dim < _MAX_COORDS, f"{length} tokens x {dim} channels: more than 2**29 coordinates"
    ids = torch.as_tensor(sample_ids, dtype=torch.int64)
    assert ids.shape == (batch,), f"{tuple(ids.shape)} ids for a batch of {batch}"
    keys = sample_keys(ids.to(device, non_blocking=True), seed, epoch, side)  # B
    tokens = _TokenLayout(mask, compact if compact is not None else device.type == "cpu")
    token_keys = keys[tokens.of_sample].unsqueeze(1)  # N x 1
    if init == "uniform" and norm == "linf":
        counter = torch.arange(dim, device=device).add(tokens.pos * dim)
        rows = _unit(_words(token_keys, _STREAM_UNIFORM, counter)).mul_(2.0 * scale).sub_(scale)
        return tokens.batched(tokens.zero_padding(rows), dim)
    units = tokens.zero_padding(_gaussian_units(token_keys, tokens.pos, dim))  # N x C: integers, units of 2**-14
    if init == "normal":
        return tokens.batched(units.mul_(scale / _QUANT), dim)
    factor = _l2_ball_factors(units, keys, token_keys, tokens, dim, scale, granularity)
    return tokens.batched(units.mul_(factor.unsqueeze(1)), dim)


class _TokenLayout:
    """The N token rows :func:`seeded_init` generates for a ``B x T`` mask: the real tokens
    only (``compact``; on the host, where indexing costs no sync) or every position
    (padding zeroed; on an accelerator: no nonzero(), no sync). ``pos``: each row's
    p-th real token of its sample (N x 1), ``of_sample``: its sample (N)."""

    def __init__(self, mask: torch.Tensor, compact: bool):
        self.mask = mask
        batch, length = mask.shape
        pos = mask.long().cumsum(dim=1).sub_(1)
        if compact:
            self.of_sample, at = mask.nonzero(as_tuple=True)
            pos = pos[self.of_sample, at]
            self.real = None
        else:
            self.of_sample = torch.arange(batch, device=mask.device).repeat_interleave(length)
            pos = pos.clamp_min_(0).view(-1)
            self.real = mask.view(-1, 1)
        self.pos = pos.unsqueeze(1)

    def zero_padding(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.real is None else rows.mul_(self.real)

    def batched(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """N x C -> B x T x C (padding rows already 0)."""
        batch, length = self.mask.shape
        if self.real is not None:
            return rows.view(batch, length, dim)
        out = rows.new_zeros(batch, length, dim)
        out[self.mask] = rows
        return out


def _l2_ball_factors(units: torch.Tensor, keys: torch.Tensor, token_keys: torch.Tensor, tokens: _TokenLayout,
                     dim: int, scale: float, granularity: str) -> torch.Tensor:
    """Per token row (N), the factor that turns its gaussian ``units`` into a uniform point
    of the l2 ball of radius ``scale`` (one ball per sentence or per token): a gaussian
    direction, radius ``scale * U^(1/n)``, n the ball's dimension. Squared norms from the
    integer units: exact (in float64 per token, C * 94536**2 < 2**53; in int64 per
    sentence), hence the same in any batch whatever the order of summation."""
    batch = tokens.mask.size(0)
    sq = units.double().square_().sum(dim=1).long()  # N
    if granularity == "sentence":
        sq = torch.zeros(batch, dtype=torch.int64, device=units.device).index_add_(0, tokens.of_sample, sq)
        n = tokens.mask.sum(dim=1) * dim
        u = _unit(_words(keys, _STREAM_RADIUS, torch.zeros_like(keys)))  # B
    else:
        n = torch.full_like(sq, dim)
        u = _unit(_words(token_keys, _STREAM_RADIUS, tokens.pos)).view(-1)  # N
    norms = sq.double().sqrt_().clamp_min_(1.0)  # in units of 2**-14: a nonzero norm is >= 1
    factor = u.double().pow(1.0 / n.clamp_min(1).double()).mul_(scale).div_(norms).float()
    return factor[tokens.of_sample] if granularity == "sentence" else factor


# ----------------------------------------------------------------------------
# divergences
# ----------------------------------------------------------------------------


def real_rows(keep: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the True entries of the flat bool tensor ``keep``, in order, given
    their number ``count`` as the host knows it: ``keep.nonzero()`` without the sync that
    counting them on the device costs (checked: exactly on the host, asynchronously on a
    device)."""
    if keep.device.type == "cpu":
        assert int(keep.sum()) == count, f"{int(keep.sum())} real rows, but the caller counted {count}"
    else:
        torch._assert_async(keep.sum() == count, "divergence(): the real rows are not the count given")
    # a stable sort puts the real rows (key 0) first, in their order
    return torch.sort(keep.logical_not().to(torch.uint8), stable=True).indices[:count]


def divergence(
    teacher_lprobs: torch.Tensor,
    student_lprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward",
    count: Optional[int] = None,
) -> torch.Tensor:
    """Token-summed divergence between the clean (teacher) and perturbed (student)
    output distributions, over real target tokens only. Inputs are log-probs of any
    shape ``... x V``; ``mask`` has the shape without V. Computed in float32.
    ``count``: ``mask.sum()`` when the caller knows it on the host (fairseq's
    ``ntokens``): the padding rows are then dropped without a device sync.

    ``forward``: KL(p || q) with p the clean prediction (the paper's R_adv);
    ``symmetric``: (KL(p || q) + KL(q || p)) / 2.
    """
    _check_kind(kind)
    v = teacher_lprobs.size(-1)
    # padding rows first: the vocabulary-wide ops below are the regularizer's main cost
    rows = _real_row_index(mask, count)
    p_log = teacher_lprobs.reshape(-1, v).index_select(0, rows).float()
    q_log = student_lprobs.reshape(-1, v).index_select(0, rows).float()
    return _rows_divergence(p_log, q_log, kind)


def _check_kind(kind: str) -> None:
    if kind not in ("forward", "symmetric"):
        raise ValueError(f"unknown divergence {kind!r}: use forward or symmetric")


def _real_row_index(mask: torch.Tensor, count: Optional[int]) -> torch.Tensor:
    """The flat indices of ``mask``'s True entries (without a sync when the host gives
    their ``count``, see :func:`real_rows`)."""
    keep = mask.reshape(-1)
    return keep.nonzero().squeeze(1) if count is None else real_rows(keep, int(count))


def _rows_divergence(p_log: torch.Tensor, q_log: torch.Tensor, kind: str) -> torch.Tensor:
    """The divergence summed over rows of float32 log-probs (real rows only)."""
    kl_pq = F.kl_div(q_log, p_log, reduction="sum", log_target=True)
    if kind == "forward":
        return kl_pq
    return 0.5 * (kl_pq + F.kl_div(p_log, q_log, reduction="sum", log_target=True))


# Rows of the vocabulary-wide divergence computed at once: its temporaries (a few rows x V,
# float32) then stay about 1/DIVERGENCE_CHUNKS of one logits tensor; at least
# DIVERGENCE_MIN_CHUNK_ELEMENTS per chunk, so that a small batch is not split into tiny ops.
DIVERGENCE_CHUNKS = 8
DIVERGENCE_MIN_CHUNK_ELEMENTS = 2 ** 18


def divergence_chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk of :class:`LogitsDivergence` (>= 1)."""
    return max(1, min(rows, max(-(-rows // DIVERGENCE_CHUNKS), DIVERGENCE_MIN_CHUNK_ELEMENTS // max(vocab, 1))))


class LogitsDivergence(torch.autograd.Function):
    """The divergence of :func:`divergence` from the student's logits instead of its
    log-probs: ``KL(p || softmax(z))`` (or the symmetric one), summed over the real rows.

    Why: through ``log_softmax`` and ``F.kl_div`` autograd keeps the log-probs, the
    selected rows of both sides and the products of the KL alive, five or so
    vocabulary-sized tensors per forward, the largest part of the regulariser's peak
    memory. Here the forward and the backward go through the rows in chunks
    and keep only the logits (which the output projection produced anyway) and the
    teacher; the gradient w.r.t. the logits is the only new vocabulary-sized tensor:
    ``softmax(z) * sum(p) - p`` (forward KL), plus ``q * (r - E_q[r])`` with
    ``r = log q - log p`` for the reverse half of the symmetric one.

    Inputs: ``teacher_rows`` N x V log-probs of the real rows (no grad), ``logits``
    M x V (any float dtype, M >= N rows: the batch's flat B*T positions), ``rows`` the N
    indices of the real rows in ``logits``. Computed in float32.
    """

    @staticmethod
    def forward(ctx, teacher_rows, logits, rows, symmetric: bool):
        n, v = teacher_rows.shape
        chunk = divergence_chunk_rows(n, v)
        total = logits.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            p = teacher_rows[i:i + chunk].float()
            q = torch.log_softmax(logits.index_select(0, rows[i:i + chunk]).float(), -1)
            if symmetric:
                total += 0.5 * ((p.exp() - q.exp()) * (p - q)).sum()
            else:
                total += (p.exp() * (p - q)).sum()
        ctx.save_for_backward(teacher_rows, logits, rows)
        ctx.symmetric = symmetric
        return total

    @staticmethod
    def backward(ctx, grad_total):
        teacher_rows, logits, rows = ctx.saved_tensors
        n, v = teacher_rows.shape
        chunk = divergence_chunk_rows(n, v)
        grad = torch.zeros_like(logits)
        for i in range(0, n, chunk):
            idx = rows[i:i + chunk]
            p = teacher_rows[i:i + chunk].float()
            q = torch.log_softmax(logits.index_select(0, idx).float(), -1)
            ep, eq = p.exp(), q.exp()
            g = eq * ep.sum(-1, keepdim=True) - ep  # d KL(p || softmax z) / dz
            if ctx.symmetric:
                r = q - p
                g = 0.5 * (g + eq * (r - (eq * r).sum(-1, keepdim=True)))
            grad.index_copy_(0, idx, (g * grad_total).to(grad.dtype))
        return None, grad, None, None


class Teacher:
    """The detached clean prediction on the real target tokens, kept once per batch for
    every divergence of that batch (S ascent steps + the final one): ``lprobs`` N x V
    float32 log-probs of the N real rows, ``rows`` their indices in the flat B*T
    positions. Only the real rows are kept (the full B x T x V teacher held the padding
    rows as well, for the whole step).

    ``keep_graph``: also keep the rows with their graph (``live``), for a divergence whose
    gradient flows into the clean branch too (``--adv-teacher grad``, as R-Drop)."""

    def __init__(self, lprobs: torch.Tensor, mask: torch.Tensor, count: Optional[int] = None,
                 keep_graph: bool = False):
        v = lprobs.size(-1)
        self.rows = _real_row_index(mask, count)
        live = lprobs.reshape(-1, v).index_select(0, self.rows).float() if keep_graph else None  # N x V
        self.live = live
        self.lprobs = live.detach() if keep_graph else lprobs.detach().reshape(-1, v).index_select(0, self.rows).float()
        self.shape = tuple(mask.shape)

    def sentences(self, start: int, end: int, width: int) -> "Teacher":
        """The teacher of the batch's sentences [start, end) (a chunk of ``--adv-chunks``),
        ``width`` target positions each: its rows are a contiguous run of this one's, as the
        flat positions are sentence-major. One host sync for the run's bounds."""
        bounds = torch.tensor([start * width, end * width], device=self.rows.device, dtype=self.rows.dtype)
        lo, hi = torch.searchsorted(self.rows, bounds).tolist()
        part = Teacher.__new__(Teacher)
        part.rows = self.rows[lo:hi] - start * width
        part.lprobs = self.lprobs[lo:hi]
        part.live = None if self.live is None else self.live[lo:hi]
        part.shape = ((end - start) * width,) if len(self.shape) == 1 else (end - start, *self.shape[1:])
        return part

    def divergence(self, student: torch.Tensor, kind: str = "forward", logits: bool = False,
                   through_teacher: bool = False) -> torch.Tensor:
        """Token-summed divergence of ``student`` (log-probs, or logits with
        ``logits=True``; ``... x V`` with as many positions as the teacher's mask) from the
        teacher; ``through_teacher``: with the gradient into the teacher's graph too."""
        _check_kind(kind)
        v = self.lprobs.size(-1)
        assert student.numel() == math.prod(self.shape) * v and student.size(-1) == v, (
            f"student {tuple(student.shape)} does not match the teacher's {self.shape} x {v}")
        flat = student.reshape(-1, v)
        if through_teacher:
            assert self.live is not None, "through_teacher needs a Teacher made with keep_graph=True"
            q_log = flat.index_select(0, self.rows).float()
            return _rows_divergence(self.live, torch.log_softmax(q_log, -1) if logits else q_log, kind)
        if logits:
            return LogitsDivergence.apply(self.lprobs, flat, self.rows, kind == "symmetric")
        return _rows_divergence(self.lprobs, flat.index_select(0, self.rows).float(), kind)


def sentence_norms(delta: Optional[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sentence-level l2 norm of each sample (B,), for logging."""
    if delta is None:
        return torch.zeros(mask.size(0))
    return ball_norms(delta, mask, "l2", "sentence").view(-1)
