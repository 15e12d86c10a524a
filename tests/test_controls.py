"""The controls that separate dropout consistency from the adversarial perturbation
(issue 19): ``--adv-method zero-delta`` (the KL step with delta = 0), ``--adv-teacher
grad`` (gradients through the clean branch too, as R-Drop) and ``--adv-method
arch-rdrop`` (R-Drop's objective with ARCH's cached delta on the second pass). Each
is checked against an objective computed independently on the same dropout masks."""

import os

import pytest
import torch

from fairseq_arch import early_backward

from . import utils
from .test_rdrop import _close, _flat, _ls, _sym_kl


def _build(data_dir, tmp_path, method, extra=()):
    _, task, model, crit = utils.build_components(
        data_dir, ["--adv-method", method, "--dropout", "0.3", "--adv-steps", "2", "--arch-refresh-interval", "2",
                   *extra], save_dir=str(tmp_path))
    task.begin_epoch(1, model)
    model.train()
    return task, model, crit


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return _flat([p.grad for p in model.parameters()])


def _reference_kl_step(model, crit, batch, delta, lam, teacher_grad, seed):
    """LS(f(x)) + lam * symKL(f(x), f'(x + delta)) on the criterion's dropout draws (the
    same seed, the clean forward first), the clean side detached unless ``teacher_grad``."""
    torch.manual_seed(seed)
    o1 = model(**batch["net_input"])
    o2 = utils.perturbed(crit, model, batch, delta)
    lp1, lp2 = (torch.log_softmax(o[0].float(), dim=-1) for o in (o1, o2))
    ls1, _ = _ls(lp1, batch["target"], crit.eps, crit.padding_idx)
    kl = _sym_kl(lp1 if teacher_grad else lp1.detach(), lp2, batch["target"], crit.padding_idx)
    return ls1 + lam * kl


@pytest.mark.parametrize("teacher", ["detach", "grad"])
def test_zero_delta_is_the_kl_of_two_dropout_passes(small_toy, tmp_path, teacher):
    task, model, crit = _build(small_toy, tmp_path, "zero-delta", ["--adv-kl", "symmetric", "--adv-teacher", teacher])
    batch = utils.batches(task)[0]
    torch.manual_seed(7)
    loss, _, log = crit(model, batch)
    got = _grads(model, loss)
    assert (log["adv_fwd"], log["adv_bwd"]) == (2, 1) and log["adv_delta_norm"] == 0
    assert log["adv_loss"] > 0, "two dropout passes should differ"
    ref = _reference_kl_step(model, crit, batch, {}, 1.0, teacher == "grad", seed=7)
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
    assert _close(got, _grads(model, ref))


def test_teacher_grad_changes_the_gradient_and_is_not_backpropagated_early(small_toy, tmp_path):
    grads = {}
    for teacher in ("detach", "grad"):
        task, model, crit = _build(small_toy, tmp_path / teacher, "smart", ["--adv-teacher", teacher])
        assert early_backward.detached_teacher_step(crit) is (teacher == "detach")
        torch.manual_seed(3)
        loss, _, _ = crit(model, utils.batches(task)[0])
        grads[teacher] = _grads(model, loss)
    assert not _close(grads["grad"], grads["detach"]), "--adv-teacher grad left the gradient unchanged"


@pytest.mark.parametrize("method", ["none", "rdrop", "freelb", "arch-rdrop"])
def test_teacher_grad_is_refused_where_there_is_no_clean_teacher(small_toy, tmp_path, method):
    with pytest.raises(ValueError, match="--adv-teacher grad"):
        _build(small_toy, tmp_path, method, ["--adv-teacher", "grad"])


def test_arch_rdrop_is_rdrop_with_archs_delta_on_the_second_pass(small_toy, tmp_path, monkeypatch):
    """Refresh epoch: the ascent then R-Drop's objective with the stored delta; reuse
    epoch: R-Drop's objective with the cache's delta, at R-Drop's 2 forwards and 1 backward."""
    lam = 5.0
    task, model, crit = _build(small_toy, tmp_path, "arch-rdrop", ["--adv-lambda", str(lam)])
    batches = utils.batches(task)
    seen = utils.record_deltas(crit, monkeypatch)
    logs = [crit(model, b)[2] for b in batches]  # refresh: fills the cache
    assert all((l["adv_fwd"], l["adv_bwd"]) == (2 + 2, 1 + 2) and l["arch_fresh"] > 0 for l in logs)
    task.begin_epoch(2, model)
    batch = batches[0]
    torch.manual_seed(11)
    loss, _, log = crit(model, batch)
    got = _grads(model, loss)
    assert (log["adv_fwd"], log["adv_bwd"]) == (2, 1) and log["arch_cached"] + log["arch_rebuilt"] == len(batch["id"])
    delta = seen[-1]
    assert all(d.abs().sum() > 0 for d in delta.values()), "the second pass was not perturbed"
    torch.manual_seed(11)
    o1 = model(**batch["net_input"])
    o2 = utils.perturbed(crit, model, batch, delta)
    lp1, lp2 = (torch.log_softmax(o[0].float(), dim=-1) for o in (o1, o2))
    ls1, _ = _ls(lp1, batch["target"], crit.eps, crit.padding_idx)
    ls2, _ = _ls(lp2, batch["target"], crit.eps, crit.padding_idx)
    ref = 0.5 * (ls1 + ls2 + lam * _sym_kl(lp1, lp2, batch["target"], crit.padding_idx))
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
    assert _close(got, _grads(model, ref))


def test_arch_rdrop_trains_through_the_cli(small_toy, tmp_path):
    out = utils.run(["fairseq-train", small_toy, *utils.ARCH_TASK, *utils.TINY_MODEL, "--cpu", "--adv-method",
                     "arch-rdrop", "--arch-refresh-interval", "2", "--max-epoch", "3", "--optimizer", "adam",
                     "--lr", "0.005", "--max-tokens", "1000", "--save-dir", str(tmp_path / "ckpt"),
                     "--no-epoch-checkpoints", "--log-format", "simple", "--num-workers", "0"],
                    capture_output=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    text = out.stdout.decode() + out.stderr.decode()
    assert out.returncode == 0, text[-3000:]
    assert "ARCH epoch 2: reuse" in text and "ARCH epoch 3: refresh" in text
