"""Every perturbation and cache option, through the criterion and the cache (not the
pure functions alone): each test asserts an effect the option must have on the
perturbations the model is trained on, on the logged loss, or on the cache.

The deltas are recorded where the criterion feeds them to a perturbed forward
(``crit.perturbed_forward``); epochs are driven as in test_criterion.py.
"""

import os

import numpy as np
import pytest
import torch

from fairseq_arch.injection import unwrap_model
from fairseq_arch.neighbors import normalize_rows

from . import utils

EPS = 0.1  # --adv-eps default


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


build = utils.build_for_training


def record_deltas(crit, monkeypatch):
    """Every delta fed to a perturbed forward, with the padding mask of its side."""
    return utils.record_deltas(crit, monkeypatch, with_masks=True)


def run_epoch(task, model, crit, epoch, batches):
    task.begin_epoch(epoch, model)
    model.train()
    return [crit(model, b)[2] for b in batches]


# -- --adv-sides ------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["source", "target"])
def test_adv_sides_perturbs_and_caches_only_that_side(data_dir, tmp_path, monkeypatch, side):
    other = {"source": "target", "target": "source"}[side]
    task, model, crit = build(data_dir, tmp_path, ["--adv-sides", side, "--arch-refresh-interval", "2",
                                                   "--arch-cache-fraction", "0.5"])
    seen = record_deltas(crit, monkeypatch)
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)  # refresh: ascent + store
    n_refresh = len(seen)
    logs = run_epoch(task, model, crit, 2, batches)  # reuse: cache reads + rebuilds
    assert len(seen) > n_refresh and all(l["arch_cached"] + l["arch_rebuilt"] == len(b["id"])
                                         for l, b in zip(logs, batches))
    for d in seen:  # ascent steps, refresh and reuse forwards alike
        assert set(d) == {side}, f"--adv-sides {side} perturbed {sorted(d)}"
        assert d[side][0].abs().sum() > 0, "the chosen side is not perturbed"
    cache = task.arch_cache
    assert cache.store.sides == [side], cache.store.sides
    gen_files = os.listdir(os.path.join(cache.store.dir, cache.access.generation))
    assert any(f.startswith(side) for f in gen_files), gen_files
    assert not any(f.startswith(other) for f in gen_files), f"the cache holds {other} files: {gen_files}"


# -- --adv-granularity word, --adv-norm linf ---------------------------------------------


def _refresh_and_reuse_deltas(data_dir, tmp_path, monkeypatch, extra):
    """Deltas of a refresh epoch (ascent, stored) and a reuse epoch (cached rows and
    neighbour rebuilds) of ARCH with the given options."""
    task, model, crit = build(data_dir, tmp_path, ["--arch-refresh-interval", "2", "--arch-cache-fraction", "0.5",
                                                   *extra])
    seen = record_deltas(crit, monkeypatch)
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)
    logs = run_epoch(task, model, crit, 2, batches)
    assert sum(l["arch_rebuilt"] for l in logs) > 0 and sum(l["arch_cached"] for l in logs) > 0
    return seen


def test_word_granularity_bounds_every_token_not_the_sentence(data_dir, tmp_path, monkeypatch):
    seen = _refresh_and_reuse_deltas(data_dir, tmp_path, monkeypatch, ["--adv-granularity", "word"])
    longest = 0.0
    for d in seen:
        for side, (delta, mask) in d.items():
            token_norms = delta.norm(dim=-1)[mask]
            assert token_norms.max() <= EPS * (1 + 1e-5), f"{side}: a token's delta has norm {token_norms.max()}"
            assert delta[~mask].abs().sum() == 0, "padding perturbed"
            longest = max(longest, float(delta.pow(2).sum(dim=(1, 2)).sqrt().max()))
    # one ball per token: whole sentences go far beyond eps (sentence balls would not)
    assert longest > 2 * EPS, f"sentence norms stay <= {longest}: the ball is still per sentence"


def test_linf_norm_bounds_every_coordinate(data_dir, tmp_path, monkeypatch):
    seen = _refresh_and_reuse_deltas(data_dir, tmp_path, monkeypatch, ["--adv-norm", "linf"])
    longest, saturated = 0.0, False
    for d in seen:
        for side, (delta, mask) in d.items():
            assert delta.abs().max() <= EPS * (1 + 1e-5), f"{side}: max |delta| {delta.abs().max()} > eps"
            saturated |= bool((delta.abs() >= EPS * (1 - 1e-3)).any())
            longest = max(longest, float(delta.pow(2).sum(dim=(1, 2)).sqrt().max()))
    assert saturated, "no coordinate reaches the box's face: not an l_inf ascent"
    assert longest > 2 * EPS, f"l2 norms stay <= {longest}: still projected on the l2 ball"


