"""--arch-rebuild-norm, --arch-neighbor-search and --arch-first-refresh-epoch: the pure
math against hand computations, then each option through the criterion and the cache
(epochs driven as in test_options.py), then an exact resume with per-epoch neighbour
searches (a fairseq-train killed mid-epoch, as in test_resume.py)."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fairseq_arch import cache_math as C
from fairseq_arch.cache import CacheMismatchError
from fairseq_arch.injection import unwrap_model
from fairseq_arch.neighbors import brute_force_knn
from fairseq_arch.tasks.arch_translation import validate_arch_config

from . import utils

EPS = 0.1


# -- pure math ----------------------------------------------------------------------------


@pytest.mark.fast
def test_schedule_with_a_first_refresh_epoch():
    assert [e for e in range(1, 12) if C.is_refresh_epoch(e, 3, first=4)] == [4, 7, 10]
    assert [e for e in range(1, 30) if C.is_refresh_epoch(e, 0, first=5)] == [5]  # Tc = 0: only E
    assert [C.epoch_mode(e, 3, 4) for e in range(1, 9)] == ["off"] * 3 + ["refresh", "reuse", "reuse", "refresh", "reuse"]
    assert [C.last_refresh_epoch(e, 3, 4) for e in (1, 3, 4, 6, 7, 9)] == [None, None, 4, 4, 7, 7]
    assert C.last_refresh_epoch(99, 0, 5) == 5
    # first = 1 is the paper's schedule
    assert all(C.is_refresh_epoch(e, 15) == C.is_refresh_epoch(e, 15, 1) for e in range(1, 50))


def _ragged(seed=0, lengths=(3, 1, 4, 2, 5), dim=6):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return rng.standard_normal((offsets[-1], dim)).astype(np.float16), offsets


@pytest.mark.fast
@pytest.mark.parametrize("norm,gran", [("l2", "sentence"), ("l2", "word"), ("linf", "sentence"), ("linf", "word")])
def test_row_norms_by_hand(norm, gran):
    flat, offsets = _ragged()
    want = []
    for i in range(len(offsets) - 1):
        r = flat[offsets[i]:offsets[i + 1]].astype(np.float64)
        if gran == "sentence":
            want.append(np.sqrt((r ** 2).sum()) if norm == "l2" else np.abs(r).max())
        else:
            want.append(np.mean([np.sqrt((t ** 2).sum()) if norm == "l2" else np.abs(t).max() for t in r]))
    for chunk in (1, 3, 1 << 20):
        assert np.allclose(C.row_norms(flat, offsets, norm, gran, chunk_rows=chunk), want, rtol=1e-5)
    # the same measure as perturbation.project's ball, for a whole sentence ball
    if gran == "sentence":
        from fairseq_arch.perturbation import ball_norms

        r = torch.from_numpy(flat[offsets[2]:offsets[3]].astype(np.float32))[None]
        assert float(ball_norms(r, torch.ones(1, r.size(1), dtype=torch.bool), norm, gran)) == pytest.approx(want[2], rel=1e-5)


@pytest.mark.fast
def test_rebuild_rescaled_to_targets_by_hand():
    means = torch.tensor([[[3.0, 0.0], [1.0, 0.0]],     # mean (2, 0)
                          [[0.0, 1.0], [0.0, -1.0]],    # mean (0, 0): no direction
                          [[-1.0, 2.0], [1.0, 2.0]]])   # mean (0, 2)
    lengths = [4, 2, 1]
    # paper: the mean row as it is
    paper = C.rebuild_from_neighbors(means, lengths)
    assert torch.equal(paper[0], torch.tensor([[2.0, 0.0]] * 4))
    target = torch.tensor([0.5, 0.3, 0.2])
    rows = C.rebuild_from_neighbors(means, lengths, target, "l2", "sentence")
    # sentence l2 of (2, 0) on 4 tokens is sqrt(4) * 2 = 4: scale 0.5 / 4
    assert torch.allclose(rows[0], torch.tensor([[0.25, 0.0]] * 4))
    assert torch.equal(rows[1], torch.zeros(2, 2)) and torch.isfinite(rows[1]).all()  # zero row: no NaN
    assert torch.allclose(rows[2], torch.tensor([[0.0, 0.2]]))
    # word l2: every token gets norm = target
    rows = C.rebuild_from_neighbors(means, lengths, target, "l2", "word")
    assert torch.allclose(rows[0], torch.tensor([[0.5, 0.0]] * 4))
    # linf: the largest coordinate = target, whatever the granularity
    for gran in ("sentence", "word"):
        rows = C.rebuild_from_neighbors(torch.tensor([[[4.0, -2.0]]]), [3], torch.tensor([0.1]), "linf", gran)
        assert torch.allclose(rows[0], torch.tensor([[0.1, -0.05]] * 3))
    # targets per mode
    nn = torch.tensor([[0.1, 0.05], [0.02, 0.04]])
    assert C.rebuild_targets("paper", nn, EPS) is None
    assert torch.allclose(C.rebuild_targets("neighbor", nn, EPS), torch.tensor([0.075, 0.03]))
    assert torch.allclose(C.rebuild_targets("eps", nn, EPS), torch.tensor([EPS, EPS]))
    with pytest.raises(AssertionError):
        C.rebuild_targets("bogus", nn, EPS)


@pytest.mark.fast
def test_neighbor_changes_ignores_order_and_cached_rows():
    old = np.array([[-1, -1], [1, 2], [3, 4], [5, 6]])
    new = np.array([[-1, -1], [2, 1], [3, 7], [5, 6]])
    assert C.neighbor_changes(old, new) == 1
    assert C.neighbor_changes(None, new) == 0


@pytest.mark.fast
@pytest.mark.parametrize("field,value,flag", [
    ("arch_first_refresh_epoch", 0, "--arch-first-refresh-epoch"),
    ("arch_rebuild_norm", "median", "--arch-rebuild-norm"),
    ("arch_neighbor_search", "batch", "--arch-neighbor-search"),
])
def test_bad_values_are_refused_naming_the_option(field, value, flag):
    cfg = SimpleNamespace(arch_cache_fraction=0.1, arch_neighbors=1, arch_ema=0.01, arch_refresh_interval=15,
                          arch_neighbor_embeddings="model", arch_first_refresh_epoch=1, arch_rebuild_norm="paper",
                          arch_neighbor_search="refresh", arch_recipe="text", arch_cache_dtype="float16")
    validate_arch_config(cfg)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=flag):
        validate_arch_config(cfg)


# -- through the criterion and the cache -----------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


build = utils.build_for_training
record_deltas = utils.record_deltas


def run_epoch(task, model, crit, epoch, batches):
    task.begin_epoch(epoch, model)
    model.train()
    return [crit(model, b)[2] for b in batches]


def rebuilt_sentence_norms(data_dir, tmp_path, monkeypatch, mode, extra=()):
    """(measured, expected) sentence sizes of the rebuilt source and target deltas the
    criterion trains on in the reuse epoch after one refresh; expected by hand from the
    cached rows of each sentence's neighbours."""
    task, model, crit = build(data_dir, tmp_path, ["--arch-refresh-interval", "2", "--arch-cache-fraction", "0.3",
                                                   "--arch-neighbors", "2", "--arch-rebuild-norm", mode, *extra])
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)
    seen = record_deltas(crit, monkeypatch)
    logs = run_epoch(task, model, crit, 2, batches)
    cache, store = task.arch_cache, task.arch_cache.store
    norm, gran = crit.space.norm, crit.space.granularity

    def size(rows):  # rows: n x C, the ball's measure
        return float(C.row_norms(rows, np.array([0, len(rows)]), norm, gran)[0])

    got, want = [], []
    assert sum(l["arch_rebuilt"] for l in logs) > 0
    for b, d in zip(batches, seen):
        toks = {"source": b["net_input"]["src_tokens"], "target": b["net_input"]["prev_output_tokens"]}
        for side in ("source", "target"):
            mask = toks[side].ne(1)
            for j, i in enumerate(b["id"].tolist()):
                if store.pos_of[i] >= 0:
                    continue
                rows = d[side][j][mask[j]].numpy()
                got.append(size(rows))
                nbr = np.asarray(cache.access.neighbors[side][i])
                cached = store.read_rows(cache.access.generation, side, nbr)
                if mode == "eps":
                    want.append(EPS)
                elif mode == "neighbor":
                    want.append(min(EPS, np.mean([size(r.astype(np.float32)) for r in cached])))
                else:  # Eq. 3 then the projection
                    vec = np.mean([r.astype(np.float32).mean(0) for r in cached], axis=0)
                    want.append(min(EPS, size(np.repeat(vec[None], len(rows), 0))))
    return np.array(got), np.array(want)


