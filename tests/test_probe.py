"""The mechanism probe (fairseq_arch/probe.py, python -m benchmarks probe,
--adv-probe-sentences): after a short ARCH training, the probe runs on the
checkpoint and its cache; a fresh ascent beats a random direction of the same
norm; norms are what they claim; and the probe changes neither the random states
nor the parameters (nor their gradients, nor train/eval flags)."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from . import utils

EPS = 0.1


@pytest.fixture(scope="module")
def trained(small_toy, tmp_path_factory, request):
    """2 epochs of ARCH (Tc=2: epoch 1 refreshes, epoch 2 reuses) with the per-epoch
    probe on; returns (data, save dir, the probe's log lines)."""
    save = str(tmp_path_factory.mktemp("probe_run") / "ckpt")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("fairseq_arch.probe")
    handler, level = Keep(level=logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        utils.train(small_toy, save, [*utils.ARCH_TASK, *utils.TINY_MODEL, "--max-epoch", "2",
                                      "--arch-refresh-interval", "2", "--adv-probe-sentences", "24",
                                      "--dropout", "0.1"])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return small_toy, save, [r for r in records if r.startswith("ARCH probe")]


def test_training_logs_one_probe_line_per_epoch_start(trained):
    _, _, lines = trained
    assert len(lines) == 1, lines  # at the start of epoch 2 (epoch 1: nothing trained yet)
    line = lines[0]
    assert line.startswith("ARCH probe epoch 1 ")
    for key in ("kl_fresh=", "kl_cached=", "kl_rebuilt_paper=", "kl_random_paper=", "ratios to fresh",
                "norms: fresh=", "rebuilt[paper]="):
        assert key in line, line
    assert "nan" not in line.split("source:")[1].split(";")[0].replace("cached=nan", ""), line


def test_probe_on_the_checkpoint(trained, tmp_path):
    from benchmarks import probe as bench_probe

    data, save, _ = trained
    res = bench_probe.run(os.path.join(save, "checkpoint_last.pt"), data, sentences=64)
    assert res["generation"] == "gen-e0001" and "paper" in res["rebuild_modes"]
    for side in ("source", "target"):
        r = res["sides"][side]
        assert r["fresh"]["sentences"] == 64
        assert r["cached"]["sentences"] + r["fresh_uncached"]["sentences"] == 64
        assert r["cached"]["sentences"] > 0 and r["fresh_uncached"]["sentences"] > 0
        # the ascent ends on the ball (sentence-level l2, radius eps) ...
        assert r["fresh"]["norm"] <= EPS + 1e-5 and r["fresh"]["norm"] > 0.9 * EPS
        assert r["cached"]["norm"] <= EPS + 1e-3  # float16 rows, re-projected
        for mode in res["rebuild_modes"]:
            # ... random directions have exactly the norms they are compared with
            assert r[f"random[{mode}]"]["norm"] == pytest.approx(r[f"rebuilt[{mode}]"]["norm"], rel=1e-4)
            assert r[f"rebuilt[{mode}]"]["norm"] <= EPS + 1e-5
        if "eps" in res["rebuild_modes"]:
            assert r["rebuilt[eps]"]["norm"] == pytest.approx(EPS, rel=1e-3)
        assert r["random_fresh"]["norm"] == pytest.approx(r["fresh"]["norm"], rel=1e-4)
        # ascent beats a random direction of the same norm
        assert r["fresh"]["kl"] > 0
        assert r["fresh"]["kl"] >= r["random_fresh"]["kl"], r
        assert r["random_fresh"]["kl_ratio"] <= 1.0
        # the experimental rebuilds (benchmarks only) are sized to eps like rebuilt[eps]
        for name in ("token-nbr", "word-table"):
            assert r[f"rebuilt[{name}]"]["sentences"] == r["fresh_uncached"]["sentences"]
            assert r[f"rebuilt[{name}]"]["norm"] == pytest.approx(EPS, rel=1e-3)
    # the report: markdown + json
    out = tmp_path / "out"
    from benchmarks import common

    common.write_report(str(out), "probe", res, bench_probe.markdown(res))
    assert json.load(open(out / "probe.json"))["sides"]["source"]["fresh"]["sentences"] == 64
    assert "| source | fresh |" in (out / "probe.md").read_text()


def test_probe_changes_no_rng_state_parameters_or_modes(trained):
    from benchmarks import probe as bench_probe
    from fairseq_arch.probe import probe_ids, probe_model

    data, save, _ = trained
    _, task, model, crit, cache = bench_probe.load(os.path.join(save, "checkpoint_last.pt"), data)
    model.train()  # as in training: the probe must put it back
    model.decoder.eval()  # and keep a mixed state as it was
    flags = [m.training for m in model.modules()]
    params = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(123)
    np.random.seed(5)
    rng, nrng = torch.get_rng_state(), np.random.get_state()
    sides = list(crit.sides)
    res = probe_model(task, model, crit, probe_ids(len(task.dataset("train")), 20, 0), cache=cache)
    assert res["sides"]["source"]["fresh"]["sentences"] == 20
    assert torch.equal(torch.get_rng_state(), rng)
    after = np.random.get_state()
    assert after[0] == nrng[0] and np.array_equal(after[1], nrng[1]) and after[2:] == nrng[2:]
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert crit.sides == sides
    # the same ids give the same numbers (fixed seeds, eval mode)
    again = probe_model(task, model, crit, probe_ids(len(task.dataset("train")), 20, 0), cache=cache)
    assert again["sides"] == res["sides"]


def test_probe_measures_what_the_code_recipe_trains_on(small_toy, tmp_path):
    """--arch-recipe code: the probe's fresh delta is the code's ascent (norm eps = 0.3 over the
    padded sentence, so at most that on the real tokens), and what a reuse epoch reads is the
    cached displacement, at most S x eta = 2e-4 in norm, on cached and rebuilt sentences alike."""
    from benchmarks import probe as bench_probe

    save = str(tmp_path / "ckpt")
    utils.train(small_toy, save, [*utils.ARCH_TASK, *utils.TINY_MODEL, "--max-epoch", "2", "--arch-recipe", "code",
                                  "--arch-cache-dtype", "float32", "--arch-refresh-interval", "3", "--dropout", "0.1"])
    res = bench_probe.run(os.path.join(save, "checkpoint_last.pt"), small_toy, sentences=48)
    for side in ("source", "target"):
        r = res["sides"][side]
        assert {"fresh", "cached", "rebuilt[code]", "random[code]"} <= set(r), sorted(r)
        assert not any(k.startswith("rebuilt[paper") for k in r), sorted(r)
        assert 0.05 < r["fresh"]["norm"] <= 0.3 + 1e-5, r["fresh"]
        assert 0 < r["cached"]["norm"] <= 2e-4 + 1e-7 and 0 < r["rebuilt[code]"]["norm"] <= 2e-4 + 1e-7, r
        assert r["random[code]"]["norm"] == pytest.approx(r["rebuilt[code]"]["norm"], rel=1e-4)
        assert r["rebuilt[code]"]["kl"] < 1e-3 * r["fresh"]["kl"], "a delta of 1/1500 eps moved the model"


@pytest.mark.fast
def test_token_aligned_rows_take_the_same_word_else_the_nearest_embedding():
    from benchmarks.experimental_rebuilds import token_aligned_rows

    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [-1.0, 0.0]])
    nbr_tokens = np.array([0, 1, 0])
    nbr_rows = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=np.float32)
    rows = token_aligned_rows(np.array([0, 2, 3, 1]), nbr_tokens, nbr_rows, emb)
    # word 0 occurs twice in the neighbour: the mean of its rows; word 2 ~ word 0 (first
    # occurrence's row); word 3 ~ word 1; word 1 is there
    np.testing.assert_allclose(rows, [[2.0, 2.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])


@pytest.mark.fast
def test_word_table_is_the_mean_row_of_each_word():
    from benchmarks.experimental_rebuilds import word_table

    t = word_table([np.array([4, 5]), np.array([5, 6, 4])],
                   [np.array([[1.0], [2.0]]), np.array([[4.0], [8.0], [3.0]])])
    assert set(t) == {4, 5, 6}
    np.testing.assert_allclose([t[4][0], t[5][0], t[6][0]], [2.0, 3.0, 8.0])
    with pytest.raises(AssertionError, match="2 tokens but 1 rows"):
        word_table([np.array([1, 2])], [np.array([[1.0]])])