# -- --adv-kl ---------------------------------------------------------------------------


def _lprobs(model, net_input, delta=None):
    core = unwrap_model(model)
    handles = []
    for module, side in ((core.encoder.embed_tokens, "source"), (core.decoder.embed_tokens, "target")):
        if delta and side in delta:
            handles.append(module.register_forward_hook(lambda m, i, o, d=delta[side]: o + d))
    try:
        with torch.no_grad():
            return model.get_normalized_probs(model(**net_input), log_probs=True).float()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method,kl", [("smart", "symmetric"), ("r3f", "forward"), ("arch", "forward")])
def test_adv_kl_chooses_the_logged_divergence(data_dir, tmp_path, monkeypatch, method, kl):
    """Each method against its non-default divergence (or arch's default): the logged
    regulariser is that KL of the clean and perturbed predictions, not the other one."""
    # --seed 2: a draw of the initial noise where the two divergences differ measurably for
    # all three (at seed 1 arch's forward and reverse KL agree to 2e-7 by chance)
    task, model, crit = build(data_dir, tmp_path, ["--adv-method", method, "--adv-kl", kl, "--seed", "2"])
    task.begin_epoch(1, model)
    model.train()
    seen = record_deltas(crit, monkeypatch)
    batch = utils.batches(task)[0]
    _, _, log = crit(model, batch)
    delta = {k: v for k, (v, _) in seen[-1].items()}
    p, q = _lprobs(model, batch["net_input"]), _lprobs(model, batch["net_input"], delta)
    mask = batch["target"].ne(1)
    kl_pq = (p.exp() * (p - q)).sum(-1)[mask].sum()
    kl_qp = (q.exp() * (q - p)).sum(-1)[mask].sum()
    want = {"forward": kl_pq, "symmetric": 0.5 * (kl_pq + kl_qp)}
    other = {"forward": "symmetric", "symmetric": "forward"}[kl]
    # near delta = 0 the two KLs differ only at second order: demand the logged value
    # be ten times closer to the chosen one than the gap between the two
    gap = float((want[kl] - want[other]).abs())
    assert gap > 1e-6 * float(want[kl]), "the two divergences coincide here"
    assert float((log["adv_loss"] - want[kl]).abs()) < gap / 10, (
        f"--adv-kl {kl}: logged {log['adv_loss']}, {kl} {want[kl]}, {other} {want[other]}")


# -- --arch-neighbor-embeddings -----------------------------------------------------------


def _neighbour_table(data_dir, tmp_path, source):
    task, model, crit = build(data_dir, tmp_path, ["--arch-cache-fraction", "0.3", "--arch-refresh-interval", "2",
                                                   "--arch-neighbor-embeddings", source])
    run_epoch(task, model, crit, 1, utils.batches(task))
    task.begin_epoch(2, model)  # finalises the refresh: neighbours searched here
    cache = task.arch_cache
    uncached = np.nonzero(cache.store.pos_of < 0)[0]
    nbr = np.asarray(cache.store.load_array(cache.access.generation, "source", "neighbors"))[uncached, 0]
    return task, model, cache, uncached, nbr


def _similarities(cache, uncached, w):
    """cosine similarity of each uncached sentence to each cached one, by mean embedding in w."""
    q = normalize_rows(cache.search.sentence_vectors("source", uncached, w))
    db = normalize_rows(cache.search.sentence_vectors("source", cache.store.cached_ids, w))
    return q @ db.t()


def test_neighbor_embeddings_file_is_what_the_search_uses(data_dir, tmp_path):
    _, task0, _, _ = utils.build_components(data_dir, save_dir=str(tmp_path / "dict"))
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((len(task0.src_dict), 16)).astype(np.float32))
    path = tmp_path / "w.npy"
    np.save(path, w.numpy())
    task, model, cache, uncached, nbr = _neighbour_table(data_dir, tmp_path / "run", str(path))
    sims = _similarities(cache, uncached, w)
    chosen = sims[torch.arange(len(uncached)), torch.from_numpy(nbr).long()]
    assert torch.allclose(chosen, sims.max(1).values, atol=1e-5), "not the nearest neighbours under the file's W"
    # and not the model's own embeddings (the default): they would choose otherwise
    sims_model = _similarities(cache, uncached, unwrap_model(model).encoder.embed_tokens.weight.detach())
    chosen_model = sims_model[torch.arange(len(uncached)), torch.from_numpy(nbr).long()]
    assert (chosen_model < sims_model.max(1).values - 1e-4).any(), "the file's W changed nothing"


