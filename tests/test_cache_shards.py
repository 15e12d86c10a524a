"""Every rank writes the rows of a refresh epoch into shards of its own; only rank 0 writes a
generation's .bin files, merging the shards while the other ranks wait (several nodes writing
one memory-mapped file over NFS overwrite each other's rows: pages are written back whole).
Unit tests of the shard format and the merge, then two fairseq-train ranks stopped in the
middle of a refresh epoch (both ranks' shards on disk, the shared .bin untouched) and resumed:
the result is byte for byte the one of 1 rank x --update-freq 2."""

import logging
import os
import re

import numpy as np
import pytest
import torch

from fairseq_arch.cache import CacheCorruptError, PerturbationCacheStore
from fairseq_arch.cache import shards as cache_shards
from fairseq_arch.cache import store as cache_store

from .test_distributed import CACHE_FILES, cache_files, one_rank, params, run_ranks, train_args  # noqa: F401

# -- the store alone ---------------------------------------------------------------------


def make_store(cache_dir, rank=0, dtype="float16"):
    src = np.array([3, 5, 1, 4, 2, 6, 3, 2], dtype=np.int64)
    tgt = np.array([2, 4, 3, 1, 5, 2, 2, 3], dtype=np.int64)
    store = PerturbationCacheStore(cache_dir, src, tgt, {"source": 4, "target": 4}, 1.0, 1, dtype, 1, rank=rank)
    return store


def open_store(cache_dir, rank=0, dtype="float16"):
    store = make_store(cache_dir, rank, dtype)
    if rank == 0:
        store.create_or_check()
    store.open_layout()
    return store


def row(store, side, p, value):
    n = int(store.lengths[side][p])
    return np.full((n, store.dims[side]), value, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None] / 8


def bin_rows(store, name, side):
    mm = np.fromfile(os.path.join(store.gen_dir(name), f"{side}.bin"), dtype=store.dtype)
    mm = mm.reshape(-1, store.dims[side])
    off = store.offsets[side]
    return [mm[off[p]: off[p + 1]].astype(np.float32) for p in range(store.num_cached)]


def shards(store, name):
    return sorted(f for f in os.listdir(store.gen_dir(name)) if f.endswith(cache_shards.SHARD))


@pytest.mark.fast
def test_records_round_trip():
    rows = [np.arange(6, dtype=np.float32).reshape(3, 2), np.ones((1, 2), dtype=np.float32)]
    data, starts = cache_shards.encode_records([5, 2], rows, np.float16, written=True)
    rec = cache_shards.SHARD_RECORD.size
    assert len(data) == 2 * rec + (6 + 2) * 2 and list(starts) == [rec, 2 * rec + 12]
    assert data[starts[0]: starts[0] + 12] == rows[0].astype(np.float16).tobytes()


@pytest.mark.fast
def test_ranks_write_shards_and_rank0_merges_them(tmp_path):
    d = str(tmp_path / "cache")
    s0 = open_store(d, rank=0)
    s1 = open_store(d, rank=1)
    name = "gen-e0001"
    s0.create_generation(name, None)
    before = {side: bin_rows(s0, name, side) for side in s0.sides}
    want = {side: [r.copy() for r in before[side]] for side in s0.sides}
    for side in s0.sides:
        # rank 1 writes positions 0, 2, 4; rank 0 writes 1, 3 and then 3 again (the last wins)
        s1.write_rows(name, side, [0, 2, 4], [row(s1, side, p, p + 1) for p in (0, 2, 4)])
        s0.write_rows(name, side, [1, 3], [row(s0, side, p, p + 1) for p in (1, 3)])
        s0.write_rows(name, side, [3], [row(s0, side, 3, -7)])
        for p, v in ((0, 1), (2, 3), (4, 5), (1, 2), (3, -7)):
            want[side][p] = row(s0, side, p, v).astype(np.float16).astype(np.float32)
        # each process reads back what it wrote; nobody wrote the shared .bin
        np.testing.assert_array_equal(s0.read_rows(name, side, [3])[0], want[side][3])
        np.testing.assert_array_equal(s1.read_rows(name, side, [2])[0], want[side][2])
        np.testing.assert_array_equal(s1.read_rows(name, side, [3])[0], before[side][3])
        for p in range(s0.num_cached):
            np.testing.assert_array_equal(bin_rows(s0, name, side)[p], before[side][p])
    assert shards(s0, name) == ["source.r00000.shard", "source.r00001.shard",
                                "target.r00000.shard", "target.r00001.shard"]
    # an epoch start: every rank closes its shards and reports them, rank 0 merges
    reports = []
    for s in (s0, s1):
        s.close_maps()
        reports.append(s.take_shard_sizes())
    assert reports[1] == {f"{name}/{f}": os.path.getsize(os.path.join(s0.gen_dir(name), f))
                          for f in ("source.r00001.shard", "target.r00001.shard")}
    s0.expect_shards(reports)
    assert s0.merge_shards(name) == {"source": 6, "target": 6}
    assert shards(s0, name) == []
    for side in s0.sides:
        got = bin_rows(s0, name, side)
        for p in range(s0.num_cached):
            np.testing.assert_array_equal(got[p], want[side][p])
        assert s0.written_flags(name, side).tolist() == [p < 5 for p in range(s0.num_cached)]
    # again: nothing to merge, nothing changes
    assert s0.merge_shards(name) == {}
    for side in s0.sides:
        assert all(np.array_equal(a, b) for a, b in zip(bin_rows(s0, name, side), want[side]))