@pytest.mark.parametrize("mode", ["paper", "neighbor", "eps"])
def test_rebuilt_sentences_have_the_size_of_the_mode(data_dir, tmp_path, monkeypatch, mode):
    got, want = rebuilt_sentence_norms(data_dir, tmp_path, monkeypatch, mode)
    assert len(got) > 50
    assert np.allclose(got, want, rtol=2e-3, atol=1e-6), (mode, got[:5], want[:5])
    print(f"--arch-rebuild-norm {mode}: mean rebuilt sentence l2 norm {got.mean():.4f} (eps {EPS})")
    if mode == "paper":  # the issue: far inside the ball
        assert got.mean() < 0.9 * EPS


@pytest.mark.parametrize("extra", [["--adv-granularity", "word"], ["--adv-norm", "linf"]])
def test_rebuild_norm_in_the_balls_own_measure(data_dir, tmp_path, monkeypatch, extra):
    for mode in ("eps", "neighbor"):
        got, want = rebuilt_sentence_norms(data_dir, tmp_path / mode, monkeypatch, mode, extra)
        assert len(got) > 50 and np.allclose(got, want, rtol=2e-3, atol=1e-6), (extra, mode, got[:5], want[:5])


def test_cached_sentence_sizes_are_stored_and_checksummed(data_dir, tmp_path):
    task, model, crit = build(data_dir, tmp_path, ["--arch-refresh-interval", "2", "--arch-cache-fraction", "0.3",
                                                   "--arch-rebuild-norm", "neighbor"])
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)
    task.begin_epoch(2, model)
    store, gen = task.arch_cache.store, task.arch_cache.access.generation
    info = store.generation_info(gen)
    assert info["norm_measure"] == "l2/sentence"
    for side in ("source", "target"):
        assert f"{side}_norm.npy" in info["crc32"]
        stored = np.asarray(store.load_array(gen, side, "sizes"))
        rows = store.read_rows(gen, side, np.arange(store.num_cached))
        assert np.allclose(stored, [np.linalg.norm(r.astype(np.float32)) for r in rows], rtol=1e-5)
        assert np.allclose(np.asarray(task.arch_cache.access.sizes[side]), stored)


