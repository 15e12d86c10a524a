"""Cached rows that no batch of a refresh epoch wrote (sentences filtered out of training
by max positions, batches of a resumed epoch re-batched by another --max-tokens, skipped
batches) must not reach a reuse epoch as zeros (first refresh) or as the previous
generation's values (stale): finalisation detects them, rebuilds them from their nearest
written neighbours like uncached sentences, and logs how many."""

import json
import logging
import os
import re

import numpy as np
import pytest
import torch

from fairseq_arch.cache import store as cache_store

from . import utils

LOGGER = "fairseq_arch.cache.finalize"


def filled_counts(caplog):
    """{side: n} from the finalisation warnings."""
    out = {}
    for r in caplog.records:
        msg = r.getMessage()
        m = re.match(r"ARCH cache: (\d+) of \d+ cached (\w+) rows got no fresh perturbation", msg)
        if r.name == LOGGER and m:
            out[m.group(2)] = out.get(m.group(2), 0) + int(m.group(1))
    return out


def rows(store, name, side):
    return {p: r.copy() for p, r in enumerate(store.read_rows(name, side, range(store.num_cached)))}


def test_unwritten_rows_are_rebuilt_at_finalisation(small_toy, tmp_path, caplog):
    """Refresh epochs 1 and 3 (Tc = 2) each see only half of the batches: epoch 1 leaves
    the other half's rows at zero, epoch 3 leaves them at epoch 1's values."""
    _, task, model, criterion = utils.build_components(
        small_toy, ["--arch-refresh-interval", "2", "--arch-cache-fraction", "0.5", "--adv-steps", "1",
                    # Eq. 3's own size, so a filled row is exactly a neighbour's mean row (the
                    # rescaled sizes are tested in test_arch_options.py)
                    "--arch-rebuild-norm", "paper"],
        save_dir=str(tmp_path))
    batches = utils.batches(task, max_tokens=300)
    assert len(batches) >= 4, len(batches)
    halves = [batches[::2], batches[1::2]]
    model.train()
    caplog.set_level(logging.INFO, logger=LOGGER)
    for epoch, half in ((1, halves[0]), (3, halves[1])):
        task.begin_epoch(epoch, model)
        cache = task.arch_cache
        store, gen = cache.store, cache.access.generation
        before = {s: rows(store, gen, s) for s in store.sides}  # zeros, then epoch 1's rows
        seen = np.concatenate([b["id"].numpy() for b in half])
        for b in half:
            criterion(model, b)
        written = set(store.pos_of[seen][store.pos_of[seen] >= 0].tolist())
        missing = sorted(set(range(store.num_cached)) - written)
        assert written and missing, "the test needs written and unwritten cached rows"
        after_batches = {s: rows(store, gen, s) for s in store.sides}
        caplog.clear()
        task.begin_epoch(epoch + 1, model)  # a reuse epoch: finalises the refresh
        assert filled_counts(caplog) == {s: len(missing) for s in store.sides}, caplog.text
        with open(os.path.join(store.gen_dir(gen), "COMPLETE")) as f:
            assert json.load(f)["filled"] == {s: len(missing) for s in store.sides}
        assert not [f for f in os.listdir(store.gen_dir(gen)) if f.endswith(cache_store.WRITTEN)], \
            "the write flags must go once the generation is complete"
        for side in store.sides:
            final = rows(store, gen, side)
            means = store.load_array(gen, side, "means")
            for p in written:  # what the batches wrote is kept as is
                np.testing.assert_array_equal(final[p], after_batches[side][p])
            for p in missing:
                # a neighbour rebuild: one vector on every token, neither zero nor the
                # previous value; the mean of written rows' means
                assert np.abs(final[p]).max() > 0, f"{side} row {p} left at zero"
                assert not np.array_equal(final[p], before[side][p]), f"{side} row {p} left stale"
                np.testing.assert_allclose(final[p], np.broadcast_to(final[p][0], final[p].shape))
                assert any(np.allclose(final[p][0], means[q], atol=1e-3) for q in written), \
                    f"{side} row {p} is not a written neighbour's mean (K = 1)"
            # uncached sentences take their neighbours among written rows only
            nbr = store.load_array(gen, side, "neighbors")
            used = set(np.asarray(nbr[store.pos_of < 0]).reshape(-1).tolist())
            assert used and used <= written, sorted(used - written)
        # the reuse epoch trains every sentence of the unseen half on a non-zero delta
        for b in halves[1 - (epoch == 3)]:
            mask = b["net_input"]["src_tokens"].ne(task.src_dict.pad())
            delta, _, _ = task.arch_cache.access.read(b["id"].tolist(), "source", mask, criterion.project)
            norms = delta.flatten(1).norm(dim=1)
            assert (norms > 0).all(), norms


def test_sentences_filtered_out_of_training_get_rebuilt_rows(small_toy, tmp_path, caplog):
    """--max-source-positions drops the longest sentences from training (fairseq filters
    training batches silently but for a warning): with every sentence cached (p = 1), the
    dropped ones would keep zero rows that the reuse epoch reads."""
    save = str(tmp_path / "ckpt")
    max_pos = 12
    flags = ["--max-source-positions", str(max_pos), "--max-target-positions", "1024"]
    caplog.set_level(logging.INFO, logger=LOGGER)
    utils.train(small_toy, save, [
        *utils.ARCH_TASK, *utils.TINY_MODEL, "--max-epoch", "2", "--arch-refresh-interval", "2",
        "--arch-cache-fraction", "1", "--adv-steps", "1", "--no-save", "--seed", "3",
        "--skip-invalid-size-inputs-valid-test", *flags,
    ])
    # the training batches as fairseq-train makes them (same filter, same batching)
    from fairseq import utils as fairseq_utils

    _, task, model, _ = utils.build_components(small_toy, flags, save_dir=str(tmp_path / "unused"))
    ds = task.dataset("train")
    itr = task.get_batch_iterator(
        dataset=ds, max_tokens=1000, required_batch_size_multiple=8, ignore_invalid_inputs=True,
        max_positions=fairseq_utils.resolve_max_positions(task.max_positions(), model.max_positions()))
    trained = set(np.concatenate(itr.frozen_batches).tolist())
    dropped = np.nonzero(np.asarray(ds.src_sizes) > max_pos)[0]
    assert 0 < len(dropped) < len(ds) // 2, f"{len(dropped)} of {len(ds)} dropped"
    assert not trained & set(dropped.tolist())
    # every sentence not trained on in epoch 1 is counted: the dropped ones, and those
    # fairseq's batch_by_size loses with --required-batch-size-multiple 8 (5 here)
    unwritten = len(ds) - len(trained)
    assert filled_counts(caplog) == {"source": unwritten, "target": unwritten}, caplog.text
    gen = os.path.join(save, "arch_cache", "gen-e0001")
    with open(os.path.join(gen, "COMPLETE")) as f:
        assert json.load(f)["filled"] == {"source": unwritten, "target": unwritten}
    for side in ("source", "target"):
        means = np.load(os.path.join(gen, f"{side}_mean.npy"))  # p = 1: row i is sentence i
        norms = np.linalg.norm(means, axis=1)
        assert (norms[dropped] > 0).all(), f"{side}: dropped sentences kept zero rows"
        assert (norms > 0).all()
