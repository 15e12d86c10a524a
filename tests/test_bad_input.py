"""Bad input and faults (issue 20): no silent wrong result, no bare traceback.

Each bad input is refused at start naming the option or file and what to do, or, where
training can go on, logged: non-finite options, non-finite / unreadable
``--arch-neighbor-embeddings`` files, a degenerate neighbour table, sentences fairseq's
batching leaves out, empty corpora, an ``--arch-first-refresh-epoch`` no epoch reaches,
a clamped ``--adv-probe-sentences``, and the mode of scripts/export_checkpoint.py's output.
Pure rules first, then the command line (fairseq-train in a subprocess, as a user runs it).
"""

import dataclasses
import logging
import os
import stat
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import torch

from fairseq_arch import validation
from fairseq_arch.cache import load_embedding_matrix
from fairseq_arch.criterions.adversarial_label_smoothed_cross_entropy import (
    AdversarialLabelSmoothedCrossEntropyCriterionConfig as CritConfig,
)
from fairseq_arch.neighbors import DEGENERATE_SHARE, degenerate_neighbours, neighbour_concentration
from fairseq_arch.probe import probed_sentences
from fairseq_arch.tasks.arch_translation import ArchTranslationConfig, cache_never_used

from . import utils

EXPORT = os.path.join(utils.REPO, "scripts", "export_checkpoint.py")


def fairseq_train(data_dir, save_dir, extra=(), timeout=300):
    """fairseq-train as a user runs it (tiny model, CPU): (exit status, stdout + stderr)."""
    res = utils.run([
        "fairseq-train", data_dir, "--save-dir", str(save_dir), "--cpu", "--max-tokens", "1000",
        "--optimizer", "adam", "--lr", "1e-3", "--num-workers", "0", "--no-progress-bar", "--log-format", "simple",
        "--no-epoch-checkpoints", *utils.ARCH_TASK, *utils.TINY_MODEL, *extra], capture_output=True, text=True,
        timeout=timeout)
    return res.returncode, res.stdout + res.stderr


# -- non-finite options: every float field, found from the dataclasses ----------------------


@pytest.mark.fast
def test_every_float_option_is_checked():
    task_floats = validation.float_fields(ArchTranslationConfig)
    crit_floats = validation.float_fields(CritConfig)
    assert {"arch_ema", "arch_cache_fraction"} <= set(task_floats), task_floats
    assert {"adv_eps", "adv_lambda", "adv_step_size", "adv_init_scale", "label_smoothing"} <= set(crit_floats)
    # ints, strings and choices are not floats
    assert "arch_neighbors" not in task_floats and "adv_steps" not in crit_floats and "adv_norm" not in crit_floats

    @dataclasses.dataclass
    class Later:  # an option added later is covered without a list to update
        new_weight: Optional[float] = None
        count: int = 1

    assert validation.float_fields(Later) == ["new_weight"]
    validation.refuse_non_finite(Later(new_weight=2.0), Later)
    validation.refuse_non_finite(Later(), Later)  # None = unset
    with pytest.raises(ValueError, match="--new-weight nan: this option needs a finite number"):
        validation.refuse_non_finite(Later(new_weight=float("nan")), Later)


@pytest.mark.parametrize("flag,value", [("--adv-eps", "inf"), ("--adv-lambda", "inf"), ("--adv-step-size", "nan"),
                                        ("--adv-init-scale", "inf"), ("--arch-cache-fraction", "nan")])
def test_non_finite_options_refused_in_process(small_toy, tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"{flag} {value}: this option needs a finite number"):
        utils.build_components(small_toy, [flag, value], save_dir=str(tmp_path))


@pytest.mark.parametrize("flag,value", [("--adv-eps", "nan"), ("--adv-lambda", "inf"), ("--arch-ema", "nan")])
def test_non_finite_options_refused_by_fairseq_train(small_toy, tmp_path, flag, value):
    rc, out = fairseq_train(small_toy, tmp_path, ["--max-epoch", "1", flag, value])
    assert rc != 0 and f"{flag} {value}: this option needs a finite number" in out, out[-3000:]
    assert "FloatingPointError" not in out and "| epoch 001 |" not in out, out[-3000:]


# -- --arch-neighbor-embeddings: non-finite values, files of another format -----------------------


def _dict_size(small_toy):
    from fairseq.data import Dictionary

    return len(Dictionary.load(os.path.join(small_toy, "dict.src.txt")))  # joined: the same for both sides


