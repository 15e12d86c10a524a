"""Issue 11, item 9: the criterion's hot path.

- The seeded initial perturbation is a counter-based generator (SplitMix64 of the sample's
  key and a counter) computed with tensor ops on the batch's device: bit-exact against a
  Python reference, invariant to batch composition and padding side, with the
  distributions of the old per-sample torch.Generator (gaussian, uniform in the l2 ball,
  l_inf box).
- No host-device sync inside the batch-level math: run on the ``meta`` device, where any
  read of a value on the host (``.item()``, ``bool()``, ``.tolist()``, ``nonzero``, boolean
  indexing) raises, the code paths an accelerator takes must go through.
- Logging norms stay tensors (fairseq sums them), cache rows reach the device in one copy.
"""

import math

import numpy as np
import pytest
import torch

from fairseq_arch import perturbation as P

from . import utils
from .test_perturbation import padded_mask
from .test_robustness import one_refresh_epoch

CASES = [("uniform", "l2", "sentence"), ("uniform", "l2", "word"), ("uniform", "linf", "sentence"),
         ("uniform", "linf", "word"), ("normal", "l2", "sentence")]




# -- the generator ------------------------------------------------------------------------


@pytest.mark.fast
def test_keys_and_words_are_the_python_reference_bit_for_bit():
    """int64 tensor arithmetic wraps around mod 2**64 exactly like the Python reference
    (SplitMix64): on a platform where it did not, every init would silently change."""
    ids = torch.tensor([0, 1, 5, 2 ** 40 + 7, 123456789, 2 ** 62 + 3])
    for seed, epoch, side in [(1, 1, 0), (7, 3, 1), (2 ** 40, 1_000_123, 0)]:
        keys = P.sample_keys(ids, seed, epoch, side)
        assert keys.tolist() == [P.sample_seed(seed, int(i), epoch, side) for i in ids]
        counters = torch.tensor([0, 1, 7, 2 ** 30, 2 ** 39 + 5])
        for stream in (P._STREAM_GAUSS, P._STREAM_UNIFORM, P._STREAM_RADIUS):
            words = P._words(keys[:, None], stream, counters[None, :])
            want = [[P._signed(P.random_word(int(k), stream, int(c))) for c in counters] for k in keys]
            assert words.tolist() == want


@pytest.mark.fast
@pytest.mark.parametrize("init,norm,gran", CASES)
def test_init_is_invariant_to_batch_composition_and_padding_side(init, norm, gran):
    ids = [5, 9, 2, 11]
    lengths = [3, 6, 1, 4]
    ref = P.seeded_init(ids, padded_mask(lengths, 6, left=True), 16, 1, 2, 0, init, 0.1, norm, gran)
    ref_mask = padded_mask(lengths, 6, left=True)
    # other batches: other neighbours and order, right padding, longer padding
    for order, T, left in [([3, 1], 9, False), ([1, 0, 2], 6, False), ([2], 1, True), ([0, 3, 2, 1], 12, True)]:
        mask = padded_mask([lengths[i] for i in order], T, left)
        got = P.seeded_init([ids[i] for i in order], mask, 16, 1, 2, 0, init, 0.1, norm, gran)
        assert (got[~mask] == 0).all()
        for j, i in enumerate(order):
            assert torch.equal(got[j][mask[j]], ref[i][ref_mask[i]]), (init, norm, gran, order, i)
    # ids as a tensor (the criterion passes sample["id"]) give the same
    same = P.seeded_init(torch.tensor(ids), ref_mask, 16, 1, 2, 0, init, 0.1, norm, gran)
    assert torch.equal(same, ref)


@pytest.mark.fast
@pytest.mark.parametrize("init,norm,gran", CASES)
def test_accelerator_layout_gives_the_same_values(init, norm, gran):
    """An accelerator generates every position (no nonzero(), no sync), the host only the
    real tokens: the same numbers, bit for bit."""
    mask = padded_mask([3, 6, 1, 4], 6, left=True)
    ids = [5, 9, 2, 11]
    host = P.seeded_init(ids, mask, 16, 1, 2, 0, init, 0.1, norm, gran, compact=True)
    every = P.seeded_init(ids, mask, 16, 1, 2, 0, init, 0.1, norm, gran, compact=False)
    assert torch.equal(host, every)


