"""Every error of a damaged, missing or unwritable cache dir names the file or option
and gives advice that works: following it literally leads to a run that trains.

A damaged cache says "delete the cache dir and resume"; the resumed reuse epoch then
finds no generation and recomputes one from the checkpoint (a fresh ascent, logged and
counted), the following reuse epochs read it and the next scheduled refresh blends into
it (lifecycle.py: Recovery). A cache of another point of training is still refused.
Full disks and unwritable dirs fail at the write that hit them, naming the path and
--arch-cache-dir, leaving no temporary file. Rows rebuilt at finalisation are stored
inside the ball.
"""

import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile

import pytest

from fairseq_arch import cache_math
from fairseq_arch.cache import CacheCorruptError, CacheIOError, CacheMismatchError
from fairseq_arch.cache.files import DAMAGED
from fairseq_arch.cache.lifecycle import AHEAD, RECOMPUTE, check_epoch, live_mode, recovers

from . import utils

# refresh epochs 1, 4, 7, ...: epochs 2 and 3 reuse epoch 1's generation
FLAGS = ["--arch-cache-fraction", "0.5", "--arch-refresh-interval", "3", "--adv-steps", "1"]
LIFECYCLE = "fairseq_arch.cache.lifecycle"


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


def components(data_dir, save, cache_dir=None, extra=()):
    flags = [*FLAGS, *extra] + (["--arch-cache-dir", cache_dir] if cache_dir else [])
    _, task, model, crit = utils.build_components(data_dir, flags, save_dir=save)
    model.train()
    return task, model, crit


def train_epoch(task, model, crit, epoch):
    """begin_epoch, then every batch through the criterion: the counts of its logs."""
    task.begin_epoch(epoch, model)
    counts = {"arch_fresh": 0, "arch_cached": 0}
    for b in utils.batches(task):
        _, _, log = crit(model, b)
        for k in counts:
            counts[k] += int(log[k])
    return counts


def read_state(cache_dir):
    with open(os.path.join(cache_dir, "state.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def healthy_cache(data_dir, tmp_path_factory):
    """A cache dir after refresh epoch 1, finalised (gen-e0001 current). Tests copy it."""
    save = str(tmp_path_factory.mktemp("healthy"))
    task, model, crit = components(data_dir, save)
    train_epoch(task, model, crit, 1)
    task.begin_epoch(2, model)
    task.arch_cache.store.close_maps()
    return task.arch_cache.cache_dir


def copy_cache(healthy_cache, tmp_path):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(healthy_cache, cache_dir)
    return cache_dir


def _truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4)
        f.write(b"\x55\xaa\x55\xaa")


# (file, damage, what the error says about it)
DAMAGES = {
    "bin-truncated": ("gen-e0001/source.bin", _truncate_half, "has the wrong size"),
    "complete-deleted": ("gen-e0001/COMPLETE", os.remove, "is not a complete cache generation"),
    "state-corrupted": ("state.json", _truncate_half, "is not valid JSON"),
    "nbr-deleted": ("gen-e0001/source_nbr.npy", os.remove, "is missing"),
    "means-corrupted": ("gen-e0001/target_mean.npy", _flip_bytes, "is corrupted"),
    "layout-deleted": ("layout.json", os.remove, "is missing but the dir holds"),
}


def recover_and_check_schedule(data_dir, tmp_path, cache_dir, caplog):
    """A run resumed after epoch 1 on a deleted cache dir: epoch 2 recomputes the cache
    (fresh ascent), epoch 3 reads it, refresh epoch 4 blends into it."""
    caplog.set_level(logging.WARNING, logger=LIFECYCLE)
    task, model, crit = components(data_dir, str(tmp_path / "ckpt"), cache_dir)
    counts = train_epoch(task, model, crit, 2)
    cache = task.arch_cache
    assert cache.mode == "refresh" and cache.access.generation == "gen-e0002" and cache.access.base is None
    assert counts["arch_fresh"] > 0, counts  # the recovered epoch really ran the ascent
    assert re.search(r"holds no generation for reuse epoch 2 .*recomputing it", caplog.text), caplog.text
    state = read_state(cache_dir)
    assert state["in_progress"]["recovery"] is True and state["recoveries"] == 1, state
    counts = train_epoch(task, model, crit, 3)
    assert cache.mode == "reuse" and cache.access.generation == "gen-e0002", cache.mode
    assert counts["arch_fresh"] == 0 and counts["arch_cached"] > 0, counts
    assert read_state(cache_dir)["current"] == {"name": "gen-e0002", "epoch": 2, "recovery": True}
    task.begin_epoch(4, model)  # the scheduled refresh did not move
    assert cache.mode == "refresh" and cache.access.base == "gen-e0002"
    cache.store.close_maps()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_cache_advice_leads_to_a_run_that_trains(data_dir, healthy_cache, tmp_path, caplog, damage):
    fname, spoil, says = DAMAGES[damage]
    cache_dir = copy_cache(healthy_cache, tmp_path)
    spoil(os.path.join(cache_dir, fname))
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), cache_dir)
    with pytest.raises(CacheCorruptError) as err:
        task.begin_epoch(2, model)  # a run resumed after epoch 1
    msg = str(err.value)
    assert os.path.join(cache_dir, fname) in msg and says in msg, msg
    assert msg.endswith(DAMAGED) and "delete the cache dir and resume" in msg, msg
    shutil.rmtree(cache_dir)  # the advice, literally
    recover_and_check_schedule(data_dir, tmp_path, cache_dir, caplog)


