"""Every method of the paper's tables under one criterion (--adv-method): Table 1
counts, lambda = 0 equals `none`, FreeLB's accumulated gradient, task requirements,
and a short fairseq-train run of each method through the CLI.

Counting (same for every method, see fairseq_arch/methods/__init__.py): each model call is
a forward, each gradient computation (ascent autograd.grad, the trainer's backward)
a backward. Literal counts per batch with S ascent steps:
none 1/1, r3f 2/1, smart S+2/S+1, freelb S+1/S+1, arch refresh S+2/S+1 and reuse 2/1.
Table 1 of the paper: SMART 1+S / 1+S (one forward fewer: the forward at the random
start is not counted), FreeLB 1+S / 1+S, R3F 2 / 1.
"""

import math
import os
import re

import pytest
import torch

from fairseq_arch.injection import unwrap_model

from . import utils

ENV = dict(os.environ, PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


def build(data_dir, tmp_path, method, extra=(), task="arch_translation"):
    _, task_obj, model, crit = utils.build_components(
        data_dir, ["--adv-method", method, "--task", task, *extra], save_dir=str(tmp_path))
    if task == "arch_translation":
        task_obj.begin_epoch(1, model)
    model.train()
    return task_obj, model, crit


def counted_step(model, crit, batch, monkeypatch):
    counter = {"fwd": 0, "grad": 0}
    h = unwrap_model(model).decoder.register_forward_hook(lambda *a: counter.__setitem__("fwd", counter["fwd"] + 1))
    real = torch.autograd.grad

    def grad(*a, **k):
        counter["grad"] += 1
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    loss, _, log = crit(model, batch)
    loss.backward()
    monkeypatch.setattr(torch.autograd, "grad", real)
    h.remove()
    return counter["fwd"], counter["grad"] + 1, log


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("method,want", [
    ("none", lambda s: (1, 1)),
    ("r3f", lambda s: (2, 1)),
    ("smart", lambda s: (s + 2, s + 1)),
    ("freelb", lambda s: (s + 1, s + 1)),
    ("arch", lambda s: (s + 2, s + 1)),  # refresh epoch; reuse epochs: tests/test_criterion.py
])
def test_table1_counts_per_method(data_dir, tmp_path, monkeypatch, method, want, steps):
    task, model, crit = build(data_dir, tmp_path, method, ["--adv-steps", str(steps)])
    fwd, bwd, log = counted_step(model, crit, utils.batches(task)[0], monkeypatch)
    assert (fwd, bwd) == want(steps)
    assert (log["adv_fwd"], log["adv_bwd"]) == want(steps)  # what the training log reports
    assert crit.method.passes(steps) == want(steps)  # what the method declares


class _UnshortcutZero(float):
    """An exact 0.0 that the criterion's ``adv_lambda == 0`` shortcut does not see:
    the regularised path (ascent, cache, perturbed forward, KL) really runs and its
    KL is multiplied by an exact zero, so loss and gradients must still be plain LS."""

    def __eq__(self, other):
        return False

    __hash__ = float.__hash__


# freelb has no lambda term (its loss is the mean CE over its steps): shortcut only
@pytest.mark.parametrize("method,through", [
    *[(m, "shortcut") for m in ("r3f", "smart", "freelb", "arch")],
    *[(m, "regularised path") for m in ("r3f", "smart", "arch")],
])
def test_lambda_zero_is_exactly_none(data_dir, tmp_path, method, through):
    def loss_and_grads(m):
        task, model, crit = build(data_dir, tmp_path / m, m, ["--adv-lambda", "0"] if m != "none" else [])
        if m != "none" and through != "shortcut":
            crit.adv_lambda = _UnshortcutZero(0.0)
        loss, _, log = crit(model, utils.batches(task)[0])
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()], log

    torch.manual_seed(0)
    la, ga, _ = loss_and_grads("none")
    torch.manual_seed(0)
    lb, gb, log = loss_and_grads(method)
    if through == "shortcut":
        assert log["adv_fwd"] == 1, "lambda = 0 should take the plain shortcut"
    else:
        assert log["adv_fwd"] >= 2 and log["adv_loss"] > 0, f"the regularised path did not run: {log}"
    assert torch.equal(la, lb), f"loss {lb} != plain LS {la}"
    assert all(torch.equal(a, b) for a, b in zip(ga, gb)), "lambda = 0 changed a parameter gradient"