@pytest.mark.fast
def test_rows_rebuilt_at_finalisation_do_not_count_as_written(tmp_path):
    s = open_store(str(tmp_path / "cache"))
    s.create_generation("gen-e0001", None)
    s.write_rows("gen-e0001", "source", [0], [row(s, "source", 0, 1)])
    s.write_rows("gen-e0001", "source", [1], [row(s, "source", 1, 2)], mark_written=False)
    s.merge_shards("gen-e0001")
    assert s.written_flags("gen-e0001", "source")[:3].tolist() == [True, False, False]
    np.testing.assert_array_equal(bin_rows(s, "gen-e0001", "source")[1],
                                  row(s, "source", 1, 2).astype(np.float16).astype(np.float32))


@pytest.mark.fast
@pytest.mark.parametrize("damage", ["cut-header", "cut-row", "bit-flip"])
def test_a_record_cut_short_ends_the_shard(tmp_path, caplog, damage):
    """A write cut short (full disk, machine crash after the last fsync) leaves a damaged
    last record: the whole records before it are merged, the damaged one is not."""
    s = open_store(str(tmp_path / "cache"))
    name = "gen-e0001"
    s.create_generation(name, None)
    for p in range(3):
        s.write_rows(name, "source", [p], [row(s, "source", p, p + 1)])
    s.close_maps()
    path = os.path.join(s.gen_dir(name), "source.r00000.shard")
    size = os.path.getsize(path)
    last = cache_shards.SHARD_RECORD.size + int(s.lengths["source"][2]) * 4 * 2
    with open(path, "r+b") as f:
        if damage == "cut-header":
            f.truncate(size - last + 10)
        elif damage == "cut-row":
            f.truncate(size - 3)
        else:
            f.seek(size - 2)
            flipped = bytes(b ^ 0xFF for b in f.read(2))
            f.seek(size - 2)
            f.write(flipped)
    caplog.set_level(logging.WARNING, logger="fairseq_arch.cache.shards")
    assert s.merge_shards(name) == {"source": 2}
    assert "record 2 and the rest ignored" in caplog.text
    assert s.written_flags(name, "source")[:3].tolist() == [True, True, False]
    assert np.abs(bin_rows(s, name, "source")[2]).max() == 0