# -- --arch-first-refresh-epoch ----------------------------------------------------------------


def test_epochs_before_the_first_refresh_are_plain_label_smoothing(data_dir, tmp_path, monkeypatch):
    task, model, crit = build(data_dir, tmp_path, ["--arch-first-refresh-epoch", "3", "--arch-refresh-interval", "2",
                                                   "--arch-cache-fraction", "0.3"])
    seen = record_deltas(crit, monkeypatch)
    batches = utils.batches(task)
    cache_dir = os.path.join(str(tmp_path), "arch_cache")
    for epoch in (1, 2):
        logs = run_epoch(task, model, crit, epoch, batches)
        assert task.arch_cache.mode == "off"
        assert all(l["adv_fwd"] == 1 and l["adv_bwd"] == 1 for l in logs), logs[0]
        assert all("adv_loss" not in l and l.get("arch_fresh", 0) == 0 for l in logs)
        assert not seen, "a perturbed forward before the first refresh epoch"
        assert not [e for e in os.listdir(cache_dir) if e.startswith("gen-")], os.listdir(cache_dir)
    logs = run_epoch(task, model, crit, 3, batches)
    assert task.arch_cache.mode == "refresh" and sum(l["arch_fresh"] for l in logs) == len(task.dataset("train"))
    assert all(l["adv_fwd"] == 2 + crit.ascent.steps for l in logs)
    logs = run_epoch(task, model, crit, 4, batches)
    assert task.arch_cache.mode == "reuse" and task.arch_cache.access.generation == "gen-e0003"
    assert all(l["adv_fwd"] == 2 and l["arch_cached"] + l["arch_rebuilt"] == len(b["id"]) for l, b in zip(logs, batches))
    assert run_epoch(task, model, crit, 5, batches) and task.arch_cache.mode == "refresh"
    # a run resumed in an "off" epoch with this cache is refused, naming the option
    task2, model2, _ = build(data_dir, tmp_path, ["--arch-first-refresh-epoch", "3", "--arch-refresh-interval", "2",
                                                  "--arch-cache-fraction", "0.3"])
    with pytest.raises(CacheMismatchError, match="--arch-first-refresh-epoch"):
        task2.begin_epoch(2, model2)