@pytest.mark.fast
def test_non_finite_embedding_file_names_the_side_and_count(tmp_path):
    w = np.ones((10, 4), dtype=np.float32)
    w[3, 1], w[7, :] = np.nan, np.inf
    np.save(tmp_path / "w.npy", w)
    with pytest.raises(ValueError, match=r"--arch-neighbor-embeddings .*w\.npy: the source matrix has 5 non-finite"):
        load_embedding_matrix(str(tmp_path / "w.npy"))
    good = torch.ones(10, 4)
    bad = good.clone()
    bad[0, 0] = float("-inf")
    torch.save({"source": good, "target": bad}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="the target matrix has 1 non-finite .* of 40"):
        load_embedding_matrix(str(tmp_path / "w.pt"))


@pytest.mark.fast
@pytest.mark.parametrize("name", ["w.txt", "w.npy", "w.pt"])
def test_text_file_as_embeddings_names_the_option_and_formats(tmp_path, name):
    path = tmp_path / name
    path.write_text("0.1 0.2 0.3\n0.4 0.5 0.6\n")
    with pytest.raises(ValueError) as e:
        load_embedding_matrix(str(path))
    msg = str(e.value)
    assert msg.startswith(f"--arch-neighbor-embeddings {path}: ") and "accepted formats" in msg, msg
    assert ".npy" in msg and "fairseq checkpoint" in msg, msg


@pytest.mark.fast
def test_object_npy_is_not_unpickled(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="--arch-neighbor-embeddings .*accepted formats"):
        load_embedding_matrix(str(tmp_path / "o.npy"))


def test_nan_embedding_file_refused_by_fairseq_train(small_toy, tmp_path):
    """An all-NaN matrix used to give every uncached sentence the same neighbour, silently."""
    np.save(tmp_path / "nan.npy", np.full((_dict_size(small_toy), 8), np.nan, dtype=np.float32))
    rc, out = fairseq_train(small_toy, tmp_path / "ckpt", ["--max-epoch", "1", "--arch-neighbor-embeddings",
                                                           str(tmp_path / "nan.npy")])
    want = f"--arch-neighbor-embeddings {tmp_path / 'nan.npy'}: the source matrix has {_dict_size(small_toy) * 8} "
    assert rc != 0 and want in out, out[-3000:]


def test_text_embedding_file_refused_by_fairseq_train(small_toy, tmp_path):
    (tmp_path / "w.txt").write_text("not a matrix\n")
    rc, out = fairseq_train(small_toy, tmp_path / "ckpt", ["--max-epoch", "1", "--arch-neighbor-embeddings",
                                                           str(tmp_path / "w.txt")])
    assert rc != 0 and f"--arch-neighbor-embeddings {tmp_path / 'w.txt'}: cannot be read" in out, out[-3000:]
    assert "accepted formats" in out, out[-3000:]


# -- the neighbour table's degeneracy ---------------------------------------------------------


@pytest.mark.fast
def test_degeneracy_rule():
    rng = np.random.default_rng(0)
    spread = rng.integers(0, 150, size=1350)  # a search that spreads its queries
    assert neighbour_concentration(spread)[0] < 0.05 and degenerate_neighbours(spread, 150) is None
    same = np.full(1350, 17)
    msg = degenerate_neighbours(same, 150, "source")
    assert msg and "(source) is degenerate" in msg and "cached sentence 17" in msg and "100%" in msg, msg
    assert "--arch-neighbor-embeddings" in msg
    # just past the threshold, and just below it
    half = np.concatenate([np.full(701, 3), rng.integers(4, 150, size=649)])
    assert degenerate_neighbours(half, 150) is not None
    below = np.concatenate([np.full(int(1350 * DEGENERATE_SHARE), 3), rng.integers(4, 150, size=675)])
    assert degenerate_neighbours(below, 150) is None
    # too few cached sentences (a shared neighbour is unavoidable) or queries: no verdict
    assert degenerate_neighbours(np.zeros(1000, dtype=int), 2) is None
    assert degenerate_neighbours(np.zeros(10, dtype=int), 150) is None


