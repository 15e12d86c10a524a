"""--adv-method rdrop (R-Drop, Liang et al. 2021): two dropout forwards of the same
batch, the label-smoothed CE of both plus alpha * symmetric KL between them.

Convention (see the criterion's ``_rdrop``): half of the authors' objective,
``(LS1 + LS2)/2 + alpha/2 * (KL(p1||p2) + KL(p2||p1))/2``, token sums over the
tokens of one copy, gradients through both distributions.
"""

import os
import re

import pytest
import torch

from . import utils
from .test_methods import ENV, build, counted_step


@pytest.fixture(scope="module")
def data_dir(small_toy):
    return small_toy


DROPOUT = ["--dropout", "0.3"]  # build_components turns dropout off; R-Drop needs it on


def _ls(lprobs, target, eps, pad):
    """Label-smoothed CE written out (fairseq 0.12's convention: eps/(V-1) on the
    other words), summed over the real target tokens."""
    v = lprobs.size(-1)
    keep = target.ne(pad)
    lp, t = lprobs[keep], target[keep]
    nll = -lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    smooth = -lp.sum(-1)
    eps_i = eps / (v - 1)
    return ((1.0 - eps - eps_i) * nll + eps_i * smooth).sum(), nll.sum()


def _sym_kl(lp1, lp2, target, pad):
    """(KL(p1||p2) + KL(p2||p1)) / 2 summed over real tokens, nothing detached
    (R-Drop's compute_kl_loss)."""
    keep = target.ne(pad)
    a, b = lp1[keep], lp2[keep]
    return 0.5 * ((a.exp() * (a - b)).sum() + (b.exp() * (b - a)).sum())


def _reference(model, crit, batch, alpha, seed, detach_second=False):
    """The objective computed independently, on the same dropout masks: the same
    seed, then the two forwards in the same order as the criterion."""
    torch.manual_seed(seed)
    o1 = model(**batch["net_input"])
    o2 = model(**batch["net_input"])
    lp1 = torch.log_softmax(o1[0].float(), dim=-1)
    lp2 = torch.log_softmax(o2[0].float(), dim=-1)
    target = batch["target"]
    pad = crit.padding_idx
    ls1, nll1 = _ls(lp1, target, crit.eps, pad)
    ls2, nll2 = _ls(lp2, target, crit.eps, pad)
    kl = _sym_kl(lp1, lp2.detach() if detach_second else lp2, target, pad)
    # R-Drop's own objective is ls1 + ls2 + alpha * kl; we minimise half of it
    return 0.5 * (ls1 + ls2 + alpha * kl), 0.5 * (nll1 + nll2), kl, (o1[0], o2[0])


