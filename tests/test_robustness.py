"""Bad input never loses data, and low precision never poisons model or cache:
full disk (a real, tiny tmpfs), non-finite regularizer or ascent, half-precision
models (the cache stays float16, the KL is computed in float32)."""

import os
import shutil
import subprocess
import uuid

import numpy as np
import pytest
import torch

from fairseq_arch.cache_store import CacheMismatchError
from fairseq_arch.criterions import adversarial_label_smoothed_cross_entropy as crit_mod

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


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = str(tmp_path / f"tiny-{uuid.uuid4().hex[:6]}")
    os.makedirs(mnt)
    yield mnt
    import gc

    gc.collect()  # drop memory maps of the test's cache so the mount is not busy
    if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def test_full_disk_fails_clearly_and_keeps_the_previous_generation(data_dir, tmp_path, tiny_fs):
    # size one generation on a roomy disk, then give the run room for ~1.5 of them
    task, _, _, _ = one_refresh_epoch(data_dir, str(tmp_path / "probe"))
    gen = os.path.join(task.arch_cache.cache_dir, "gen-e0001")
    gen_bytes = sum(os.path.getsize(os.path.join(gen, f)) for f in os.listdir(gen))
    size_kb = (int(gen_bytes * 1.5) + 64 * 1024) // 1024
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", tiny_fs], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    task, model, crit, batches = one_refresh_epoch(data_dir, str(tmp_path / "ckpt"), ["--arch-cache-dir", tiny_fs])
    before = {f: open(os.path.join(tiny_fs, "gen-e0001", f), "rb").read()
              for f in os.listdir(os.path.join(tiny_fs, "gen-e0001"))}
    with pytest.raises(RuntimeError, match="no space left on device.*previous cache generation is intact"):
        task.begin_epoch(3, model)  # refresh: the copy into gen-e0003 does not fit
    assert not os.path.exists(os.path.join(tiny_fs, "gen-e0003"))
    assert not os.path.exists(os.path.join(tiny_fs, "gen-e0003.tmp"))
    after = {f: open(os.path.join(tiny_fs, "gen-e0001", f), "rb").read()
             for f in os.listdir(os.path.join(tiny_fs, "gen-e0001"))}
    assert before == after
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


def test_reuse_epoch_without_its_cache_is_refused(data_dir, tmp_path):
    save = str(tmp_path / "ckpt")
    task, model, _, _ = one_refresh_epoch(data_dir, save)
    shutil.rmtree(os.path.join(save, "arch_cache"))
    _, task, model, _ = utils.build_components(data_dir, ["--arch-refresh-interval", "2"], save_dir=save)
    with pytest.raises(CacheMismatchError, match="reuses the perturbations of epoch 1"):
        task.begin_epoch(2, model)


def test_non_finite_regularizer_is_skipped_and_counted(data_dir, tmp_path, monkeypatch):
    task, model, crit, batches = one_refresh_epoch(data_dir, str(tmp_path / "ckpt"))
    real = crit_mod.divergence
    monkeypatch.setattr(crit_mod, "divergence", lambda *a, **k: real(*a, **k) * float("inf"))
    loss, _, log = crit(model, batches[0])  # reuse epoch
    assert torch.isfinite(loss) and log["adv_skipped"] == 1 and log["adv_loss"] == 0
    assert torch.allclose(loss, log["ls_loss"])


def test_non_finite_ascent_never_reaches_the_cache(data_dir, tmp_path, monkeypatch):
    task, model, crit, batches = one_refresh_epoch(data_dir, str(tmp_path / "ckpt"))
    task.begin_epoch(3, model)  # refresh: writes gen-e0003 (a copy of gen-e0001)
    cache = task.arch_cache
    b = batches[0]
    ids = b["id"].tolist()
    before = [r.copy() for r in cache.store.read_rows(cache.write_gen, "source", cache.store.pos_of[ids])]
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: tuple(g * float("nan") for g in real_grad(*a, **k)))
    loss, _, log = crit(model, b)
    assert torch.isfinite(loss) and log["adv_skipped"] == 1
    after = cache.store.read_rows(cache.write_gen, "source", cache.store.pos_of[ids])
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
    mm = cache.store.token_file(cache.write_gen, "source")
    assert mm.dtype == np.float16
    rows = cache.store.read_rows(cache.write_gen, "source", cache.store.pos_of[b["id"].tolist()])
    assert all(np.isfinite(r).all() and np.linalg.norm(r) > 0.09 for r in rows)