# -- --arch-neighbor-search epoch ------------------------------------------------------------


def _perturb_embeddings(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for emb in (unwrap_model(model).encoder.embed_tokens, unwrap_model(model).decoder.embed_tokens):
            emb.weight.add_(torch.randn(emb.weight.shape, generator=g) * emb.weight.std())


def test_neighbors_searched_again_each_reuse_epoch(data_dir, tmp_path, caplog):
    extra = ["--arch-refresh-interval", "0", "--arch-cache-fraction", "0.3", "--arch-neighbor-search", "epoch"]
    task, model, crit = build(data_dir, tmp_path, extra)
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)
    run_epoch(task, model, crit, 2, batches)  # first reuse epoch: the generation's table
    cache, store = task.arch_cache, task.arch_cache.store
    gen_tables = {s: np.array(store.load_array(cache.access.generation, s, "neighbors")) for s in store.sides}
    assert all(np.array_equal(cache.access.neighbors[s], gen_tables[s]) for s in store.sides)
    _perturb_embeddings(model, 0)  # as training would move them
    with caplog.at_level("INFO", logger="fairseq_arch.cache"):
        run_epoch(task, model, crit, 3, batches)
    w = unwrap_model(model).encoder.embed_tokens.weight
    uncached = np.nonzero(store.pos_of < 0)[0]
    _, ref = brute_force_knn(cache.search.sentence_vectors("source", uncached, w), cache.search.sentence_vectors("source", store.cached_ids, w), 1)
    assert np.array_equal(np.asarray(cache.access.neighbors["source"])[uncached, 0], ref[:, 0].numpy())
    changed = C.neighbor_changes(gen_tables["source"], np.asarray(cache.access.neighbors["source"]))
    assert changed > 0, "the embeddings changed but no neighbour did"
    msg = [r.getMessage() for r in caplog.records if "searched again" in r.getMessage()]
    assert msg and f"source {changed} of {len(uncached)}" in msg[0], msg
    # the generation is immutable; the table is in neighbors/e0003
    assert all(np.array_equal(store.load_array(cache.access.generation, s, "neighbors"), gen_tables[s]) for s in store.sides)
    table_dir = os.path.join(str(tmp_path), "arch_cache", "neighbors", "e0003")
    assert json.load(open(os.path.join(table_dir, "INFO.json")))["changed"]["source"] == changed
    epoch3 = {s: np.array(cache.access.neighbors[s]) for s in store.sides}
    # a process resumed mid epoch 3 (later parameters) reads the epoch start's table
    _perturb_embeddings(model, 1)
    task2, _, _ = build(data_dir, tmp_path, extra)
    task2.begin_epoch(3, model)
    assert all(np.array_equal(task2.arch_cache.access.neighbors[s], epoch3[s]) for s in store.sides)
    # epoch 4 searches again; only its table is kept
    task2.begin_epoch(4, model)
    assert os.listdir(os.path.dirname(table_dir)) == ["e0004"]
    assert not all(np.array_equal(task2.arch_cache.access.neighbors[s], epoch3[s]) for s in store.sides)


