"""Bad input never loses data, and low precision never poisons model or cache:
full disk (simulated ENOSPC; also a real, tiny tmpfs where one can be mounted), damaged
state/layout/id files, non-finite regularizer or ascent, half-precision models (the
cache stays float16, the KL is computed in float32)."""

import errno
import json
import os
import re
import shutil
import uuid

import numpy as np
import pytest
import torch

from fairseq_arch.cache import CacheCorruptError, CacheMismatchError
from fairseq_arch.perturbation import Teacher

from . import utils


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


def one_refresh_epoch(data_dir, save_dir, extra=()):
    _, task, model, crit = utils.build_components(
        data_dir, ["--arch-cache-fraction", "1.0", "--arch-refresh-interval", "2", *extra], save_dir=save_dir)
    batches = utils.batches(task)
    task.begin_epoch(1, model)
    model.train()
    for b in batches:
        crit(model, b)
    task.begin_epoch(2, model)
    return task, model, crit, batches


def _generation_files(gen_dir):
    return {f: open(os.path.join(gen_dir, f), "rb").read() for f in sorted(os.listdir(gen_dir))}


def _enospc_after_half(real):
    """A stand-in for an allocation call that fills the disk half-way, like a real one
    that runs out of space: the partly written file must be cleaned up, not left behind."""
    def fill_half_then_fail(fd, offset, length):
        real(fd, offset, length // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def copy_half_then_fail(src, dst, *a, **k):
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read()[: os.path.getsize(src) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    return copy_half_then_fail if real is shutil.copyfile else fill_half_then_fail


def test_full_disk_fails_clearly_and_keeps_the_previous_generation(data_dir, tmp_path, monkeypatch):
    """ENOSPC while a refresh allocates its new generation (simulated: the store
    allocates a generation by copying the current one, or by posix_fallocate for the
    first one). The error must say so at generation creation -- not as a SIGBUS on a
    later memory-mapped write -- and the previous generation must stay current and
    byte-identical, so that the run resumes once space is freed."""
    save = str(tmp_path / "ckpt")
    task, model, crit, batches = one_refresh_epoch(data_dir, save)
    cache_dir = task.arch_cache.cache_dir
    prev = os.path.join(cache_dir, "gen-e0001")
    before = _generation_files(prev)
    state_before = open(os.path.join(cache_dir, "state.json")).read()
    with monkeypatch.context() as m:
        m.setattr(shutil, "copyfile", _enospc_after_half(shutil.copyfile))
        m.setattr(os, "posix_fallocate", _enospc_after_half(os.posix_fallocate))
        with pytest.raises(RuntimeError, match="no space left on device while creating cache generation "
                                               ".*gen-e0003.*Nothing already in the cache was changed"):
            task.begin_epoch(3, model)  # refresh: the copy into gen-e0003 does not fit
    assert not os.path.exists(os.path.join(cache_dir, "gen-e0003")), "a generation that did not fit was kept"
    assert not os.path.exists(os.path.join(cache_dir, "gen-e0003.tmp")), "the half-written copy was left behind"
    assert _generation_files(prev) == before, "the previous generation changed"
    assert open(os.path.join(cache_dir, "state.json")).read() == state_before, \
        "state.json moved on although the new generation was never made"
    task.arch_cache.store.verify_generation("gen-e0001")
    task.arch_cache.store.close_maps()
    # space freed: a resumed process (new task, same cache dir) refreshes normally
    _, task, model, _ = utils.build_components(
        data_dir, ["--arch-cache-fraction", "1.0", "--arch-refresh-interval", "2"], save_dir=save)
    task.begin_epoch(3, model)
    assert task.arch_cache.access.generation == "gen-e0003" and task.arch_cache.access.base == "gen-e0001"
    task.arch_cache.store.close_maps()


def test_full_disk_on_the_first_generation_fails_clearly(data_dir, tmp_path, monkeypatch):
    """The first generation has no base to copy: it is allocated with posix_fallocate."""
    _, task, model, _ = utils.build_components(
        data_dir, ["--arch-cache-fraction", "1.0", "--arch-refresh-interval", "2"], save_dir=str(tmp_path))
    monkeypatch.setattr(os, "posix_fallocate", _enospc_after_half(os.posix_fallocate))
    with pytest.raises(RuntimeError, match="no space left on device while creating cache generation .*gen-e0001"):
        task.begin_epoch(1, model)
    cache_dir = task.arch_cache.cache_dir
    left = sorted(e for e in os.listdir(cache_dir) if e.startswith("gen-"))
    assert left == [], f"a generation that did not fit was left behind: {left}"
    with open(os.path.join(cache_dir, "state.json")) as f:
        state = json.load(f)
    assert state == {"current": None, "in_progress": None}, f"state.json moved on: {state}"


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = str(tmp_path / f"tiny-{uuid.uuid4().hex[:6]}")
    os.makedirs(mnt)
    yield mnt
    import gc

    gc.collect()  # drop memory maps of the test's cache so the mount is not busy
    if os.path.ismount(mnt) and utils.run(["umount", mnt], timeout=60, capture_output=True).returncode != 0:
        utils.run(["umount", "-l", mnt], timeout=60, capture_output=True)


def test_full_disk_on_a_real_tmpfs(data_dir, tmp_path, tiny_fs):
    """The same with a real, tiny tmpfs, where this machine lets us mount one (root);
    the monkeypatched test above is the one that always runs."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the simulated ENOSPC test covers this")
    # size one generation on a roomy disk; the first refresh needs it and the shards of its
    # rows (about one more generation) until they are merged: give the run room for 3
    task, _, _, _ = one_refresh_epoch(data_dir, str(tmp_path / "probe"))
    gen = os.path.join(task.arch_cache.cache_dir, "gen-e0001")
    gen_bytes = sum(os.path.getsize(os.path.join(gen, f)) for f in os.listdir(gen))
    size_kb = (int(gen_bytes * 3) + 64 * 1024) // 1024
    res = utils.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", tiny_fs], timeout=60,
                    capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    task, model, crit, batches = one_refresh_epoch(data_dir, str(tmp_path / "ckpt"), ["--arch-cache-dir", tiny_fs])
    # then fill the disk but for half a generation: the copy of the next refresh cannot fit
    st = os.statvfs(tiny_fs)
    with open(os.path.join(tiny_fs, "ballast"), "wb") as f:
        f.write(bytes(max(0, st.f_bavail * st.f_frsize - gen_bytes // 2)))
    before = _generation_files(os.path.join(tiny_fs, "gen-e0001"))
    with pytest.raises(RuntimeError, match="no space left on device.*Nothing already in the cache was changed"):
        task.begin_epoch(3, model)  # refresh: the copy into gen-e0003 does not fit
    assert not os.path.exists(os.path.join(tiny_fs, "gen-e0003"))
    assert not os.path.exists(os.path.join(tiny_fs, "gen-e0003.tmp"))
    assert _generation_files(os.path.join(tiny_fs, "gen-e0001")) == before, "the previous generation changed"
    task.arch_cache.store.verify_generation("gen-e0001")
    task.arch_cache.store.close_maps()


def test_cache_dir_of_another_run_is_refused_naming_the_mismatch(data_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    one_refresh_epoch(data_dir, save)
    for flags, what in ((["--arch-cache-fraction", "0.5"], "cache_fraction"), (["--seed", "9"], "seed"),
                        (["--arch-cache-dtype", "float32"], "dtype"),
                        (["--encoder-embed-dim", "16", "--decoder-embed-dim", "16"], "dims")):
        _, task, model, _ = utils.build_components(
            data_dir, ["--arch-refresh-interval", "2", *flags], save_dir=save)
        with pytest.raises(CacheMismatchError, match=f"{what}.*empty directory, or delete"):
            task.begin_epoch(1, model)
    other = utils.make_toy_data(str(tmp_path / "other"), n_train=100, n_valid=10, n_test=10)
    _, task, model, _ = utils.build_components(other, ["--arch-cache-dir", os.path.join(save, "arch_cache")],
                                               save_dir=save)
    with pytest.raises(CacheMismatchError, match="n_sentences"):
        task.begin_epoch(1, model)


def test_reuse_epoch_without_its_cache_recomputes_it(data_dir, tmp_path):
    """A deleted cache dir (the advice of every damaged-cache error) is recomputed by the
    resumed reuse epoch, as a refresh (test_cache_recovery.py follows the schedule on)."""
    save = str(tmp_path / "ckpt")
    task, model, _, _ = one_refresh_epoch(data_dir, save)
    shutil.rmtree(os.path.join(save, "arch_cache"))
    _, task, model, _ = utils.build_components(data_dir, ["--arch-refresh-interval", "2"], save_dir=save)
    task.begin_epoch(2, model)
    assert task.arch_cache.mode == "refresh" and task.arch_cache.access.generation == "gen-e0002"
    task.arch_cache.store.close_maps()


@pytest.fixture(scope="module")
def healthy_cache(data_dir, tmp_path_factory):
    """A cache dir after one refresh epoch (gen-e0001 current). Read-only: tests copy it."""
    save = str(tmp_path_factory.mktemp("healthy"))
    task, _, _, _ = one_refresh_epoch(data_dir, save)
    task.arch_cache.store.close_maps()
    return task.arch_cache.cache_dir


def _dir_bytes(root):
    """Every file under root with its bytes; owner.token is restamped by every start."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files if f != "owner.token"}


def _truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _save_ids(path, ids):
    np.save(path + ".npy", ids)  # np.save appends .npy to a name without it
    os.replace(path + ".npy", path)


CURRENT = {"name": "gen-e0001", "epoch": 1}
# (file, damage, what the error must say about that file)
DAMAGES = {
    "state-truncated": ("state.json", _truncate_half, "is not valid JSON"),
    "state-not-an-object": ("state.json", lambda p: _write(p, "[]"), "holds a JSON list"),
    "state-missing-key": ("state.json", lambda p: _write(p, json.dumps({"in_progress": None})),
                          "no 'current' entry"),
    "state-current-a-string": ("state.json", lambda p: _write(p, json.dumps(
        {"current": "gen-e0001", "in_progress": None})), "'current' must be null or an object"),
    "state-epoch-a-string": ("state.json", lambda p: _write(p, json.dumps(
        {"current": {"name": "gen-e0001", "epoch": "1"}, "in_progress": None})), "positive integer epoch"),
    "state-in-progress-without-base": ("state.json", lambda p: _write(p, json.dumps(
        {"current": CURRENT, "in_progress": {"name": "gen-e0003", "epoch": 3}})), "'in_progress' must be null"),
    "state-missing": ("state.json", os.remove, "is missing"),
    "layout-truncated": ("layout.json", _truncate_half, "is not valid JSON"),
    "layout-missing-keys": ("layout.json", lambda p: _write(p, json.dumps({"format": 1})), "is invalid \\(no \\["),
    "layout-not-an-object": ("layout.json", lambda p: _write(p, "1"), "holds a JSON int"),
    "layout-missing": ("layout.json", os.remove, "is missing but the dir holds \\['gen-e0001'\\]"),
    "ids-truncated": ("cached_ids.npy", _truncate_half, "is unreadable"),
    "ids-missing": ("cached_ids.npy", os.remove, "is missing"),
    "ids-too-few": ("cached_ids.npy", lambda p: _save_ids(p, np.load(p)[:-1]), "ids, expected"),
    "ids-unsorted": ("cached_ids.npy", lambda p: _save_ids(p, np.load(p)[::-1].copy()), "not strictly increasing"),
    "ids-out-of-range": ("cached_ids.npy", lambda p: _save_ids(p, np.load(p) + 1), "not strictly increasing within"),
    "ids-floats": ("cached_ids.npy", lambda p: _save_ids(p, np.load(p).astype(np.float32)), "expected 1-D integers"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_state_layout_or_ids_file_is_refused_naming_it(data_dir, healthy_cache, tmp_path, damage):
    """state.json, layout.json and cached_ids.npy are written atomically, so a damaged one
    was changed outside the run: the resumed run must stop with an error that names
    the file (not a KeyError/JSONDecodeError from deep inside), and change nothing."""
    fname, spoil, says = DAMAGES[damage]
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(healthy_cache, cache_dir)
    spoil(os.path.join(cache_dir, fname))
    before = _dir_bytes(cache_dir)
    _, task, model, _ = utils.build_components(
        data_dir, ["--arch-cache-fraction", "1.0", "--arch-refresh-interval", "2", "--arch-cache-dir", cache_dir],
        save_dir=str(tmp_path / "ckpt"))
    with pytest.raises(CacheCorruptError) as err:
        task.begin_epoch(2, model)  # as a run resumed after epoch 1 does
    msg = str(err.value)
    assert os.path.join(cache_dir, fname) in msg, f"the error does not name {fname}: {msg}"
    assert re.search(says, msg) and "delete the cache dir" in msg, msg
    assert _dir_bytes(cache_dir) == before, "a refused cache dir was changed"


def test_undamaged_copy_of_the_cache_resumes(data_dir, healthy_cache, tmp_path):
    """Control for the test above: the same copy, undamaged, is accepted."""
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(healthy_cache, cache_dir)
    _, task, model, _ = utils.build_components(
        data_dir, ["--arch-cache-fraction", "1.0", "--arch-refresh-interval", "2", "--arch-cache-dir", cache_dir],
        save_dir=str(tmp_path / "ckpt"))
    task.begin_epoch(2, model)
    assert task.arch_cache.mode == "reuse" and task.arch_cache.access.generation == "gen-e0001"


def test_non_finite_regularizer_is_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    task, model, crit, batches = one_refresh_epoch(data_dir, str(tmp_path / "ckpt"))
    real = Teacher.divergence
    monkeypatch.setattr(Teacher, "divergence", lambda *a, **k: real(*a, **k) * float("inf"))
    loss, _, log = crit(model, batches[0])  # reuse epoch
    assert torch.isfinite(loss) and log["adv_skipped"] == 1 and log["adv_loss"] == 0
    assert torch.allclose(loss, log["ls_loss"])


def test_non_finite_ascent_never_reaches_the_cache(data_dir, tmp_path, monkeypatch):
    task, model, crit, batches = one_refresh_epoch(data_dir, str(tmp_path / "ckpt"))
    task.begin_epoch(3, model)  # refresh: writes gen-e0003 (a copy of gen-e0001)
    cache = task.arch_cache
    b = batches[0]
    ids = b["id"].tolist()
    before = [r.copy() for r in cache.store.read_rows(cache.access.generation, "source", cache.store.pos_of[ids])]
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: tuple(g * float("nan") for g in real_grad(*a, **k)))
    loss, _, log = crit(model, b)
    assert torch.isfinite(loss) and log["adv_skipped"] == 1
    after = cache.store.read_rows(cache.access.generation, "source", cache.store.pos_of[ids])
    assert all(np.array_equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_fp32_kl_and_float16_cache(data_dir, tmp_path, dtype):
    _, task, model, crit = utils.build_components(
        data_dir, ["--arch-cache-fraction", "1.0", "--arch-refresh-interval", "2"], save_dir=str(tmp_path))
    model = model.to(dtype)
    task.begin_epoch(1, model)
    model.train()
    b = utils.batches(task)[0]
    loss, _, log = crit(model, b)
    assert log["adv_skipped"] == 0 and torch.isfinite(loss)
    assert log["adv_loss"].dtype == torch.float32 and log["adv_loss"] > 0
    assert log["adv_delta_norm"] / log["adv_delta_count"] == pytest.approx(0.1, rel=0.02)  # ascent reached the ball
    cache = task.arch_cache
    mm = cache.store.perturbation_rows(cache.access.generation, "source")
    assert mm.dtype == np.float16
    rows = cache.store.read_rows(cache.access.generation, "source", cache.store.pos_of[b["id"].tolist()])
    assert all(np.isfinite(r).all() and np.linalg.norm(r) > 0.09 for r in rows)