@pytest.mark.fast
def test_full_disk_while_appending_fails_clearly_and_keeps_whole_records(tmp_path, monkeypatch, caplog):
    """Shards grow during the epoch: a full disk fails there with the usual clear error (not
    a SIGBUS), and the merge keeps the records written before the one cut short."""
    import errno

    s = open_store(str(tmp_path / "cache"))
    name = "gen-e0001"
    s.create_generation(name, None)
    s.write_rows(name, "source", [0], [row(s, "source", 0, 1)])
    real = os.write

    def half_then_enospc(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", half_then_enospc)
        with pytest.raises(RuntimeError, match="no space left on device while writing cache rows to .*"
                                               "source.r00000.shard.*Nothing already in the cache was changed"):
            s.write_rows(name, "source", [1], [row(s, "source", 1, 2)])
    s.close_maps()
    caplog.set_level(logging.WARNING, logger="fairseq_arch.cache.shards")
    assert s.merge_shards(name) == {"source": 1}
    assert "record 1 and the rest ignored" in caplog.text
    assert s.written_flags(name, "source")[:2].tolist() == [True, False]


@pytest.mark.fast
def test_a_shard_another_rank_reported_must_be_seen_whole(tmp_path, monkeypatch):
    """Rank 0 does not merge a generation without a shard another rank says it wrote (a
    cache dir that is not shared, a filesystem that shows the file late): it waits, then
    stops with an error instead of finalising without those rows."""
    monkeypatch.setattr(cache_shards, "SHARD_WAIT_S", 1.0)
    d = str(tmp_path / "cache")
    s0 = open_store(d, rank=0)
    s0.create_generation("gen-e0001", None)
    s0.expect_shards([{}, {"gen-e0001/source.r00001.shard": 1000}])
    with pytest.raises(CacheCorruptError, match="a rank wrote 1000 bytes to it, but rank 0 sees no "
                                                            "such file.*shared by all nodes"):
        s0.merge_shards("gen-e0001")


@pytest.mark.fast
def test_flush_makes_the_shards_durable(tmp_path, monkeypatch):
    s = open_store(str(tmp_path / "cache"))
    s.create_generation("gen-e0001", None)
    s.write_rows("gen-e0001", "target", [2], [row(s, "target", 2, 1)])
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    s.flush("gen-e0001")
    assert s.shards.opened(s.gen_dir("gen-e0001"), "target").fd in synced
    s.close_maps()


def test_every_rank_flushes_its_cache_when_fairseq_saves_a_checkpoint(tmp_path):
    """fairseq calls task.state_dict() (the task's flush) on the writing rank only; the other
    ranks only pass through checkpoint_utils.save_checkpoint, which now flushes their shards
    first (before: nothing on a rank that does not write the checkpoint)."""
    from types import SimpleNamespace

    import fairseq_arch  # noqa: F401  (installs the wrapper)
    from fairseq import checkpoint_utils

    flushed = []
    cache = SimpleNamespace(rank=1, access=SimpleNamespace(generation="gen-e0003"),
                            flush=lambda: flushed.append(1) or True)
    trainer = SimpleNamespace(task=SimpleNamespace(arch_cache=cache), should_save_checkpoint_on_current_rank=False,
                              always_call_state_dict_during_save_checkpoint=False,
                              consolidate_optimizer=lambda: None, data_parallel_rank=1)
    cfg = SimpleNamespace(no_save=False, save_dir=str(tmp_path))
    assert checkpoint_utils.save_checkpoint(cfg, trainer, None, None) is None  # fairseq: not this rank's to write
    assert flushed == [1]
    checkpoint_utils.save_checkpoint(SimpleNamespace(no_save=True), trainer, None, None)
    assert flushed == [1], "--no-save: nothing is saved, nothing to flush for"
    # fairseq keeps the best score on the function, through the module's name
    checkpoint_utils.save_checkpoint.best = 1.5
    assert getattr(checkpoint_utils.save_checkpoint, "best") == 1.5
    del checkpoint_utils.save_checkpoint.best


# -- two fairseq-train ranks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(toy_data):
    return toy_data(300, 20)  # as tests/test_distributed.py (its one_rank reference)


def updates_per_epoch(out):
    m = re.search(r"end of epoch 1 \(average epoch stats below\).*?num_updates (\d+)", out, re.S)
    assert m, out[-3000:]
    return int(m.group(1))


def test_two_ranks_write_shards_and_match_one_rank(data_dir, one_rank, tmp_path):  # noqa: F811
    one, out_one = one_rank
    per_epoch = updates_per_epoch(out_one)
    assert per_epoch >= 4, per_epoch
    two = str(tmp_path / "two")
    # stop in the middle of the refresh epoch 3 (fairseq saves checkpoint_last.pt there)
    outs = run_ranks(train_args(data_dir, two, ["--max-update", str(2 * per_epoch + per_epoch // 2)]), 2)
    gen = os.path.join(two, "arch_cache", "gen-e0003")
    base = os.path.join(two, "arch_cache", "gen-e0001")
    with open(os.path.join(two, "arch_cache", "state.json")) as f:
        assert '"epoch": 3' in f.read()
    found = sorted(f for f in os.listdir(gen) if f.endswith(cache_shards.SHARD))
    assert found == [f"{s}.r0000{r}.shard" for s in ("source", "target") for r in (0, 1)], found
    # the wrapper runs in fairseq-train (fairseq logs on rank 0 only; that rank 1 flushes too is
    # test_every_rank_flushes_its_cache_when_fairseq_saves_a_checkpoint)
    assert "ARCH cache: rank 0's rows of gen-e0003 made durable for the checkpoint" in outs[0], outs[0][-3000:]
    assert all(os.path.getsize(os.path.join(gen, f)) > 0 for f in found), "a rank wrote no rows"
    for side in ("source", "target"):
        # no rank wrote into the shared file: it is still the copy of the base generation
        with open(os.path.join(gen, f"{side}.bin"), "rb") as a, open(os.path.join(base, f"{side}.bin"), "rb") as b:
            assert a.read() == b.read(), f"{side}.bin of the generation being written was written to"
        assert not np.fromfile(os.path.join(gen, f"{side}.written"), dtype=np.uint8).any()
    # resumed with 2 ranks: rank 0 merges the interrupted run's shards, training goes on
    outs = run_ranks(train_args(data_dir, two), 2)
    assert "epoch 004" in outs[0], outs[0][-3000:]
    assert not [f for f in os.listdir(gen) if f.endswith((cache_shards.SHARD, cache_store.WRITTEN))]
    p1, p2 = params(one), params(two)
    assert all(torch.equal(p1[k], p2[k]) for k in p1), "parameters differ from 1 rank x update-freq 2"
    c1, c2 = cache_files(one), cache_files(two)
    assert sorted(c1) == sorted(c2) == CACHE_FILES
    for f in CACHE_FILES:
        assert c1[f] == c2[f], f"{f} differs from 1 rank x update-freq 2"