@pytest.mark.fast
@pytest.mark.parametrize("init,norm,gran", CASES)
def test_init_depends_on_seed_id_epoch_side(init, norm, gran):
    mask = padded_mask([4], 4, left=False)
    base = P.seeded_init([9], mask, 8, 1, 1, 0, init, 0.1, norm, gran)
    for args in [([9], 2, 1, 0), ([9], 1, 2, 0), ([9], 1, 1, 1), ([10], 1, 1, 0)]:
        ids, seed, epoch, side = args
        other = P.seeded_init(ids, mask, 8, seed, epoch, side, init, 0.1, norm, gran)
        assert not torch.equal(other, base), args


def _many(init, norm, gran, n=400, length=6, dim=32, scale=0.1):
    mask = torch.ones(n, length, dtype=torch.bool)
    return P.seeded_init(range(n), mask, dim, 3, 1, 0, init, scale, norm, gran)


@pytest.mark.fast
def test_normal_init_has_the_moments_of_a_gaussian_and_no_correlations():
    s = 1e-5
    d = _many("normal", "l2", "sentence", scale=s) / s  # 400 x 6 x 32 = 76800 standard normals
    z = d.reshape(-1).double()
    n = z.numel()
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((z ** 4).mean() - 3) < 0.1  # kurtosis of a gaussian
    assert abs((z.abs() > 1.96).double().mean() - 0.05) < 0.005
    # no correlation between neighbouring coordinates, the cosine/sine halves of a pair,
    # neighbouring tokens or neighbouring samples
    for a, b in [(d[:, :, :-1], d[:, :, 1:]), (d[:, :, :16], d[:, :, 16:]), (d[:, :-1], d[:, 1:]), (d[:-1], d[1:])]:
        corr = float((a * b).mean() / (a.std() * b.std()))
        assert abs(corr) < 4 / math.sqrt(a.numel()), corr


@pytest.mark.fast
def test_linf_init_is_uniform_in_the_box():
    d = _many("uniform", "linf", "sentence").reshape(-1).double() / 0.1
    assert d.abs().max() <= 1.0
    n = d.numel()
    assert abs(d.mean()) < 4 * math.sqrt(1 / 3 / n)
    assert abs(d.var() - 1 / 3) < 0.01
    hist = torch.histc(d.float(), bins=10, min=-1, max=1) / n
    assert (hist - 0.1).abs().max() < 0.01