def test_degeneracy_rule_on_real_data(tmp_path):
    """The search on a real Multi30k slice with the model's initial embeddings spreads far
    below the threshold (the measurement behind DEGENERATE_SHARE; a trained model's
    embeddings spread as much: fairseq_arch/neighbors.py)."""
    from fairseq.data import Dictionary, data_utils

    from fairseq_arch import cache_math
    from fairseq_arch.neighbors import brute_force_knn

    tok = utils.require_shared("multi30k", "tok")
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test_2016_flickr")):
        for lang in ("de", "en"):
            with open(os.path.join(tok, f"{name}.lc.norm.tok.{lang}")) as f:
                lines = [next(f) for _ in range(3000 if split == "train" else 10)]
            (raw / f"{split}.{lang}").write_text("".join(lines))
    utils.preprocess(str(raw), str(tmp_path / "bin"), src="de", tgt="en")
    d = Dictionary.load(str(tmp_path / "bin" / "dict.de.txt"))
    ds = data_utils.load_indexed_dataset(str(tmp_path / "bin" / "train.de-en.de"), d)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(len(d), 512, generator=g) * 512 ** -0.5  # fairseq's embedding init
    cached = np.sort(np.random.default_rng(1).choice(len(ds), 300, replace=False))  # p = 0.1
    uncached = np.setdiff1d(np.arange(len(ds)), cached)

    def vectors(ids):
        toks = [np.asarray(ds[int(i)], dtype=np.int64) for i in ids]
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in toks])])
        return cache_math.sentence_vectors(np.concatenate(toks), offsets, w, ignore=(d.pad(), d.eos(), d.bos()))

    _, idx = brute_force_knn(vectors(uncached), vectors(cached), 1)
    share, _, distinct = neighbour_concentration(idx[:, 0].numpy())
    assert share < DEGENERATE_SHARE / 4 and distinct > 100, (share, distinct)
    assert degenerate_neighbours(idx[:, 0].numpy(), len(cached)) is None


def _neighbour_warnings(small_toy, tmp_path, caplog, w_path):
    task, model, crit = utils.build_for_training(small_toy, tmp_path, [
        "--arch-cache-fraction", "0.1", "--arch-refresh-interval", "2", "--arch-neighbor-embeddings", w_path])
    with caplog.at_level(logging.WARNING, logger="fairseq_arch"):
        task.begin_epoch(1, model)
        model.train()
        for b in utils.batches(task):
            crit(model, b)
        task.begin_epoch(2, model)  # finalises the refresh: neighbours searched here
    return [r.getMessage() for r in caplog.records if "neighbour table" in r.getMessage()]


def test_constant_embeddings_warn_of_a_degenerate_table(small_toy, tmp_path, caplog):
    """Constant rows: every sentence vector ties, everyone gets the same neighbour."""
    np.save(tmp_path / "const.npy", np.ones((_dict_size(small_toy), 8), dtype=np.float32))
    warned = _neighbour_warnings(small_toy, tmp_path / "run", caplog, str(tmp_path / "const.npy"))
    assert len(warned) == 2 and {"(source)", "(target)"} <= {w.split()[3] for w in warned}, warned
    assert "100% of the 108 uncached sentences" in warned[0], warned


def test_a_working_search_does_not_warn(small_toy, tmp_path, caplog):
    w = np.random.default_rng(0).standard_normal((_dict_size(small_toy), 16)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    assert _neighbour_warnings(small_toy, tmp_path / "run", caplog, str(tmp_path / "w.npy")) == []


# -- sentences fairseq's batching leaves out --------------------------------------------------


@pytest.mark.fast
def test_left_out_count():
    assert validation.left_out_of_batches(10, [[0, 1, 2], [3, 4]]) == 5
    assert validation.left_out_of_batches(10, [[0, 1, 2], [3, 4]], size_filtered=2) == 3
    assert validation.left_out_of_batches(5, [[0, 1, 2], [3, 4]]) == 0
    assert validation.left_out_message("train", 0, 5, 8) is None
    msg = validation.left_out_message("train", 4, 300, 8)
    assert msg.startswith("4 of 300 sentences of 'train' are in no batch") and "--required-batch-size-multiple 1" in msg


def _trained_ids(task, multiple):
    """The training sentences an epoch of fairseq's batches holds (fairseq-train's options)."""
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=1000, max_positions=(1024, 1024),
                                  required_batch_size_multiple=multiple, seed=1, epoch=1,
                                  disable_iterator_cache=True)
    return {int(i) for b in itr.next_epoch_itr(shuffle=True) for i in b["id"]}


def test_left_out_sentences_are_logged(toy_data, tmp_path):
    data = toy_data(300, 10)
    _, task, _, _ = utils.build_components(data, save_dir=str(tmp_path / "build"))
    task.load_dataset("train")
    left = 300 - len(_trained_ids(task, 8))  # measured: what an epoch trains
    assert left > 0 and len(_trained_ids(task, 1)) == 300
    rc, out = fairseq_train(data, tmp_path / "a", ["--max-update", "1"])
    assert rc == 0, out[-3000:]
    assert f"{left} of 300 sentences of 'train' are in no batch" in out, out[-3000:]
    assert "not a multiple of --required-batch-size-multiple 8" in out
    rc, out = fairseq_train(data, tmp_path / "b", ["--max-update", "1", "--required-batch-size-multiple", "1"])
    assert rc == 0 and "are in no batch" not in out, out[-3000:]


