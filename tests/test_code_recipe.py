"""fairseq_arch/code_recipe.py against a reference written from the description of the
official code (issue 19), in numpy loops over sentences: step by step, and across a
refresh, a reuse epoch and a second refresh."""

import numpy as np
import pytest
import torch

from fairseq_arch import code_recipe as R

pytestmark = pytest.mark.fast
EPS, LR, ALPHA = 0.3, 0.05, 0.01


def ref_cap(x, eps):
    out = x.copy()
    for b in range(len(x)):
        n = np.sqrt((x[b].astype(np.float64) ** 2).sum())
        if n > eps:
            out[b] = x[b] * (eps / (n + 1e-7))
    return out


def ref_step(delta, grad, lr, eps):
    out = np.empty_like(delta)
    for b in range(len(delta)):
        n = max(np.sqrt((grad[b].astype(np.float64) ** 2).sum()), 1e-6)
        out[b] = delta[b] + lr * grad[b] / n
    return ref_cap(out, eps)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def test_refresh_schedule_is_1_then_every_multiple_of_tc():
    assert [e for e in range(1, 47) if R.is_code_refresh_epoch(e, 15)] == [1, 15, 30, 45]
    assert [R.code_last_refresh_epoch(e, 15) for e in (2, 14, 16, 29, 31)] == [1, 1, 15, 15, 30]
    assert [e for e in range(1, 10) if R.is_code_refresh_epoch(e, 0)] == [1]


def test_init_is_non_negative_with_norm_eps_over_the_padded_sentence():
    u = torch.rand(3, 5, 4)
    d = R.code_init(u, EPS)
    assert (d >= 0).all()
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.full((3,), EPS), rtol=1e-6)


def test_step_normalises_per_sentence_and_caps_at_eps():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(4, 3, 2)).astype(np.float32) * 0.1
    grad = rng.normal(size=(4, 3, 2)).astype(np.float32)
    grad[1] *= 1e-9  # below the 1e-6 floor of the norm
    got = R.code_step(t(delta), t(grad), 1.0, EPS).numpy()
    assert np.allclose(got, ref_step(delta, grad, 1.0, EPS), atol=1e-6)
    inside = R.code_step(t(delta) * 0.01, t(grad), 1e-4, EPS)
    assert torch.allclose(inside, t(delta) * 0.01 + 1e-4 * t(grad) / t(grad).flatten(1).norm(dim=1).clamp(min=1e-6)
                          .view(-1, 1, 1), atol=1e-7), "inside the ball the cap must be the identity"


def test_ema_as_the_code_writes_it():
    d, prev = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    got = R.code_ema(d, prev, ALPHA, torch.tensor([1, 0]))
    assert torch.allclose(got[0], d[0] * (1 - ALPHA) + prev[0] * ALPHA)
    assert torch.allclose(got[1], d[1] + prev[1] * ALPHA)  # m = 0: d (1 - a) + prev a + d a


def test_rebuilt_vector_is_the_mean_of_neighbours_token_means():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.allclose(R.code_rebuilt_vector([a, b]), ((a.sum(0) / 3 + b.sum(0) / 5) / 2)[None])


def _ascent(init, grads):
    """Our functions: S steps from init with the given per-step gradients."""
    delta = init
    for g in grads:
        delta = R.code_step(delta, g, LR, EPS)
    return delta


def _ref_ascent(init, grads):
    delta = init.copy()
    for g in grads:
        delta = ref_step(delta, g, LR, EPS)
    return delta


def test_refresh_reuse_refresh_against_the_reference():
    """Two sentences, a cached one (0, length 3) and an uncached one (1, length 2) whose
    neighbour is 0; padded length 3, right padding (a target side)."""
    rng = np.random.default_rng(1)
    lengths, T, C = [3, 2], 3, 4
    grads1 = [rng.normal(size=(2, T, C)).astype(np.float32) for _ in range(2)]
    grads2 = [rng.normal(size=(2, T, C)).astype(np.float32) for _ in range(2)]
    u1, u2 = rng.random((2, T, C)).astype(np.float32), rng.random((2, T, C)).astype(np.float32)

    # epoch 1 (refresh): train on the final delta, store the displacement of the cached sentence
    init1 = R.code_init(t(u1), EPS)
    final1 = _ascent(init1, [t(g) for g in grads1])
    ref_init1 = np.stack([u1[b] / max(np.sqrt((u1[b].astype(np.float64) ** 2).sum()), 1e-6) * EPS for b in range(2)])
    ref_final1 = _ref_ascent(ref_init1, grads1)
    assert np.allclose(final1.numpy(), ref_final1, atol=1e-6)
    stored = (final1 - init1)[0, :lengths[0]]  # padding stripped, cached sentence only
    ref_stored = (ref_final1 - ref_init1)[0, :lengths[0]]
    assert np.allclose(stored.numpy(), ref_stored, atol=1e-6)
    assert float(stored.norm()) <= 2 * LR + 1e-6, "the displacement is at most S x lr"

    # epoch 2 (reuse): the cached sentence its capped displacement, the other its neighbour's
    # token mean on every position (padding included), capped
    vec = R.code_rebuilt_vector([stored])
    reuse = R.code_reuse_delta([stored, None], [None, vec], lengths, left_pad=False, length=T, eps=EPS)
    ref_reuse = np.zeros((2, T, C), dtype=np.float32)
    ref_reuse[0, :3] = ref_stored
    ref_reuse[1, :] = ref_stored.sum(0) / 3
    assert np.allclose(reuse.numpy(), ref_cap(ref_reuse, EPS), atol=1e-7)

    # epoch Tc (second refresh): EMA with the previous values (m = 1 cached, 0 rebuilt),
    # added to the trained delta
    init2 = R.code_init(t(u2), EPS)
    final2 = _ascent(init2, [t(g) for g in grads2])
    disp2 = final2 - init2
    prev = torch.zeros(2, T, C)
    prev[0, :3], prev[1] = stored, vec.expand(T, C)
    value = R.code_ema(disp2, prev, ALPHA, torch.tensor([1, 0]))
    trained = final2 + value
    ref_init2 = np.stack([u2[b] / np.sqrt((u2[b].astype(np.float64) ** 2).sum()) * EPS for b in range(2)])
    ref_final2 = _ref_ascent(ref_init2, grads2)
    ref_d2 = ref_final2 - ref_init2
    ref_prev = np.zeros((2, T, C), dtype=np.float32)
    ref_prev[0, :3], ref_prev[1] = ref_stored, ref_stored.sum(0) / 3
    ref_value = np.stack([ref_d2[0] * (1 - ALPHA) + ref_prev[0] * ALPHA,
                          ref_d2[1] * (1 - ALPHA) + ref_prev[1] * ALPHA + ref_d2[1] * ALPHA])
    assert np.allclose(value.numpy(), ref_value, atol=1e-6)
    assert np.allclose(trained.numpy(), ref_final2 + ref_value, atol=1e-6)


def test_left_padded_rows_go_to_their_own_tokens():
    rows = torch.arange(8.0).view(2, 4)
    out = R.code_reuse_delta([rows], [None], [2], left_pad=True, length=3, eps=100.0)
    assert torch.equal(out[0, 0], torch.zeros(4)) and torch.equal(out[0, 1:], rows)
