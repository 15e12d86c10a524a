"""Issue 22: reuse-epoch reads prepared ahead of the step (fairseq_arch/cache/read_ahead.py).

A batch's cached rows and neighbour rebuilds are read on a worker thread while the
previous batch trains, keyed by the batch's ids: the same numbers as the synchronous read
for the same ids, a synchronous (counted) read for ids never prepared, the prefetch closed
at every epoch start, fairseq's iteration count unchanged, and fairseq-train resumed mid
reuse epoch (--update-freq 2) ending where the uninterrupted run ends, with or without
--arch-prefetch off.
"""

import re
import threading
import time

import numpy as np
import pytest
import torch
from fairseq.data import iterators

from fairseq_arch.cache.access import ReuseReader
from fairseq_arch.cache.read_ahead import LookAhead, ReadAhead, look_ahead_in

from . import utils
from .test_resume import args, max_diff, params, run
from .test_robustness import one_refresh_epoch


# --arch-prefetch auto is on with CUDA only: these CPU tests ask for it
ON = ["--arch-prefetch", "on"]


def _sides(b):
    return (("source", b["net_input"]["src_tokens"]), ("target", b["net_input"]["prev_output_tokens"]))


@pytest.fixture(scope="module")
def filled(small_toy, tmp_path_factory):
    """A cache after its refresh epoch, at the start of reuse epoch 2, half the sentences cached."""
    return one_refresh_epoch(small_toy, str(tmp_path_factory.mktemp("filled")),
                             ["--arch-cache-fraction", "0.5", "--arch-rebuild-norm", "neighbor", *ON])


def test_prefetched_rows_equal_the_synchronous_read(filled):
    task, model, crit, batches = filled
    access = task.arch_cache.access
    assert isinstance(access, ReuseReader) and access.ahead is not None  # on by default
    plain = task.arch_cache.open_reader()  # same generation, no prefetch: reads in the step
    assert plain.ahead is None
    hits = access.ahead.stats.hits
    for b in batches:
        task.arch_cache.prefetch(b["id"].numpy())
    for b in batches:
        for side, toks in _sides(b):
            m = toks.ne(1)
            got = access.read(b["id"], side, m, crit.project)
            want = plain.read(b["id"], side, m, crit.project)
            assert torch.equal(got[0], want[0]) and got[1:] == want[1:], side
    assert access.ahead.stats.hits - hits == 2 * len(batches)
    assert not access.ahead._pending  # every prepared batch was taken, both sides


def test_ids_never_prepared_are_read_synchronously_and_counted(filled):
    task, model, crit, batches = filled
    access = task.arch_cache.access
    plain = task.arch_cache.open_reader()
    b = batches[0]
    stats = access.ahead.stats
    misses, hits = stats.misses, stats.hits
    # the same sentences in another order are another batch: its prefetch must not be used
    access.prefetch(b["id"].flip(0).numpy())
    for side, toks in _sides(b):
        m = toks.ne(1)
        assert torch.equal(access.read(b["id"], side, m, crit.project)[0], plain.read(b["id"], side, m, crit.project)[0])
    assert (stats.misses - misses, stats.hits - hits) == (2, 0)


def test_a_failed_prefetch_falls_back_to_the_synchronous_read(filled, monkeypatch):
    task, model, crit, batches = filled
    access = task.arch_cache.access
    b = batches[1]
    real = access._host_reads
    monkeypatch.setattr(access, "_host_reads", lambda ids: (_ for _ in ()).throw(OSError("disk hiccup")))
    access.ahead._work = access._host_reads
    try:
        misses = access.ahead.stats.misses
        access.prefetch(b["id"].numpy())
        side, toks = _sides(b)[0]
        access.read(b["id"], side, toks.ne(1), crit.project)
        assert access.ahead.stats.misses == misses + 1
    finally:
        access.ahead._work = real


@pytest.mark.fast
def test_close_waits_for_the_running_read_and_cancels_the_rest():
    started, release, done = threading.Event(), threading.Event(), []

    def work(ids):
        started.set()
        release.wait(5)
        time.sleep(0.05)
        done.append(int(ids[0]))
        return {"source": None}

    ahead = ReadAhead(work)
    for i in range(4):
        ahead.submit(np.array([i, 10 + i], dtype=np.int64))
    assert started.wait(5)
    release.set()
    ahead.close()
    assert done == [0]  # the running read finished before close returned; the others never ran
    assert ahead.closed and not ahead._pending
    ahead.submit(np.array([7], dtype=np.int64))  # no-op once closed
    assert ahead.take(np.array([7], dtype=np.int64), "source") is None and ahead.stats.misses == 1


