"""The method registry (fairseq_arch/methods/): --adv-method's choices come from it, each
method's declarations are what the rest of the code acts on, and a new method is one
module plus its registration: the criterion, the early backward and the counts follow
without another edit."""

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

from fairseq_arch import early_backward
from fairseq_arch.criterions.adversarial_label_smoothed_cross_entropy import (
    AdversarialLabelSmoothedCrossEntropyCriterionConfig as Config,
)
from fairseq_arch.in_process import criterion_with
from fairseq_arch.methods import METHOD_REGISTRY, method_class, method_names, register_method
from fairseq_arch.methods.base import Method, StepResult, zero

from . import utils


def test_adv_method_choices_are_the_registry():
    choices = Config.__dataclass_fields__["adv_method"].type
    assert [str(c) for c in choices] == list(method_names())
    assert set(method_names()) == {"none", "r3f", "smart", "freelb", "arch", "rdrop", "zero-delta", "arch-rdrop"}


def test_an_unknown_method_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="--adv-method must be one of .*'nonsense'"):
        method_class("nonsense")


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_method("smart")(type("Other", (Method,), {}))
    assert method_class("smart").__name__ == "SMART"


@pytest.mark.parametrize("name", ["smart", "freelb", "arch"])
def test_methods_that_run_an_ascent_refuse_activation_checkpointing(small_toy, tmp_path, name):
    assert method_class(name).runs_ascent
    with pytest.raises(ValueError, match="--checkpoint-activations"):
        utils.build_components(small_toy, ["--adv-method", name, "--checkpoint-activations"], save_dir=str(tmp_path))


class _DoubleCE(Method):
    """A method written as a user would add one: twice the label-smoothed CE, with a
    detached 'teacher' so that the early backward arms for it."""

    detached_teacher = True
    counts = ((1, 0), (1, 0))

    def step(self, model, sample) -> StepResult:
        crit = self.criterion
        lprobs, target = crit.get_lprobs_and_target(model, model(**sample["net_input"]), sample)
        loss, nll = label_smoothed_nll_loss(lprobs, target, crit.eps, ignore_index=crit.padding_idx, reduce=True)
        if crit.early_backward is not None:
            crit.early_backward(loss)
            loss = loss.detach()
        return StepResult(loss * 2, loss, nll, zero(loss), fwd=1, bwd=1)


@pytest.fixture
def double_ce():
    register_method("double_ce")(_DoubleCE)
    yield _DoubleCE
    del METHOD_REGISTRY["double_ce"]


def test_a_new_method_is_one_registration(small_toy, tmp_path, double_ce):
    cfg, task, model, _ = utils.build_components(small_toy, ["--adv-method", "none"], save_dir=str(tmp_path))
    crit = criterion_with(cfg, task, adv_method="double_ce")
    assert crit.adv_method == "double_ce" and isinstance(crit.method, double_ce)
    model.train()
    batch = utils.batches(task)[0]
    loss, _, log = crit(model, batch)
    plain, _ = crit.compute_loss(model, model(**batch["net_input"]), batch)
    assert torch.allclose(loss, 2 * plain) and log["adv_fwd"] == 1 and log["adv_batches"] == 1
    assert early_backward.detached_teacher_step(crit)  # the early backward follows the declaration
    model.eval()
    loss, _, log = crit(model, batch)  # validation: plain label smoothing, whatever the method
    assert torch.allclose(loss, plain) and "adv_fwd" not in log