def test_array_deleted_during_a_run_names_the_file(data_dir, tmp_path):
    """The generation's checksums are verified once per process; an array deleted later
    (here between two reuse epochs) is still a damaged cache naming the file, not a
    FileNotFoundError from numpy."""
    task, model, crit = components(data_dir, str(tmp_path / "ckpt"))
    train_epoch(task, model, crit, 1)
    task.begin_epoch(2, model)
    path = os.path.join(task.arch_cache.cache_dir, "gen-e0001", "source_nbr.npy")
    task.arch_cache.store.close_maps()
    os.remove(path)
    with pytest.raises(CacheCorruptError, match=re.escape(f"{path} is missing: {DAMAGED}")):
        task.begin_epoch(3, model)


def test_recovered_generation_is_refused_by_an_older_checkpoint(data_dir, tmp_path):
    """The recovery generation of epoch 2 is read by epoch 3 of any process, but a run
    resumed from before it (epoch 2 again) finds the cache ahead of its checkpoint."""
    save = str(tmp_path / "ckpt")
    task, model, crit = components(data_dir, save)
    task.begin_epoch(2, model)  # a new cache dir at a reuse epoch: recovery
    assert task.arch_cache.mode == "refresh"
    for b in utils.batches(task)[:2]:
        crit(model, b)
    task.begin_epoch(3, model)
    task.arch_cache.store.close_maps()
    task, model, _ = components(data_dir, save)
    with pytest.raises(CacheMismatchError, match="holds those of epoch 2: the cache is ahead"):
        task.begin_epoch(2, model)
    task, model, _ = components(data_dir, save)
    task.begin_epoch(3, model)  # resumed after epoch 2: reads the recovery generation
    assert task.arch_cache.mode == "reuse" and task.arch_cache.access.generation == "gen-e0002"
    task.arch_cache.store.close_maps()


def test_cache_of_another_point_of_training_is_refused_with_advice_that_works(data_dir, healthy_cache, tmp_path,
                                                                             caplog):
    """A dir whose generation cannot be this epoch's (epoch 6 reuses epoch 4's refresh, the
    dir holds epoch 1's) is refused, not recovered; deleting it, as the error says, works."""
    cache_dir = copy_cache(healthy_cache, tmp_path)
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), cache_dir)
    with pytest.raises(CacheMismatchError) as err:
        task.begin_epoch(6, model)
    msg = str(err.value)
    assert "epoch 6 reuses the perturbations of epoch 4" in msg and msg.endswith(RECOMPUTE), msg
    shutil.rmtree(cache_dir)
    caplog.set_level(logging.WARNING, logger=LIFECYCLE)
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), cache_dir)
    task.begin_epoch(6, model)
    assert task.arch_cache.mode == "refresh" and "reuse epoch 6" in caplog.text
    task.arch_cache.store.close_maps()