def test_an_epoch_start_closes_the_prefetch(small_toy, tmp_path):
    task, model, crit, batches = one_refresh_epoch(small_toy, str(tmp_path), ["--arch-cache-fraction", "0.5", *ON])
    reader = task.arch_cache.access
    for b in batches:
        task.arch_cache.prefetch(b["id"].numpy())
    task.begin_epoch(3, model)  # Tc 2: a refresh epoch (the generation of epoch 1 is closed)
    assert reader.ahead.closed and not reader.ahead._pending
    assert task.arch_cache.mode == "refresh"
    task.arch_cache.prefetch(batches[0]["id"].numpy())  # refresh epochs prepare nothing


def test_auto_prefetches_on_cuda_only(small_toy, tmp_path):
    task, model, crit, batches = one_refresh_epoch(small_toy, str(tmp_path), ["--arch-cache-fraction", "0.5"])
    assert task.prefetches is torch.cuda.is_available()  # the default, auto
    assert task.arch_cache.read_ahead is task.prefetches


def test_no_prefetch_option_turns_it_off(small_toy, tmp_path):
    task, model, crit, batches = one_refresh_epoch(
        small_toy, str(tmp_path), ["--arch-cache-fraction", "0.5", "--arch-prefetch", "off"])
    assert task.arch_cache.access.ahead is None and not task.arch_cache.read_ahead
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=1000, seed=1, epoch=2)
    assert not getattr(itr, "_arch_look_ahead", False)


@pytest.mark.fast
def test_look_ahead_hands_out_every_item_in_order_one_hook_ahead():
    seen = []
    itr = LookAhead([1, 2, 3], seen.append)
    assert next(itr) == 1 and seen == [1, 2]
    assert list(itr) == [2, 3] and seen == [1, 2, 3]

    def failing():
        yield 1
        raise ValueError("bad batch")

    itr = LookAhead(failing(), lambda x: None)
    assert next(itr) == 1  # the error of item 2 is raised when item 2 is asked for
    with pytest.raises(ValueError, match="bad batch"):
        next(itr)


class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return i


def _epoch_itr(batches):
    return iterators.EpochBatchIterator(dataset=_Items(), collate_fn=lambda s: {"id": torch.tensor(s)},
                                        batch_sampler=batches, num_workers=0)


@pytest.mark.fast
def test_fairseq_counts_the_batches_handed_out_not_the_one_looked_at():
    batches = [[i] for i in range(6)]
    epoch_itr = _epoch_itr(batches)
    hooked = []
    look_ahead_in(epoch_itr, lambda b: hooked.append(int(b["id"][0])))
    look_ahead_in(epoch_itr, lambda b: hooked.append(-1))  # idempotent: one lookahead only
    itr = iterators.GroupedIterator(epoch_itr.next_epoch_itr(shuffle=False), 2)
    next(itr)
    assert epoch_itr.iterations_in_epoch == 2 and hooked == [0, 1, 2]
    state = epoch_itr.state_dict()
    resumed = _epoch_itr(batches)
    look_ahead_in(resumed, lambda b: hooked.append(int(b["id"][0])))
    resumed.load_state_dict(state)
    assert [int(b["id"][0]) for b in resumed.next_epoch_itr(shuffle=False)] == [2, 3, 4, 5]


EPOCHS = 3  # Tc 2: refresh 1, reuse 2, refresh 3
UF = ["--update-freq", "2", "--save-interval-updates", "2", "--max-tokens", "300"]  # 8 batches an epoch


@pytest.fixture(scope="module")
def data_dir(toy_data):
    return toy_data(200, 20)


def test_resumed_mid_reuse_epoch_equals_the_uninterrupted_run(data_dir, tmp_path):
    on, off, killed = (str(tmp_path / n) for n in ("on", "off", "killed"))
    out = run(args(data_dir, on, EPOCHS, extra=[*UF, *ON]))
    assert "ARCH epoch 2 reads:" in out and " 0 synchronous" in out, out[-3000:]  # every read prepared ahead
    run(args(data_dir, off, EPOCHS, extra=[*UF, "--arch-prefetch", "off"]))
    assert max_diff(params(on), params(off)) == 0.0
    run(args(data_dir, killed, EPOCHS, extra=[*UF, *ON]), fault="reuse_batch@2:11")  # batch 6 of epoch 2, after the checkpoint at its update 2
    out = run(args(data_dir, killed, EPOCHS, extra=[*UF, *ON]))
    assert re.search(r"Loaded checkpoint \S+ \(epoch 2 @ \d+ updates\)", out), out[-3000:]  # mid reuse epoch
    assert max_diff(params(killed), params(on)) == 0.0