def test_default_neighbor_search_keeps_the_refresh_table(data_dir, tmp_path):
    task, model, crit = build(data_dir, tmp_path, ["--arch-refresh-interval", "0", "--arch-cache-fraction", "0.3"])
    batches = utils.batches(task)
    run_epoch(task, model, crit, 1, batches)
    task.begin_epoch(2, model)
    _perturb_embeddings(model, 0)
    task.begin_epoch(3, model)
    cache = task.arch_cache
    assert all(np.array_equal(cache.access.neighbors[s], cache.store.load_array(cache.access.generation, s, "neighbors"))
               for s in cache.store.sides)
    assert not os.path.exists(os.path.join(str(tmp_path), "arch_cache", "neighbors"))


# -- exact resume with per-epoch searches (fairseq-train, killed mid-epoch) -------------------------


def test_resume_mid_reuse_epoch_uses_the_epoch_start_neighbours(toy_data, tmp_path):
    from . import test_resume as R

    data_dir = toy_data(200, 20)
    epochs = 4  # refresh in 1 only (Tc = 0); epoch 2 reads the generation's table, 3 and 4 search again

    def args(save, extra=()):
        return R.args(data_dir, save, epochs, extra=["--arch-refresh-interval", "0", "--arch-neighbor-search", "epoch",
                                                     "--arch-rebuild-norm", "neighbor", *extra])

    ref = str(tmp_path / "ref")
    out = R.run(args(ref))
    fracs = re.findall(r"epoch 00(\d) \|.*?arch_nbr_changed (\d+) \| arch_nbr_changed_frac (\S+)", out)
    print("neighbours changed per epoch (epoch, count, fraction):", fracs)
    assert [f[0] for f in fracs] == ["2", "3", "4"] and int(fracs[1][1]) > 0, fracs
    save = str(tmp_path / "s")
    extra = ["--save-interval-updates", "2"]
    R.run(args(save, extra), fault="reuse_batch@3:5")  # after a mid-epoch checkpoint of epoch 3
    out = R.run(args(save, extra))
    assert "neighbours of epoch 3 from" in out, "the resumed run searched the neighbours of epoch 3 again"
    diff = R.max_diff(R.params(save), R.params(ref))
    print(f"resumed mid epoch 3: max |param diff| vs uninterrupted = {diff:.3g}")
    assert diff == 0.0
    nb = lambda s: {f: open(os.path.join(s, "arch_cache", "neighbors", "e0004", f), "rb").read()  # noqa: E731
                    for f in ("source_nbr.npy", "target_nbr.npy")}
    assert nb(save) == nb(ref)


# -- scripts/recipes/train.py --neighbor-checkpoint ------------------------------------------------


@pytest.mark.fast
def test_recipe_neighbor_checkpoint_flag(tmp_path):
    import subprocess
    import sys

    script = os.path.join(utils.REPO, "scripts", "recipes", "train.py")
    ckpt = tmp_path / "checkpoint_best.pt"
    ckpt.write_bytes(b"")

    def print_args(*a):
        res = subprocess.run([sys.executable, script, "iwslt14", "--print-args", *a], capture_output=True, text=True,
                             env=dict(os.environ, ARCH_NUM_GPUS="0"))
        return res.returncode, res.stdout, res.stderr

    rc, plain, _ = print_args()
    rc2, with_ckpt, _ = print_args("--neighbor-checkpoint", str(ckpt))
    assert rc == rc2 == 0
    plain, with_ckpt = json.loads(plain), json.loads(with_ckpt)
    # the defaults are untouched; the flag appends one override (the last repeated flag wins)
    assert with_ckpt == plain + ["--arch-neighbor-embeddings", str(ckpt)]
    rc, _, err = print_args("--neighbor-checkpoint", str(tmp_path / "missing.pt"))
    assert rc == 2 and "--neighbor-checkpoint" in err
    assert "--method none" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