def test_cache_ahead_advice_a_new_cache_dir_works(data_dir, healthy_cache, tmp_path):
    """--arch-first-refresh-epoch 3 on a dir refreshed in epoch 1: the cache is ahead;
    "start a new cache dir" is followed by a run that trains."""
    cache_dir = copy_cache(healthy_cache, tmp_path)
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), cache_dir, ["--arch-first-refresh-epoch", "3"])
    with pytest.raises(CacheMismatchError, match=re.escape(AHEAD)):
        task.begin_epoch(2, model)
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), str(tmp_path / "new"),
                                ["--arch-first-refresh-epoch", "3"])
    task.begin_epoch(2, model)
    assert task.arch_cache.mode == "off"


# -- the resume rules, one by one (pure) --------------------------------------------


def gen(epoch, recovery=False):
    return dict({"name": f"gen-e{epoch:04d}", "epoch": epoch}, **({"recovery": True} if recovery else {}))


@pytest.mark.fast
@pytest.mark.parametrize("epoch, cur, refused", [
    (3, gen(1), None),  # reads the last scheduled refresh
    (3, gen(2, recovery=True), None),  # reads the recovery since then
    (6, gen(5, recovery=True), None),
    (3, gen(2), "does not belong to this checkpoint"),  # not of this schedule: another run's
    (6, gen(2, recovery=True), "does not belong to this checkpoint"),  # before the last scheduled refresh
    (6, gen(1), "does not belong to this checkpoint"),
    (3, gen(3, recovery=True), "the cache is ahead"),  # recomputed in this very epoch: an older checkpoint
    (2, gen(4), "the cache is ahead"),
    (3, None, "the cache is ahead"),  # only an unfinished generation of a later epoch
])
def test_check_epoch_of_a_reuse_epoch(epoch, cur, refused):
    interval, first = 3, 1
    assert cache_math.epoch_mode(epoch, interval, first) == "reuse"
    if refused is None:
        check_epoch("D", epoch, "reuse", cur, interval, first)
    else:
        with pytest.raises(CacheMismatchError, match=refused):
            check_epoch("D", epoch, "reuse", cur, interval, first)


@pytest.mark.fast
def test_which_epochs_recover():
    empty = {"current": None, "in_progress": None}
    assert recovers(2, "reuse", empty)
    assert not recovers(1, "refresh", empty) and not recovers(1, "off", empty)
    assert not recovers(2, "reuse", {"current": gen(1), "in_progress": None})
    ip = dict(gen(2), base=None, recovery=True)
    assert recovers(2, "reuse", {"current": None, "in_progress": ip})  # resumed inside the recovery
    assert not recovers(2, "reuse", {"current": None, "in_progress": dict(ip, recovery=False)})
    assert not recovers(2, "reuse", {"current": None, "in_progress": dict(gen(4), base=None)})  # ahead
    assert live_mode(2, "reuse", {"current": None, "in_progress": ip}) == "refresh"
    assert live_mode(3, "reuse", {"current": gen(2, True), "in_progress": None}) == "reuse"


# -- full disks and unwritable cache dirs -------------------------------------------


def no_temp_files(cache_dir):
    return [f for _, _, files in os.walk(cache_dir) for f in files if ".tmp" in f]


def test_full_disk_at_the_first_write_names_the_file(data_dir, tmp_path, monkeypatch):
    """A real ENOSPC reaches a write when its data is flushed to disk (here: the fsync of
    the first file written under a temporary name, as every cache file is)."""
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"))
    cache_dir = task.cache_dir
    real_fsync = os.fsync

    def full(fd):
        if ".tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(CacheIOError) as err:
            task.begin_epoch(1, model)
    msg = str(err.value)
    assert re.search(f"no space left on device while writing {re.escape(cache_dir)}/\\S+ \\(needs \\d+ bytes, "
                     "\\d+ free\\)", msg) and "--arch-cache-dir" in msg, msg
    assert no_temp_files(cache_dir) == []
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"))  # space freed: the rerun starts
    task.begin_epoch(1, model)
    assert task.arch_cache.mode == "refresh"
    task.arch_cache.store.close_maps()


@pytest.mark.parametrize("fname", ["cached_ids.npy", "state.json", "layout.json"])
def test_full_disk_at_each_first_file(data_dir, tmp_path, monkeypatch, fname):
    """FAIRSEQ_ARCH_ENOSPC (faults.py) fails the atomic write of one named file."""
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"))
    monkeypatch.setenv("FAIRSEQ_ARCH_ENOSPC", f"write@{fname}")
    with pytest.raises(CacheIOError, match=re.escape(f"while writing {os.path.join(task.cache_dir, fname)} (needs")):
        task.begin_epoch(1, model)
    assert no_temp_files(task.cache_dir) == []
    monkeypatch.delenv("FAIRSEQ_ARCH_ENOSPC")
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"))
    task.begin_epoch(1, model)
    assert task.arch_cache.mode == "refresh"
    task.arch_cache.store.close_maps()