def test_one_sentence_corpus_is_refused_naming_the_option(toy_data, tmp_path):
    """Its one batch of 1 is not a multiple of 8: fairseq said 'The dataset is empty'."""
    data = toy_data(1, 10)
    rc, out = fairseq_train(data, tmp_path, ["--max-epoch", "1"])
    assert rc != 0 and "none of the 1 sentences of 'train' is in a batch" in out, out[-3000:]
    assert "--required-batch-size-multiple 1" in out
    rc, out = fairseq_train(data, tmp_path / "b", ["--max-epoch", "1", "--required-batch-size-multiple", "1",
                                                   "--adv-method", "none"])
    assert rc == 0, out[-3000:]


# -- an empty corpus ---------------------------------------------------------------------------------


def test_empty_training_corpus_is_refused_naming_the_file(tmp_path):
    raw = tmp_path / "raw"
    utils.toy_corpus.write_corpus(str(raw), 5, 5, 5)
    for ext in ("src", "tgt"):
        (raw / f"train.{ext}").write_text("")
    utils.preprocess(str(raw), str(tmp_path / "bin"))
    rc, out = fairseq_train(str(tmp_path / "bin"), tmp_path / "ckpt", ["--max-epoch", "1"])
    empty = tmp_path / "bin" / "train.src-tgt.src.bin"
    assert rc != 0 and f"{empty} is empty (0 bytes): split 'train' has no sentences" in out, out[-3000:]
    assert "cannot mmap an empty file" not in out


# -- --arch-first-refresh-epoch beyond --max-epoch ------------------------------------------------------


@pytest.mark.fast
def test_cache_never_used_rule():
    from types import SimpleNamespace

    from fairseq_arch.methods import method_class

    arch, none = method_class("arch"), method_class("none")
    cfg = SimpleNamespace(arch_first_refresh_epoch=5, max_epoch=2)
    assert "--arch-first-refresh-epoch 5 is beyond --max-epoch 2" in cache_never_used(arch, cfg)
    assert "plain label-smoothed cross-entropy" in cache_never_used(arch, cfg)
    assert cache_never_used(none, cfg) is None  # no cache: nothing to say
    assert cache_never_used(arch, SimpleNamespace(arch_first_refresh_epoch=2, max_epoch=2)) is None
    assert cache_never_used(arch, SimpleNamespace(arch_first_refresh_epoch=5, max_epoch=0)) is None  # no limit


def test_first_refresh_beyond_max_epoch_warns(small_toy, tmp_path):
    rc, out = fairseq_train(small_toy, tmp_path, ["--max-epoch", "1", "--arch-first-refresh-epoch", "3"])
    assert rc == 0, out[-3000:]
    assert "--arch-first-refresh-epoch 3 is beyond --max-epoch 1: --adv-method arch never runs" in out, out[-3000:]


# -- --adv-probe-sentences larger than the training set ----------------------------------------------


@pytest.mark.fast
def test_probed_sentences_wording():
    assert probed_sentences(24, 24) == "24 sentences"
    assert probed_sentences(120, 100000) == ("120 sentences: --adv-probe-sentences 100000 clamped to the "
                                             "training set's 120")


def test_probe_logs_the_sentences_it_probes(small_toy, tmp_path, caplog):
    task, model, crit = utils.build_for_training(small_toy, tmp_path, [
        "--arch-refresh-interval", "2", "--arch-cache-fraction", "0.5", "--adv-probe-sentences", "100000"])
    task.begin_epoch(1, model)
    model.train()
    for b in utils.batches(task):
        crit(model, b)
    with caplog.at_level(logging.INFO, logger="fairseq_arch.probe"):
        task.begin_epoch(2, model)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ARCH probe epoch 1")]
    n = len(task.dataset("train"))
    assert len(lines) == 1 and f"({n} sentences: --adv-probe-sentences 100000 clamped" in lines[0], lines
    assert "100000 sentences" not in lines[0]


# -- scripts/export_checkpoint.py: the output's mode ---------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_export_honours_the_umask(tmp_path, umask, mode):
    state = {"cfg": {"task": {"_name": "arch_translation"},
                     "criterion": {"_name": "adversarial_label_smoothed_cross_entropy"}},
             "model": {"w": torch.zeros(2)}}
    torch.save(state, tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    res = subprocess.run([sys.executable, EXPORT, str(tmp_path / "in.pt"), str(out)], capture_output=True, text=True,
                         preexec_fn=lambda: os.umask(umask))
    assert res.returncode == 0, res.stderr[-3000:]
    assert stat.S_IMODE(os.stat(out).st_mode) == mode, oct(os.stat(out).st_mode)