def test_neighbor_embeddings_random_is_not_a_nearest_neighbour_search(data_dir, tmp_path):
    task, model, cache, uncached, nbr = _neighbour_table(data_dir, tmp_path, "random")
    assert cache.last_search_backend == "random"
    assert ((0 <= nbr) & (nbr < cache.store.num_cached)).all()
    sims = _similarities(cache, uncached, unwrap_model(model).encoder.embed_tokens.weight.detach())
    chosen = sims[torch.arange(len(uncached)), torch.from_numpy(nbr).long()]
    nearest = (chosen >= sims.max(1).values - 1e-6).float().mean()
    assert nearest < 0.5, f"{nearest:.0%} of the random neighbours are the nearest ones"
    assert len(set(nbr.tolist())) > 1, "one neighbour for everyone is not random"


# -- --arch-refresh-interval 0, --arch-ema 0 ----------------------------------------------


def test_refresh_interval_zero_never_refreshes_again(data_dir, tmp_path, monkeypatch):
    """Tc = 0 (the paper's inf): epoch 1 refreshes, every later epoch (16 and 31 too,
    which the default Tc = 15 refreshes) reuses the same cached perturbations."""
    task, model, crit = build(data_dir, tmp_path, ["--arch-refresh-interval", "0", "--arch-cache-fraction", "0.5"])
    seen = record_deltas(crit, monkeypatch)
    batches = utils.batches(task)
    first = run_epoch(task, model, crit, 1, batches)
    assert all(l["arch_fresh"] > 0 for l in first if l.get("arch_fresh") is not None)
    by_epoch = {}
    for epoch in (2, 16, 31):
        start = len(seen)
        logs = run_epoch(task, model, crit, epoch, batches[:2])
        assert task.arch_cache.mode == "reuse", f"epoch {epoch} refreshed with Tc = 0"
        for l, b in zip(logs, batches):
            assert l["arch_fresh"] == 0 and l["adv_fwd"] == 2, (epoch, l)
            assert l["arch_cached"] + l["arch_rebuilt"] == len(b["id"]), (epoch, l)
        by_epoch[epoch] = seen[start:]
    for a, b in zip(by_epoch[2], by_epoch[31]):  # the same generation, read back identically
        assert all(torch.equal(a[s][0], b[s][0]) for s in a), "epoch 31 reads other perturbations than epoch 2"


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_ema_zero_stores_the_fresh_perturbation(data_dir, tmp_path, monkeypatch, ema):
    """Second refresh (epoch 3, Tc = 2): alpha = 0 trains on (and stores) the fresh
    ascent result as is; alpha = 0.5 (control) on a blend with epoch 1's rows."""
    task, model, crit = build(data_dir, tmp_path, ["--arch-refresh-interval", "2", "--arch-ema", str(ema),
                                                   "--arch-cache-fraction", "1", "--arch-cache-dtype", "float32"])
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)
    run_epoch(task, model, crit, 2, batches[:1])
    fresh = []
    real_ascent = crit.ascent.run
    monkeypatch.setattr(crit.ascent, "run", lambda *a, **k: fresh.append(real_ascent(*a, **k)) or fresh[-1])
    seen = record_deltas(crit, monkeypatch)
    logs = run_epoch(task, model, crit, 3, batches[:1])
    assert task.arch_cache.mode == "refresh" and logs[0]["arch_fresh"] == len(batches[0]["id"])
    used = seen[-1]
    for side in ("source", "target"):
        diff = float((used[side][0] - fresh[-1][side]).abs().max())
        if ema == 0.0:
            # only the re-projection of a vector on the ball's surface may round (~1e-8)
            assert diff <= 1e-7, f"{side}: alpha = 0 trains on a blend (max diff {diff})"
        else:
            assert diff > 1e-3, f"{side}: alpha = 0.5 did not blend the old rows in (max diff {diff})"
