"""fairseq_arch/code_recipe.py against a reference written from the description of the
official code (issue 19), in numpy loops over sentences: step by step, and across a
refresh, a reuse epoch and a second refresh."""

import numpy as np
import pytest
import torch

from fairseq_arch import code_recipe as R


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
    mask = torch.tensor([[True, True, True], [True, True, False]])
    reuse = R.code_reuse_delta([stored, None], [None, vec], mask, eps=EPS)
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
    out = R.code_reuse_delta([rows], [None], torch.tensor([[False, True, True]]), eps=100.0)
    assert torch.equal(out[0, 0], torch.zeros(4)) and torch.equal(out[0, 1:], rows)


# -- through the criterion and the cache (--arch-recipe code) ------------------------------

CODE = ["--adv-method", "arch", "--arch-recipe", "code", "--arch-cache-dtype", "float32",
        "--arch-refresh-interval", "3", "--arch-cache-fraction", "0.5", "--dropout", "0.1"]


def _code_run(small_toy, tmp_path, monkeypatch):
    from . import utils

    _, task, model, crit = utils.build_components(small_toy, CODE, save_dir=str(tmp_path))
    seen = utils.record_deltas(crit, monkeypatch, with_masks=True)
    model.train()
    batches = utils.batches(task)
    return task, model, crit, seen, batches


def test_code_recipe_defaults_schedule_and_refusals(small_toy, tmp_path):
    from . import utils

    _, task, model, crit = utils.build_components(small_toy, CODE, save_dir=str(tmp_path / "a"))
    assert (crit.space.eps, crit.ascent.steps, crit.space.step_size, crit.adv_kl) == (0.3, 2, 1e-4, "symmetric")
    modes = []
    for epoch in range(1, 7):
        task.begin_epoch(epoch, model)
        modes.append(task.arch_cache.mode)
        model.train()
        for b in utils.batches(task):
            crit(model, b)
    assert modes == ["refresh", "reuse", "refresh", "reuse", "reuse", "refresh"]
    _, _, _, smart = utils.build_components(small_toy, CODE[:1] + ["smart"] + CODE[2:], save_dir=str(tmp_path / "s"))
    assert smart.space.eps == 0.1, "the code recipe's defaults are ARCH's, not another method's"
    with pytest.raises(ValueError, match="float16"):
        utils.build_components(small_toy, CODE + ["--arch-cache-dtype", "float16"], save_dir=str(tmp_path / "b"))


def test_code_recipe_trains_on_what_the_code_computes(small_toy, tmp_path, monkeypatch):
    """Epoch 1 (refresh): a non-negative start of norm eps over the padded sentence; the
    cache keeps final - start on the real tokens. Epoch 2 (reuse): cached displacements and
    neighbour vectors on every position, capped. Epoch 3 (refresh): the cached value is
    the code's EMA of the new displacement and the previous one."""
    task, model, crit, seen, batches = _code_run(small_toy, tmp_path, monkeypatch)
    eps, steps, alpha = crit.space.eps, crit.ascent.steps, task.cfg.arch_ema
    b = batches[0]
    ids = b["id"].tolist()

    def run_epoch(epoch):
        task.begin_epoch(epoch, model)
        model.train()
        out = []
        for batch in batches:
            seen.clear()
            crit(model, batch)
            out.append(list(seen))
        return out

    e1 = run_epoch(1)[0]  # batch 0: S ascent forwards, then the trained delta
    assert len(e1) == steps + 1
    for side, (init, _) in e1[0].items():
        assert (init >= 0).all() and torch.allclose(init.flatten(1).norm(dim=1), torch.full((len(ids),), eps), rtol=1e-5)
    e2 = run_epoch(2)[0]  # finalises epoch 1's generation, then reuse
    reader = task.arch_cache.open_reader()
    pos = reader.store.pos_of[ids]
    for side in crit.sides:
        init, mask = e1[0][side]
        trained1 = e1[-1][side][0]
        used2 = e2[-1][side][0]
        rows = reader.read_rows(side, pos[pos >= 0])
        j = 0
        for i in range(len(ids)):
            if pos[i] >= 0:
                disp = (trained1[i] - init[i])[mask[i]]
                assert torch.allclose(torch.from_numpy(rows[j]), disp, atol=1e-7), (side, i)
                placed = torch.zeros_like(used2[i])
                placed[mask[i]] = disp
                assert torch.allclose(used2[i], R.cap(placed[None], eps)[0], atol=1e-7)
                j += 1
            else:
                nbr = reader.neighbors[side][ids[i]]
                vec = torch.from_numpy(np.asarray(reader.means[side][nbr], dtype=np.float32)).mean(0)
                want = R.cap(vec.expand_as(used2[i])[None].clone(), eps)[0]
                assert torch.allclose(used2[i], want, atol=1e-7), (side, i)
                if not mask[i].all():
                    assert used2[i][~mask[i]].abs().sum() > 0, "a rebuilt vector covers the padding too"
    prev = {s: reader.read_rows(s, pos[pos >= 0]) for s in crit.sides}
    e3 = run_epoch(3)[0]
    writer = task.arch_cache.access
    for side in crit.sides:
        init3, mask = e3[0][side]
        trained3 = e3[-1][side][0]
        new = writer.store.read_rows(writer.generation, side, pos[pos >= 0])
        j = 0
        for i in range(len(ids)):
            if pos[i] < 0:
                continue
            value = torch.from_numpy(new[j])
            final = trained3[i][mask[i]] - value  # trained = final + value
            d = final - init3[i][mask[i]]
            assert torch.allclose(value, d * (1 - alpha) + torch.from_numpy(prev[side][j]) * alpha, atol=1e-6)
            j += 1
