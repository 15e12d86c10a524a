"""Criterion ``adversarial_label_smoothed_cross_entropy``: label-smoothed CE plus an
adversarial regulariser on the token embeddings, for every method of the paper's tables
(``--adv-method``; each method is a module of ``fairseq_arch/methods/``, which also
tabulates their forward/backward counts). ``--adv-lambda 0`` turns every method into
``none`` exactly.

delta perturbs the token-embedding lookup of the source and of the decoder input (before
the sqrt(d) scale). The clean prediction f(x) is a fixed (detached) teacher.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from fairseq import utils
from fairseq.criterions import CRITERION_REGISTRY, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II, DictConfig, OmegaConf

from ..code_recipe import CODE_EPS, CODE_STEP_SIZE, CODE_STEPS
from ..injection import check_applied, perturbed_embeddings
from ..log_probs import log_probs_are_log_softmax
from ..methods import method_class, method_names
from ..methods.ascent import AscentScaler, ProjectedAscent, refuse_activation_checkpointing
from ..methods.base import StepResult, padding_masks
from ..methods.kl_regularised import AscentObjective, KLRegularised
from ..methods.space import PerturbationSpace
from ..perturbation import Teacher, sentence_norms
from ..registration import register_once
from ..validation import refuse_bf16_without_xla, refuse_non_finite


@dataclass
class AdversarialLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    adv_method: ChoiceEnum(list(method_names())) = field(
        default="arch", metadata={"help": "regularization method: " + " | ".join(method_names()) + " (arch needs "
                                  "--task arch_translation; rdrop = R-Drop, two dropout forwards + --adv-lambda "
                                  "(R-Drop's alpha) x symmetric KL, no perturbation)"})
    adv_lambda: float = field(default=1.0, metadata={"help": "lambda: weight of the adversarial regularizer; 0 = plain label "
                                                    "smoothing. rdrop: R-Drop's alpha (their IWSLT'14 De-En setting: 5)"})
    adv_eps: Optional[float] = field(default=None, metadata={"help": "epsilon: radius of the perturbation ball "
                                                             "(default 0.1; --arch-recipe code: 0.3)"})
    adv_steps: Optional[int] = field(default=None, metadata={"help": "S: projected gradient ascent steps per fresh "
                                                             "perturbation (default 3; --arch-recipe code: 2)"})
    adv_step_size: Optional[float] = field(default=None, metadata={"help": "eta: ascent step size (the step is eta * "
                                                                   "g / ||g||; default 0.1; --arch-recipe code: 1e-4)"})
    adv_norm: ChoiceEnum(["l2", "linf"]) = field(default="l2", metadata={"help": "norm of the perturbation ball"})
    adv_granularity: ChoiceEnum(["sentence", "word"]) = field(
        default="sentence", metadata={"help": "one ball per sentence (paper) or one per token"})
    adv_init: Optional[ChoiceEnum(["uniform", "normal"])] = field(
        default=None, metadata={"help": "initial perturbation: uniform in the ball, or gaussian "
                                "(default: normal for r3f, uniform otherwise)"})
    adv_init_scale: Optional[float] = field(
        default=None, metadata={"help": "uniform: radius of the init ball (default --adv-eps); "
                                "normal: per-coordinate std (default 1e-5, as R3F)"})
    adv_sides: ChoiceEnum(["both", "source", "target"]) = field(
        default="both", metadata={"help": "which embeddings are perturbed: encoder input, decoder input, or both"})
    adv_kl: Optional[ChoiceEnum(["forward", "symmetric"])] = field(
        default=None, metadata={"help": "forward = KL(f(x) || f(x+delta)) as in the paper; "
                                "symmetric = (KL(p||q) + KL(q||p)) / 2 (default: symmetric for r3f, arch-rdrop "
                                "and --arch-recipe code, forward otherwise)"})
    adv_teacher: ChoiceEnum(["detach", "grad"]) = field(
        default="detach", metadata={"help": "the clean prediction f(x) in the KL of r3f / smart / arch / zero-delta: "
                                    "'detach' = a fixed teacher (the paper, the official code); 'grad' = gradients "
                                    "flow through both branches, as in R-Drop"})
    adv_probe_sentences: int = field(
        default=0, metadata={"help": "mechanism probe (--task arch_translation): at the start of every epoch >= 2, "
                             "rank 0 logs 'ARCH probe epoch E: ...' = the KL a fresh ascent, the cached rows, the "
                             "neighbour-rebuilt rows and random deltas of the same norm induce on this many "
                             "fixed training sentences (eval mode; RNG and parameters untouched); 0 = off"})
    adv_chunks: int = field(
        default=1, metadata={"help": "r3f / smart / arch / zero-delta with --task arch_translation: the perturbed "
                             "forward and its backward in this many sentence chunks, each backpropagated at once, "
                             "for peak memory (the clean CE's gradients plus one chunk's activations, instead of "
                             "the whole batch's); the same objective with other dropout masks, slower on a GPU "
                             "at small models; 1 = off"})
    seed: int = II("common.seed")
    # the model's precision: an R3F noise below its resolution is rounded away (methods/r3f.py)
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    tpu: bool = II("common.tpu")  # fairseq 0.12 sets it with --bf16 (validation.bf16_problem)


# --adv-eps, --adv-steps, --adv-step-size, --adv-kl when unset: the paper's App. B.1, or the
# official run.sh under --arch-recipe code (fairseq_arch/code_recipe.py)
RECIPE_DEFAULTS = {"text": {"adv_eps": 0.1, "adv_steps": 3, "adv_step_size": 0.1},
                   "code": {"adv_eps": CODE_EPS, "adv_steps": CODE_STEPS, "adv_step_size": CODE_STEP_SIZE,
                            "adv_kl": "symmetric"}}


def with_recipe_defaults(cfg, task):
    """``cfg`` (resolved) with the unset options of RECIPE_DEFAULTS filled for the task's
    ``--arch-recipe`` (which concerns the methods with ARCH's cache; ``text`` otherwise)."""
    recipe = str(getattr(getattr(task, "cfg", None), "arch_recipe", "text"))
    if not method_class(str(cfg.adv_method)).needs_cache:
        recipe = "text"
    options = OmegaConf.to_container(cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg), resolve=True)
    for key, value in RECIPE_DEFAULTS[recipe].items():
        if options.get(key) is None:
            options[key] = value
    return OmegaConf.create(options), recipe