def test_cache_dir_that_is_a_file_is_refused_naming_the_option(data_dir, tmp_path):
    path = str(tmp_path / "not-a-dir")
    with open(path, "w") as f:
        f.write("x")
    for bad in (path, os.path.join(path, "sub")):
        task, model, _ = components(data_dir, str(tmp_path / "ckpt"), bad)
        with pytest.raises(CacheIOError, match=f"--arch-cache-dir {re.escape(bad)} .*point --arch-cache-dir at"):
            task.begin_epoch(1, model)
    os.remove(path)  # the advice: move the file away
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), path)
    task.begin_epoch(1, model)
    assert task.arch_cache.mode == "refresh"
    task.arch_cache.store.close_maps()


def test_read_only_cache_dir_is_refused_naming_the_option(data_dir, tmp_path, monkeypatch):
    """Simulated (the tests run as root, who may write a chmod'ed dir): the write probe
    at start fails as on a read-only filesystem."""
    task, model, _ = components(data_dir, str(tmp_path / "ckpt"), str(tmp_path / "ro"))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(CacheIOError, match="--arch-cache-dir .*/ro cannot be created or written "
                                               "\\(Read-only file system\\): point --arch-cache-dir at"):
            task.begin_epoch(1, model)
    assert os.listdir(str(tmp_path / "ro")) == [], "a refused cache dir was written"


def test_read_only_mount_is_refused_naming_the_option(data_dir, tmp_path):
    """The same on a real read-only tmpfs, where this machine lets us mount one."""
    mnt = str(tmp_path / "ro-mnt")
    os.makedirs(mnt)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root and mount(8); the simulated test above covers this")
    res = utils.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", mnt], timeout=60, capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        task, model, _ = components(data_dir, str(tmp_path / "ckpt"), os.path.join(mnt, "cache"))
        with pytest.raises(CacheIOError, match="--arch-cache-dir .* cannot be created or written"):
            task.begin_epoch(1, model)
    finally:
        if utils.run(["umount", mnt], timeout=60, capture_output=True).returncode != 0:
            utils.run(["umount", "-l", mnt], timeout=60, capture_output=True)


# -- rows rebuilt at finalisation are stored inside the ball --------------------------


def test_rows_filled_at_finalisation_are_inside_the_ball(data_dir, tmp_path, caplog):
    """Half the batches of refresh epoch 1: the other half's cached rows are rebuilt from
    neighbours at finalisation (Eq. 3 as published: a neighbour's mean row on every
    token, which a long sentence makes up to ~8% larger than the ball here) and stored
    projected onto it, as a read would project them."""
    task, model, crit = components(data_dir, str(tmp_path / "ckpt"), extra=["--arch-cache-fraction", "1.0"])
    caplog.set_level(logging.WARNING, logger="fairseq_arch.cache.finalize")
    task.begin_epoch(1, model)
    seen = set()
    for b in utils.batches(task, max_tokens=300)[::2]:
        crit(model, b)
        seen |= set(b["id"].tolist())
    task.begin_epoch(2, model)
    assert "--required-batch-size-multiple" in caplog.text, caplog.text  # the likely cause, named
    store, name, sizer = task.arch_cache.store, task.arch_cache.access.generation, task.arch_cache.sizer
    filled = [p for p in range(store.num_cached) if int(store.cached_ids[p]) not in seen]
    assert store.generation_info(name)["filled"] == {s: len(filled) for s in store.sides}
    surface = 0
    for side in store.sides:
        sizes = sizer.sizes_of(store.perturbation_rows(name, side), store.offsets[side])[filled]
        assert sizes.max() <= sizer.eps * (1 + 2e-3), (side, sizes.max())  # float16 rounding
        surface += int((sizes >= sizer.eps * (1 - 2e-3)).sum())
    assert surface > 0, "no filled row needed the projection: the test lost its point"
    task.arch_cache.store.close_maps()