def _close(a, b):
    """Equal up to float32 summation order: 1e-5 of the largest entry (over all
    parameters, since some true gradients are 0, e.g. attention key biases)."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-9)


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("task", ["translation", "arch_translation"])
def test_rdrop_gradient_is_ls_of_both_plus_alpha_symmetric_kl(data_dir, tmp_path, task):
    alpha = 5.0
    task_obj, model, crit = build(data_dir, tmp_path, "rdrop", [*DROPOUT, "--adv-lambda", str(alpha)], task=task)
    batch = utils.batches(task_obj)[0]
    torch.manual_seed(7)
    loss, sample_size, log = crit(model, batch)
    loss.backward()
    got = _grads(model)

    model.zero_grad()
    want, nll, kl, (o1, o2) = _reference(model, crit, batch, alpha, seed=7)
    assert not torch.equal(o1, o2), "the two passes used the same dropout masks"
    assert kl > 0
    want.backward()
    ref = _grads(model)
    assert sample_size == batch["ntokens"]  # token sums over one copy, as R-Drop (and fairseq) do
    assert torch.allclose(loss, want, rtol=1e-5), (float(loss), float(want))
    assert float(log["adv_loss"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(log["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(log["ls_loss"]) == pytest.approx(float(want - 0.5 * alpha * kl), rel=1e-5)
    assert _close(_flat(got), _flat(ref)), float((_flat(got) - _flat(ref)).abs().max() / _flat(ref).abs().max())

    # the KL's gradient must flow through BOTH distributions (R-Drop detaches neither)
    model.zero_grad()
    one_sided, *_ = _reference(model, crit, batch, alpha, seed=7, detach_second=True)
    one_sided.backward()
    assert not _close(_flat(got), _flat(_grads(model))), \
        "the gradient equals the one with the second pass detached"
    if task == "arch_translation":
        assert task_obj.arch_cache is None and not os.path.exists(tmp_path / "arch_cache")


def test_rdrop_lambda_zero_is_the_no_kl_version(data_dir, tmp_path):
    # shortcut: --adv-lambda 0 is exactly `none` (one forward), as for every method
    def run(method, extra):
        task, model, crit = build(data_dir, tmp_path / method, method, [*DROPOUT, *extra], task="translation")
        torch.manual_seed(3)
        loss, _, log = crit(model, utils.batches(task)[0])
        loss.backward()
        return loss, _grads(model), log

    la, ga, _ = run("none", [])
    lb, gb, log = run("rdrop", ["--adv-lambda", "0"])
    assert log["adv_fwd"] == 1 and torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))

    # through the R-Drop path with a zero weight: exactly the mean LS of the two passes
    from .test_methods import _UnshortcutZero

    task, model, crit = build(data_dir, tmp_path / "z", "rdrop", DROPOUT, task="translation")
    crit.adv_lambda = _UnshortcutZero(0.0)
    batch = utils.batches(task)[0]
    torch.manual_seed(3)
    loss, _, log = crit(model, batch)
    loss.backward()
    got = _grads(model)
    assert log["adv_fwd"] == 2 and log["adv_loss"] > 0, log
    model.zero_grad()
    want, *_ = _reference(model, crit, batch, 0.0, seed=3)
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-5)
    assert _close(_flat(got), _flat(_grads(model)))


def test_rdrop_without_dropout_has_exactly_zero_kl(data_dir, tmp_path):
    task, model, crit = build(data_dir, tmp_path, "rdrop", ["--dropout", "0", "--adv-lambda", "5"], task="translation")
    batch = utils.batches(task)[0]
    loss, _, log = crit(model, batch)
    assert float(log["adv_loss"]) == 0.0
    plain, _ = crit.compute_loss(model, model(**batch["net_input"]), batch)
    assert torch.allclose(loss, plain, rtol=1e-6)


def test_rdrop_counts_two_forwards_one_backward(data_dir, tmp_path, monkeypatch):
    task, model, crit = build(data_dir, tmp_path, "rdrop", DROPOUT, task="translation")
    fwd, bwd, log = counted_step(model, crit, utils.batches(task)[0], monkeypatch)
    assert (fwd, bwd) == (2, 1)
    assert (log["adv_fwd"], log["adv_bwd"]) == (2, 1)


def test_rdrop_trains_one_epoch_through_the_cli(data_dir, tmp_path):
    res = utils.run(
        ["fairseq-train", data_dir, *utils.ARCH_TASK, "--adv-method", "rdrop", "--adv-lambda", "5",
         "--dropout", "0.3", *utils.TINY_MODEL, "--optimizer", "adam", "--lr", "0.005",
         "--max-tokens", "250", "--max-epoch", "1", "--save-dir", str(tmp_path / "ckpt"), "--cpu",
         "--no-progress-bar", "--no-save"],
        timeout=600, env=ENV, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    epoch = [l for l in out.splitlines() if "| train | epoch 001" in l]
    assert epoch, out[-2000:]
    assert "adv_fwd_per_batch 2 " in epoch[0] and "adv_bwd_per_batch 1 " in epoch[0], epoch[0]
    kl = re.search(r"adv_loss ([0-9.e+-]+)", epoch[0])
    assert kl and float(kl.group(1)) > 0, epoch[0]
    assert not os.path.exists(tmp_path / "ckpt" / "arch_cache")  # no cache for rdrop