def _ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of samples to U(0, 1)."""
    u, _ = u.double().sort()
    n = u.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(grid - u, u - (grid - 1 / n)).max())


@pytest.mark.fast
@pytest.mark.parametrize("gran", ["sentence", "word"])
def test_l2_init_is_uniform_in_the_ball(gran):
    """Uniform in an n-dim ball: the radius r/eps has CDF t^n, i.e. (r/eps)^n ~ U(0, 1),
    and the direction is isotropic (mean direction ~ 0)."""
    n_samples, length, dim = 1000, 3, 8
    d = _many("uniform", "l2", gran, n=n_samples, length=length, dim=dim)
    if gran == "sentence":
        r = d.reshape(n_samples, -1).norm(dim=1) / 0.1
        n = length * dim
        directions = d.reshape(n_samples, -1) / (r[:, None] * 0.1)
    else:
        r = d.reshape(-1, dim).norm(dim=1) / 0.1
        n = dim
        directions = d.reshape(-1, dim) / (r[:, None] * 0.1)
    assert r.max() <= 1 + 1e-6
    ks = _ks_uniform(r.double() ** n)
    assert ks < 1.63 / math.sqrt(r.numel()), f"KS distance {ks}: the radius is not that of a uniform ball"
    assert directions.mean(dim=0).norm() < 4 / math.sqrt(directions.size(0))


# -- no sync: the accelerator's code paths on the meta device ---------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("init,norm,gran", CASES)
def test_init_reads_no_value_on_the_host(init, norm, gran):
    """On an accelerator the init is generated without one host-device sync: on ``meta``
    any host read raises. (The old init drew on the host, sample by sample.)"""
    mask = torch.ones(4, 7, dtype=torch.bool, device="meta")
    ids = torch.arange(4, device="meta")
    d = P.seeded_init(ids, mask, 16, 1, 1, 0, init, 0.1, norm, gran)
    assert d.shape == (4, 7, 16) and d.device.type == "meta"


@pytest.mark.fast
def test_cache_rows_are_placed_without_reading_the_mask_on_the_host():
    mask = torch.ones(3, 5, dtype=torch.bool, device="meta")
    rows = [np.zeros((5, 8), dtype=np.float32) for _ in range(3)]  # host rows, as read from the cache
    out = P.scatter_rows(rows, mask)
    assert out.shape == (3, 5, 8) and out.device.type == "meta"


@pytest.mark.fast
@pytest.mark.parametrize("left", [True, False])
def test_place_rows_and_rows_to_host_match_boolean_indexing(left):
    torch.manual_seed(0)
    mask = padded_mask([4, 1, 3, 0, 2], 5, left)
    flat = torch.randn(int(mask.sum()), 6)
    want = torch.zeros(5, 5, 6)
    want[mask] = flat
    assert torch.equal(P.place_rows(flat, mask), want)
    rows = P.rows_to_host(want, mask, [4, 1, 3, 0, 2])
    assert [r.shape[0] for r in rows] == [4, 1, 3, 0, 2]
    assert all(np.array_equal(r, g.numpy()) for r, g in zip(rows, P.gather_rows(want, mask)))
    with pytest.raises(AssertionError, match="cache does not belong"):
        P.rows_to_host(want, mask, [4, 1, 3, 1, 2])


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["forward", "symmetric"])
def test_divergence_drops_padding_rows_without_a_sync_given_the_count(kind):
    """The KL's padding rows were dropped by boolean indexing, a sync per call (S + 1 per
    batch); with the host's token count (fairseq's ntokens) they are not."""
    torch.manual_seed(0)
    p, q = torch.randn(3, 5, 7).log_softmax(-1), torch.randn(3, 5, 7).log_softmax(-1)
    mask = padded_mask([5, 2, 3], 5, left=False)
    assert torch.equal(P.divergence(p, q, mask, kind, count=10), P.divergence(p, q, mask, kind))
    on_meta = P.divergence(p.to("meta"), q.to("meta"), mask.to("meta"), kind, count=10)
    assert on_meta.shape == () and on_meta.device.type == "meta"
    with pytest.raises(AssertionError, match="real rows"):
        P.divergence(p, q, mask, kind, count=9)


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


def test_ascent_step_checks_finiteness_without_a_sync(data_dir, tmp_path):
    """One check of the gradients' finiteness per ascent, not a sync per step: a step on
    ``meta`` tensors (where bool() raises) goes through, and the flag it returns is False
    after a non-finite gradient."""
    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "smart"], save_dir=str(tmp_path))
    space = crit.space
    masks = {s: torch.ones(2, 3, dtype=torch.bool, device="meta") for s in crit.sides}
    delta = {s: torch.zeros(2, 3, 32, device="meta") for s in crit.sides}
    out, finite = space.step(delta, [torch.ones(2, 3, 32, device="meta") for _ in crit.sides], masks)
    assert set(out) == set(crit.sides) and finite.device.type == "meta"
    masks = {s: torch.ones(2, 3, dtype=torch.bool) for s in crit.sides}
    delta = {s: torch.zeros(2, 3, 32) for s in crit.sides}
    grads = [torch.ones(2, 3, 32), torch.full((2, 3, 32), float("nan"))]
    _, finite = space.step(delta, grads[:len(crit.sides)], masks)
    assert bool(finite) is (len(crit.sides) == 1)


def test_logged_delta_norms_stay_tensors_and_reduce_to_the_mean(data_dir, tmp_path):
    """``float(norms.sum())`` was one sync per batch: the logging output keeps a tensor,
    which fairseq sums (logging_outputs_can_be_summed) and reduce_metrics averages."""
    from fairseq.logging import metrics

    _, task, model, crit = utils.build_components(data_dir, ["--adv-method", "smart"], save_dir=str(tmp_path))
    model.train()
    logs = [crit(model, b)[2] for b in utils.batches(task)[:2]]
    assert all(torch.is_tensor(log["adv_delta_norm"]) for log in logs)
    mean = float(sum(log["adv_delta_norm"] for log in logs)) / sum(log["adv_delta_count"] for log in logs)
    assert mean == pytest.approx(0.1, rel=0.02)  # the ascent ends on the ball
    with metrics.aggregate() as agg:
        type(crit).reduce_metrics(logs)
    assert agg.get_smoothed_values()["adv_delta_norm"] == pytest.approx(mean, abs=1e-4)


def _filled_cache(data_dir, tmp_path):
    """An arch run after its refresh epoch, at the start of reuse epoch 2."""
    return one_refresh_epoch(data_dir, str(tmp_path), ["--arch-cache-fraction", "0.5"])


def test_reuse_read_reads_no_value_of_the_device_on_the_host(data_dir, tmp_path):
    """A reuse batch's rows are made on the host (memory maps, rebuilds) and placed on the
    device without reading the mask back (the old read took mask.sum().tolist(), boolean
    indexing and one copy per row): on ``meta`` any such read raises."""
    task, model, crit, batches = _filled_cache(data_dir, tmp_path)
    b = batches[0]
    ids = b["id"].tolist()
    for side, toks in (("source", b["net_input"]["src_tokens"]), ("target", b["net_input"]["prev_output_tokens"])):
        on_host, n_cached, n_rebuilt = task.arch_cache.access.read(ids, side, toks.ne(1), crit.project)
        delta, _, _ = task.arch_cache.access.read(ids, side, toks.ne(1).to("meta"), crit.project)
        assert delta.device.type == "meta" and delta.shape == on_host.shape
        assert n_cached > 0 and n_rebuilt > 0


@pytest.mark.parametrize("rebuild_norm", ["paper", "neighbor"])
def test_reuse_read_equals_the_per_token_rows_bit_for_bit(data_dir, tmp_path, rebuild_norm):
    """The read sends a table (cached rows + one vector per rebuilt sentence) and expands it
    on the device; the result is bit for bit what placing every sentence's token rows gives
    (the read before: cached rows, Eq. 3 rows expanded on the host, scatter_rows)."""
    task, model, crit, batches = one_refresh_epoch(
        data_dir, str(tmp_path), ["--arch-cache-fraction", "0.5", "--arch-rebuild-norm", rebuild_norm])
    cache = task.arch_cache
    for b in batches[:3]:
        ids = b["id"].tolist()
        for side, toks in (("source", b["net_input"]["src_tokens"]), ("target", b["net_input"]["prev_output_tokens"])):
            m = toks.ne(1)
            delta, n_cached, n_rebuilt = cache.access.read(ids, side, m, crit.project)
            assert n_cached > 0 and n_rebuilt > 0
            rows = []
            for i, n in zip(ids, m.sum(1).tolist()):
                p = int(cache.store.pos_of[i])
                if p >= 0:
                    rows.append(cache.access.read_rows(side, [p])[0])
                    continue
                nbr = np.asarray(cache.access.neighbors[side][i], dtype=np.int64)
                means = torch.from_numpy(np.asarray(cache.access.means[side][nbr], dtype=np.float32))[None]
                norms = None if cache.access.sizes is None else torch.from_numpy(
                    np.asarray(cache.access.sizes[side][nbr], dtype=np.float32))[None]
                rows.append(cache.access.rebuild(means, [n], norms)[0])
            want = crit.project(P.scatter_rows(rows, m), m)
            assert torch.equal(delta, want), (side, float((delta - want).abs().max()))


def test_arch_batch_ids_reach_the_host_once_per_batch(data_dir, tmp_path, monkeypatch):
    """A reuse batch reads both sides' rows: the ids tensor comes to the host once."""
    task, model, crit, batches = _filled_cache(data_dir, tmp_path)
    b = batches[0]
    reads = []
    for name in ("cpu", "tolist", "item"):  # the ways a device tensor reaches the host
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            if self is b["id"]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    _, _, log = crit(model, b)
    assert log["arch_cached"] + log["arch_rebuilt"] == len(b["id"])
    assert len(reads) == 1, f"the batch's ids went to the host {len(reads)} times: {reads}"