# -- through fairseq-train ---------------------------------------------------------------

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
TIMEOUT = 600


def cli_args(data_dir, save, epochs, extra=()):
    # refresh epochs 1 and 5: 2-4 reuse epoch 1's generation
    return ["fairseq-train", data_dir, *utils.ARCH_TASK, *utils.TINY_MODEL, "--arch-refresh-interval", "4",
            "--arch-cache-fraction", "0.3", "--adv-steps", "1", "--dropout", "0", "--optimizer", "adam",
            "--lr", "0.005", "--max-tokens", "600", "--max-epoch", str(epochs), "--save-dir", save, "--cpu",
            "--no-progress-bar", "--num-workers", "0", "--seed", "7", "--no-epoch-checkpoints", *extra]


def cli(argv, env=None, ok=True):
    res = utils.run(argv, env=env or ENV, capture_output=True, text=True, timeout=TIMEOUT)
    out = res.stdout + res.stderr
    if ok:
        assert res.returncode == 0, out[-4000:]
    else:
        assert res.returncode not in (0, -signal.SIGKILL), \
            f"expected a refusal, got rc {res.returncode}:\n{out[-3000:]}"
    return out


def epoch_summary(out, epoch, key):
    m = re.search(rf"epoch {epoch:03d} \|.* {key} ([\d.]+)", out)
    assert m, f"no {key} in the summary of epoch {epoch}:\n{out[-3000:]}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def cli_data(toy_data):
    return toy_data(200, 20)


@pytest.fixture(scope="module")
def two_epochs(cli_data, tmp_path_factory):
    """fairseq-train for epochs 1 (refresh) and 2 (reuse). Read-only: tests copy it."""
    save = str(tmp_path_factory.mktemp("two") / "s")
    cli(cli_args(cli_data, save, 2))
    return save


def test_cli_damaged_cache_then_delete_and_resume_trains(cli_data, two_epochs, tmp_path):
    save = str(tmp_path / "s")
    shutil.copytree(two_epochs, save)
    cache_dir = os.path.join(save, "arch_cache")
    _truncate_half(os.path.join(cache_dir, "gen-e0001", "source.bin"))
    out = cli(cli_args(cli_data, save, 5), ok=False)
    assert re.search(r"CacheCorruptError: \S+/gen-e0001/source.bin has the wrong size .*delete the cache dir and "
                     "resume", out), out[-3000:]
    shutil.rmtree(cache_dir)  # the advice, literally; then the same command again
    out = cli(cli_args(cli_data, save, 5))
    assert "holds no generation for reuse epoch 3" in out and "ARCH epoch 3: refresh" in out, out[-4000:]
    assert epoch_summary(out, 3, "arch_fresh") > 0  # recomputed: a fresh ascent
    assert epoch_summary(out, 4, "arch_fresh") == 0 and epoch_summary(out, 4, "arch_cached") > 0  # read
    assert epoch_summary(out, 5, "arch_fresh") > 0  # the scheduled refresh
    state = read_state(cache_dir)
    assert state["current"] == {"name": "gen-e0003", "epoch": 3, "recovery": True}, state
    assert state["in_progress"]["name"] == "gen-e0005" and state["in_progress"]["base"] == "gen-e0003", state
    assert state["recoveries"] == 1, state


def test_cli_full_disk_at_the_first_state_write(cli_data, tmp_path):
    save = str(tmp_path / "s")
    state = os.path.join(save, "arch_cache", "state.json")
    out = cli(cli_args(cli_data, save, 1), env=dict(ENV, FAIRSEQ_ARCH_ENOSPC="write@state.json"), ok=False)
    assert re.search(rf"CacheIOError: no space left on device while writing {re.escape(state)} \(needs \d+ bytes, "
                     r"\d+ free\).*--arch-cache-dir", out), out[-3000:]
    assert not os.path.exists(state + ".tmp")
    cli(cli_args(cli_data, save, 1))  # space freed: the same command trains


def test_cli_cache_dir_that_is_a_file(cli_data, tmp_path):
    path = str(tmp_path / "file")
    with open(path, "w") as f:
        f.write("x")
    out = cli(cli_args(cli_data, str(tmp_path / "s"), 1, ["--arch-cache-dir", path]), ok=False)
    assert f"CacheIOError: --arch-cache-dir {path} is a file, not a directory" in out, out[-3000:]