def test_freelb_gradient_is_the_mean_of_its_steps(data_dir, tmp_path, monkeypatch):
    task, model, crit = build(data_dir, tmp_path, "freelb", ["--adv-steps", "2"], task="translation")
    batch = utils.batches(task)[0]
    real = crit.perturbed_forward
    used = utils.record_deltas(crit, monkeypatch)
    loss, _, log = crit(model, batch)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    monkeypatch.undo()
    assert len(used) == 3
    # the deltas move (ascent) and stay in the ball
    assert not torch.equal(used[0]["source"], used[1]["source"])
    model.zero_grad()
    for d in used:  # each step's CE gradient, separately, averaged
        out = real(model, batch["net_input"], d)
        (crit.compute_loss(model, out, batch)[0] / len(used)).backward()
    for a, p in zip(got, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_r3f_uses_small_gaussian_noise_and_symmetric_kl(data_dir, tmp_path):
    task, model, crit = build(data_dir, tmp_path, "r3f", task="translation")
    assert crit.space.init_kind == "normal" and crit.space.init_scale == 1e-5 and crit.adv_kl == "symmetric"
    batch = utils.batches(task)[0]
    _, _, log = crit(model, batch)
    mean_norm = log["adv_delta_norm"] / log["adv_delta_count"]
    n_tok = float(batch["net_input"]["src_tokens"].ne(1).sum(1).float().mean())  # a float: pytest.approx cannot take 0-d tensors
    assert mean_norm == pytest.approx(1e-5 * (n_tok * 32) ** 0.5, rel=0.3)  # not projected, just noise


@pytest.mark.parametrize("method", ["none", "r3f", "smart", "freelb"])
def test_methods_without_cache_run_on_plain_translation(data_dir, tmp_path, method):
    task, model, crit = build(data_dir, tmp_path, method, task="translation")
    loss, _, log = crit(model, utils.batches(task)[0])
    assert torch.isfinite(loss)


def test_arch_refuses_plain_translation_and_freelb_needs_steps(data_dir, tmp_path):
    with pytest.raises(ValueError, match="--adv-method arch .*--task arch_translation"):
        build(data_dir, tmp_path, "arch", task="translation")
    with pytest.raises(ValueError, match="freelb needs --adv-steps >= 1"):
        build(data_dir, tmp_path, "freelb", ["--adv-steps", "0"], task="translation")


def test_other_methods_on_arch_task_make_no_cache(data_dir, tmp_path):
    task, model, crit = build(data_dir, tmp_path, "smart")
    crit(model, utils.batches(task)[0])
    assert task.arch_cache is None and not os.path.exists(tmp_path / "arch_cache")


def _gnorm_var_from_updates(gnorms):
    """Population variance of the per-update gradient norms (what Fig. 3 plots)."""
    mean = sum(gnorms) / len(gnorms)
    return sum((g - mean) ** 2 for g in gnorms) / len(gnorms)


@pytest.mark.parametrize("method,fwd", [("none", 1), ("r3f", 2), ("smart", 5), ("freelb", 4), ("arch", 5)])
def test_each_method_trains_through_the_cli_and_logs_fig3_stats(data_dir, tmp_path, method, fwd):
    res = utils.run(
        ["fairseq-train", data_dir, *utils.ARCH_TASK, "--adv-method", method, *utils.TINY_MODEL,
         "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "250", "--max-epoch", "1",  # ~10 updates
         "--save-dir", str(tmp_path / "ckpt"), "--cpu", "--no-progress-bar", "--log-interval", "1",
         "--no-save"],
        timeout=600, env=ENV, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    epoch = [l for l in out.splitlines() if "| train | epoch 001" in l]
    assert epoch, out[-2000:]
    assert f"adv_fwd_per_batch {fwd} " in epoch[0]
    # Fig. 3: the epoch's gradient-norm variance must be the variance of the gnorms
    # logged update by update (log interval 1), not just some non-negative number
    gnorms = [float(g) for g in re.findall(r"train_inner \| .*gnorm=([0-9.e+-]+)", out)]
    assert len(gnorms) >= 5, out[-2000:]  # a gradient norm every update
    var = re.search(r"gnorm_var ([0-9.e+-]+)", epoch[0])
    assert var, epoch[0]
    want = _gnorm_var_from_updates(gnorms)
    # the per-update gnorms are printed to 3 decimals (error <= 5e-4 each), the
    # variance to 5: allow that rounding, no more
    tol = 2e-3 * want ** 0.5 + 2e-5
    assert want > 10 * tol, f"too little gnorm variation to test against: {gnorms}"
    assert math.isclose(float(var.group(1)), want, abs_tol=tol), (
        f"logged gnorm_var {var.group(1)} != variance {want:.5f} of the per-update gnorms {gnorms}")