def validate_adv_config(cfg) -> None:
    """Fail at start, naming the option."""
    refuse_non_finite(cfg, AdversarialLabelSmoothedCrossEntropyCriterionConfig)
    refuse_bf16_without_xla(cfg)
    for name, value, ok, want in (("--adv-lambda", cfg.adv_lambda, cfg.adv_lambda >= 0, ">= 0"),
                                  ("--adv-eps", cfg.adv_eps, cfg.adv_eps > 0, "> 0"),
                                  ("--adv-steps", cfg.adv_steps, cfg.adv_steps >= 0, ">= 0"),
                                  ("--adv-step-size", cfg.adv_step_size, cfg.adv_step_size > 0, "> 0"),
                                  ("--adv-probe-sentences", cfg.adv_probe_sentences, cfg.adv_probe_sentences >= 0, ">= 0"),
                                  ("--adv-chunks", cfg.adv_chunks, cfg.adv_chunks >= 1, ">= 1")):
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value}")
    if cfg.adv_init_scale is not None and cfg.adv_init_scale <= 0:
        raise ValueError(f"--adv-init-scale must be > 0, got {cfg.adv_init_scale}")


def refuse_chunks(method, task, teacher_grad: bool) -> None:
    """--adv-chunks splits the perturbed forward of a detached teacher's KL after the early
    clean backward: refused, naming why, where there is none."""
    if not (issubclass(method, KLRegularised) and method.detached_teacher):
        raise ValueError(f"--adv-chunks is for r3f, smart, arch and zero-delta (a fixed teacher), not --adv-method "
                         f"{method.name}, whose gradient flows through every forward")
    if teacher_grad:
        raise ValueError("--adv-chunks needs the fixed teacher: with --adv-teacher grad the gradient flows through "
                         "the clean forward too, so there is no early clean backward to build on")
    if not hasattr(task, "early_clean_backward"):
        raise ValueError("--adv-chunks needs --task arch_translation (its train_step backpropagates the clean CE "
                         f"early, which the chunks build on), got --task {type(task).__name__}")


@register_once(CRITERION_REGISTRY, register_criterion, "adversarial_label_smoothed_cross_entropy",
               AdversarialLabelSmoothedCrossEntropyCriterionConfig)
class AdversarialLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):

    def __init__(self, cfg: AdversarialLabelSmoothedCrossEntropyCriterionConfig, task):
        super().__init__(task, cfg.sentence_avg, cfg.label_smoothing, cfg.ignore_prefix_size, cfg.report_accuracy)
        cfg, self.recipe = with_recipe_defaults(cfg, task)
        validate_adv_config(cfg)
        method = method_class(str(cfg.adv_method))
        method.check_config(cfg, task)
        flags = getattr(task, "activation_checkpointing", None)  # set by arch_translation's build_model
        if flags and method.runs_ascent:
            refuse_activation_checkpointing(method.name, flags)
        if cfg.adv_probe_sentences > 0 and not hasattr(task, "arch_cache"):
            raise ValueError("--adv-probe-sentences needs --task arch_translation (the task runs the probe "
                             f"at its epoch starts), got --task {type(task).__name__}")
        self.adv_method = method.name
        self.adv_lambda = cfg.adv_lambda
        self.adv_kl = str(cfg.adv_kl) if cfg.adv_kl is not None else method.default_kl
        self.adv_probe_sentences = cfg.adv_probe_sentences
        self.teacher_grad = str(cfg.adv_teacher) == "grad"
        if self.teacher_grad and not method.detached_teacher:
            raise ValueError(f"--adv-teacher grad is for the methods with a clean teacher in their KL (r3f, smart, "
                             f"arch, zero-delta), not --adv-method {method.name}")
        self.adv_chunks = cfg.adv_chunks
        if cfg.adv_chunks > 1:
            refuse_chunks(method, task, self.teacher_grad)
        self.precision_flag = "--bf16" if cfg.bf16 else "--fp16" if cfg.fp16 else None
        self.space = PerturbationSpace.from_config(cfg, method.default_init)
        self.ascent = ProjectedAscent(self.space, cfg.adv_steps, AscentScaler(), method.name)
        self.dummy_batch = False  # a fairseq dummy batch: its ids never touch the cache
        self.early_backward = None  # armed by arch_translation's train_step (early_backward.py)
        self._log_softmax_models: Dict[int, bool] = {}  # id(model) -> log-probs are a log-softmax of the logits
        self.method = method(self)

    @property
    def sides(self):
        return self.space.sides

    def project(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``delta`` (B x T x C) onto the criterion's ball, padding 0."""
        return self.space.project(delta, mask)

    @contextlib.contextmanager
    def train_step_options(self, dummy_batch: bool = False, early_backward=None):
        """The task's train_step around its criterion call: a dummy batch (zero
        perturbation, no cache), and the early clean backward (early_backward.py)."""
        self.dummy_batch, self.early_backward = bool(dummy_batch), early_backward
        try:
            yield self
        finally:
            self.dummy_batch, self.early_backward = False, None

    def forward(self, model, sample, reduce=True):
        if not (model.training and reduce) or self.method.is_plain():
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
            if model.training:
                logging_output.update(adv_fwd=1, adv_bwd=1, adv_batches=1)
            return loss, sample_size, logging_output
        result = self.method.train(model, sample)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        return result.total, sample_size, self.logging_output(model, sample, result, sample_size)

    def logging_output(self, model, sample, result: StepResult, sample_size) -> dict:
        # a tensor on every rank and batch, also with no delta (a skipped regulariser):
        # fairseq syncs tensor and float log values in separate buffers, so a float on one
        # rank and a tensor on another is a collective size mismatch (gloo aborts)
        norm_sum, norm_count = torch.zeros((), dtype=torch.float32, device=result.total.device), 0
        masks = padding_masks(sample["net_input"], self.padding_idx)
        for side, d in result.delta.items():
            norms = sentence_norms(d, masks[side])
            norm_sum = norm_sum + norms.sum()  # a tensor: summed by fairseq, no sync here
            norm_count += norms.numel()
        out = {"loss": result.total.data, "ls_loss": result.ls_loss.data, "nll_loss": result.nll_loss.data,
               "adv_loss": result.reg.data, "adv_delta_norm": norm_sum, "adv_delta_count": norm_count,
               "adv_fwd": result.fwd, "adv_bwd": result.bwd, "adv_batches": 1, "ntokens": sample["ntokens"],
               "nsentences": sample["target"].size(0), "sample_size": sample_size, **result.stats()}
        if self.report_accuracy and result.net_output is not None:
            n_correct, total = self.compute_accuracy(model, result.net_output, sample)
            out["n_correct"] = utils.item(n_correct.data)
            out["total"] = utils.item(total.data)
        return out

    # -- what the methods share ---------------------------------------------------

    def perturbed_forward(self, model, net_input, delta: Dict[str, torch.Tensor]):
        """``model(**net_input)`` with ``delta`` (side -> B x T x C) added to the embedding lookups."""
        src, prev = net_input["src_tokens"], net_input["prev_output_tokens"]
        d_src, d_tgt = delta.get("source"), delta.get("target")
        with perturbed_embeddings(model, src, prev, d_src, d_tgt) as applied:
            out = model(**net_input)
        check_applied(applied, d_src, d_tgt)
        return out

    def lprobs_fp32(self, model, net_output, sample):
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        return lprobs.float(), target

    def teacher(self, lprobs: torch.Tensor, target: torch.Tensor, sample) -> Teacher:
        """The batch's detached clean prediction, real target rows only (N x V float32).
        The real-token count is fairseq's ``ntokens`` (no sync) unless a prefix is cut."""
        count = sample.get("ntokens") if self.ignore_prefix_size == 0 else None
        return Teacher(lprobs, target.ne(self.padding_idx), count, keep_graph=self.teacher_grad)

    def divergence(self, model, net_output, sample, teacher: Teacher, through_teacher: bool = False) -> torch.Tensor:
        """``--adv-kl`` divergence of a perturbed forward's output from the teacher, summed
        over real target tokens: from the logits where the model's log-probs are a plain
        log-softmax of them (no vocabulary-sized temporaries kept for the backward), else
        from the model's own log-probs (adaptive softmax, a decoder of its own);
        ``through_teacher``: the gradient flows into the teacher too (--adv-teacher grad)."""
        key = id(model)
        if key not in self._log_softmax_models:
            self._log_softmax_models[key] = log_probs_are_log_softmax(model, net_output)
        if self._log_softmax_models[key]:
            logits = net_output[0][:, self.ignore_prefix_size:, :]  # cut as get_lprobs_and_target cuts
            return teacher.divergence(logits, self.adv_kl, logits=True, through_teacher=through_teacher)
        student, _ = self.lprobs_fp32(model, net_output, sample)
        return teacher.divergence(student, self.adv_kl, through_teacher=through_teacher)

    def fresh_perturbation(self, core, sample, teacher: Teacher, masks, key: int, sides=None, counts=None,
                           init=None, move=None):
        """A fresh ascent on the batch (the unwrapped ``core``), from the seeded start ``key``
        (or ``init``), of every perturbed side or of ``sides`` only: the ascent of smart and of
        ARCH's refresh (``move``: see ProjectedAscent.run)."""
        counts = {"fwd": 0, "bwd": 0} if counts is None else counts
        ascent = self.ascent if sides is None else self.ascent.with_space(self.space.with_sides(sides))
        return ascent.run(core, sample, masks, key, AscentObjective(self, core, sample, teacher, counts), counts,
                          init=init, move=move)

    # -- metrics -------------------------------------------------------------------

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        ntokens, batches = total("ntokens"), total("adv_batches")
        if batches == 0:
            return  # validation: plain label-smoothed loss only
        if any("ls_loss" in log for log in logging_outputs):
            sample_size = total("sample_size")
            metrics.log_scalar("ls_loss", total("ls_loss") / sample_size / math.log(2), sample_size, round=3)
            metrics.log_scalar("adv_loss", total("adv_loss") / ntokens / math.log(2), ntokens, round=4)
        count = total("adv_delta_count")
        if count > 0:
            metrics.log_scalar("adv_delta_norm", total("adv_delta_norm") / count, count, round=4)
        metrics.log_scalar("adv_fwd_per_batch", total("adv_fwd") / batches, batches, round=2)
        metrics.log_scalar("adv_bwd_per_batch", total("adv_bwd") / batches, batches, round=2)
        for key in ("arch_fresh", "arch_cached", "arch_rebuilt", "adv_skipped"):
            metrics.log_scalar_sum(key, total(key), round=0)
        # Fig. 3: variance of the global gradient norm. fairseq logs this update's "gnorm"
        # just before it reduces the criterion's metrics; its square too, so that every
        # aggregation (log interval, epoch) has E[g^2] - E[g]^2.
        gnorm = _latest_gnorm()
        if gnorm is not None:
            metrics.log_scalar("gnorm_sq", gnorm ** 2, priority=401, round=3)
            metrics.log_derived("gnorm_var", _gnorm_var, priority=402)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _latest_gnorm():
    """The gradient norm fairseq logged for the update being reduced (None if it logged
    none since the last reduction, e.g. a skipped non-finite update)."""
    for agg in metrics.get_active_aggregators():
        meter = agg.get("gnorm")
        if meter is not None and getattr(meter, "count", 0):
            key = (id(agg), meter.count)
            if key == getattr(_latest_gnorm, "seen", None):
                return None
            _latest_gnorm.seen = key
            return float(meter.val)
    return None


def _gnorm_var(meters) -> float:
    if "gnorm" not in meters or "gnorm_sq" not in meters:
        return float("nan")
    return round(max(float(meters["gnorm_sq"].avg) - float(meters["gnorm"].avg) ** 2, 0.0), 5)
