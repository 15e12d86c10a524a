"""Criterion ``adversarial_label_smoothed_cross_entropy``:
label-smoothed CE on the clean input + ``lambda * KL(f(x) || f(x + delta))``.

``delta`` perturbs the token-embedding lookup of the source and of the decoder
input (before the sqrt(d) scale). With ``--task arch_translation`` it comes from
ARCH's cache: fresh projected gradient ascent on refresh epochs, cache reads and
neighbour rebuilds on the others.

Forward/backward counting (used in the logs and asserted in the tests): every call
of the model is one forward; every gradient computation is one backward (each
``torch.autograd.grad`` of an ascent step, plus the trainer's ``loss.backward()``).
Per batch, with S ascent steps:

    refresh epoch:  S + 2 forwards (clean, S ascent, final perturbed), S + 1 backwards
    reuse epoch:    2 forwards (clean, perturbed),                     1 backward

Table 1 of the paper counts one forward fewer on refresh epochs
(2 + (S-1)/Tc amortised), i.e. it does not count the forward at the random start.
"""

import math
from types import SimpleNamespace
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
from omegaconf import II

from ..injection import check_applied, perturbed_embeddings, unwrap_model
from ..perturbation import ascent_step, divergence, project, seeded_init, sentence_norms

SIDE_IDS = {"source": 0, "target": 1}


@dataclass
class AdversarialLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    adv_lambda: float = field(default=1.0, metadata={"help": "lambda: weight of the adversarial regularizer; 0 = plain label smoothing"})
    adv_eps: float = field(default=0.1, metadata={"help": "epsilon: radius of the perturbation ball"})
    adv_steps: int = field(default=3, metadata={"help": "S: projected gradient ascent steps per fresh perturbation"})
    adv_step_size: float = field(default=0.1, metadata={"help": "eta: ascent step size (the step is eta * g / ||g||)"})
    adv_norm: ChoiceEnum(["l2", "linf"]) = field(default="l2", metadata={"help": "norm of the perturbation ball"})
    adv_granularity: ChoiceEnum(["sentence", "word"]) = field(
        default="sentence", metadata={"help": "one ball per sentence (paper) or one per token"})
    adv_init: ChoiceEnum(["uniform", "normal"]) = field(
        default="uniform", metadata={"help": "initial perturbation: uniform in the ball, or gaussian"})
    adv_init_scale: Optional[float] = field(
        default=None, metadata={"help": "uniform: radius of the init ball (default --adv-eps); "
                                "normal: per-coordinate std (default 1e-5)"})
    adv_sides: ChoiceEnum(["both", "source", "target"]) = field(
        default="both", metadata={"help": "which embeddings are perturbed: encoder input, decoder input, or both"})
    adv_kl: ChoiceEnum(["forward", "symmetric"]) = field(
        default="forward", metadata={"help": "forward = KL(f(x) || f(x+delta)) as in the paper; "
                                     "symmetric = (KL(p||q) + KL(q||p)) / 2"})
    seed: int = II("common.seed")


def validate_adv_config(c) -> None:
    if c.adv_lambda < 0:
        raise ValueError(f"--adv-lambda must be >= 0, got {c.adv_lambda}")
    if c.adv_eps <= 0:
        raise ValueError(f"--adv-eps must be > 0, got {c.adv_eps}")
    if c.adv_steps < 0:
        raise ValueError(f"--adv-steps must be >= 0, got {c.adv_steps}")
    if c.adv_step_size <= 0:
        raise ValueError(f"--adv-step-size must be > 0, got {c.adv_step_size}")
    if c.adv_init_scale is not None and c.adv_init_scale <= 0:
        raise ValueError(f"--adv-init-scale must be > 0, got {c.adv_init_scale}")


def _register(name, dataclass):
    if name in CRITERION_REGISTRY:  # imported twice (pip install -e . + --user-dir)
        return lambda cls: cls
    return register_criterion(name, dataclass=dataclass)


@_register("adversarial_label_smoothed_cross_entropy", AdversarialLabelSmoothedCrossEntropyCriterionConfig)
class AdversarialLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    uses_arch_cache = True

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        adv_lambda=1.0,
        adv_eps=0.1,
        adv_steps=3,
        adv_step_size=0.1,
        adv_norm="l2",
        adv_granularity="sentence",
        adv_init="uniform",
        adv_init_scale=None,
        adv_sides="both",
        adv_kl="forward",
        seed=1,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        validate_adv_config(SimpleNamespace(
            adv_lambda=adv_lambda, adv_eps=adv_eps, adv_steps=adv_steps, adv_step_size=adv_step_size,
            adv_init_scale=adv_init_scale))
        if not hasattr(task, "arch_cache"):
            raise ValueError(
                "--criterion adversarial_label_smoothed_cross_entropy runs ARCH, which needs its cache: "
                f"use --task arch_translation (got --task {type(task).__name__})"
            )
        self.adv_lambda = adv_lambda
        self.adv_eps = adv_eps
        self.adv_steps = adv_steps
        self.adv_step_size = adv_step_size
        self.adv_norm = str(adv_norm)
        self.adv_granularity = str(adv_granularity)
        self.adv_init = str(adv_init)
        if adv_init_scale is None:
            adv_init_scale = adv_eps if self.adv_init == "uniform" else 1e-5
        self.adv_init_scale = adv_init_scale
        self.sides = ["source", "target"] if str(adv_sides) == "both" else [str(adv_sides)]
        self.adv_kl = str(adv_kl)
        self.seed = seed
        self.dummy_batch = False  # set by the task for fairseq's dummy batches

    # -- helpers ---------------------------------------------------------------

    def project(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return project(delta, mask, self.adv_eps, self.adv_norm, self.adv_granularity)

    def _lprobs_fp32(self, model, net_output, sample):
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        return lprobs.float(), target

    def _perturbed_forward(self, model, net_input, delta: Dict[str, torch.Tensor]):
        src, prev = net_input["src_tokens"], net_input["prev_output_tokens"]
        d_src, d_tgt = delta.get("source"), delta.get("target")
        with perturbed_embeddings(model, src, prev, d_src, d_tgt) as applied:
            out = model(**net_input)
        check_applied(applied, d_src, d_tgt)
        return out

    def _ascent(self, core, sample, teacher, tgt_mask, masks, epoch, counts):
        """Fresh perturbations: seeded init in the ball, then S projected ascent steps
        on the divergence, with gradients w.r.t. delta only (parameter .grad and DDP
        hooks are not touched: ``core`` is the unwrapped model)."""
        ids = sample["id"].tolist()
        dims = {"source": core.encoder.embed_tokens.embedding_dim,
                "target": core.decoder.embed_tokens.embedding_dim}
        delta = {}
        for side in self.sides:
            d = seeded_init(ids, masks[side].cpu(), dims[side], self.seed, epoch, SIDE_IDS[side],
                            self.adv_init, self.adv_init_scale, self.adv_norm, self.adv_granularity)
            delta[side] = self.project(d.to(masks[side].device), masks[side])
        # fp16 models: scale the objective so the ascent gradient does not underflow;
        # the normalised step g/||g|| is invariant to the scale.
        half = next(core.parameters()).dtype == torch.float16
        scale = 1024.0 if half else 1.0
        for _ in range(self.adv_steps):
            for side in self.sides:
                delta[side] = delta[side].detach().requires_grad_(True)
            out = self._perturbed_forward(core, sample["net_input"], delta)
            counts["fwd"] += 1
            student, _ = self._lprobs_fp32(core, out, sample)
            obj = divergence(teacher, student, tgt_mask, self.adv_kl) * scale
            grads = torch.autograd.grad(obj, [delta[s] for s in self.sides])
            counts["bwd"] += 1
            for side, g in zip(self.sides, grads):
                if not torch.isfinite(g).all():
                    raise FloatingPointError("non-finite ascent gradient")
                delta[side] = ascent_step(delta[side].detach(), g, masks[side], self.adv_eps,
                                          self.adv_step_size, self.adv_norm, self.adv_granularity)
        return {s: d.detach() for s, d in delta.items()}

    # -- main ------------------------------------------------------------------

    def forward(self, model, sample, reduce=True):
        if not (model.training and reduce and self.adv_lambda > 0):
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
            if model.training:
                logging_output.update(adv_fwd=1, adv_bwd=1, adv_batches=1)
            return loss, sample_size, logging_output

        cache = self.task.arch_cache
        assert cache is not None and cache.mode is not None, "arch cache not started (begin_epoch not called?)"
        counts = {"fwd": 0, "bwd": 0}
        net_input = sample["net_input"]
        core = unwrap_model(model)

        net_output = model(**net_input)  # clean forward, through the DDP wrapper
        counts["fwd"] += 1
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        teacher, target = self._lprobs_fp32(model, net_output, sample)
        teacher = teacher.detach()
        tgt_mask = target.ne(self.padding_idx)
        masks = {"source": net_input["src_tokens"].ne(self.padding_idx),
                 "target": net_input["prev_output_tokens"].ne(self.padding_idx)}
        ids = sample["id"].tolist()
        n = len(ids)

        stats = {"arch_fresh": 0, "arch_cached": 0, "arch_rebuilt": 0, "adv_skipped": 0}
        skip = False
        if self.dummy_batch:
            # never read or write the cache with a dummy batch's ids; zero perturbation
            delta = {s: masks[s].new_zeros(*masks[s].shape, 1).float().expand(-1, -1, d).contiguous()
                     for s, d in (("source", core.encoder.embed_tokens.embedding_dim),
                                  ("target", core.decoder.embed_tokens.embedding_dim)) if s in self.sides}
        elif cache.mode == "refresh":
            try:
                fresh = self._ascent(core, sample, teacher, tgt_mask, masks, cache.epoch, counts)
            except FloatingPointError:
                fresh, skip = None, True
            if fresh is not None:
                delta = {s: cache.store_fresh(ids, s, fresh[s], masks[s], self.project) for s in self.sides}
                stats["arch_fresh"] = n
        else:
            delta = {}
            for s in self.sides:
                delta[s], n_cached, n_rebuilt = cache.read(ids, s, masks[s], self.project)
            stats["arch_cached"], stats["arch_rebuilt"] = n_cached, n_rebuilt

        reg = loss.new_zeros(())
        norm_sum, norm_count = 0.0, 0
        if not skip:
            adv_output = self._perturbed_forward(model, net_input, delta)
            counts["fwd"] += 1
            student, _ = self._lprobs_fp32(model, adv_output, sample)
            reg = divergence(teacher, student, tgt_mask, self.adv_kl)
            if not torch.isfinite(reg):
                # never let a non-finite regulariser poison the model: drop it, count it
                reg, skip = loss.new_zeros(()), True
            for s in self.sides:
                norms = sentence_norms(delta[s], masks[s])
                norm_sum += float(norms.sum())
                norm_count += norms.numel()
        stats["adv_skipped"] = int(skip)
        counts["bwd"] += 1  # the trainer's backward of the total loss

        total = loss + self.adv_lambda * reg.to(loss.dtype)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": total.data,
            "ls_loss": loss.data,
            "nll_loss": nll_loss.data,
            "adv_loss": reg.data,
            "adv_delta_norm": norm_sum,
            "adv_delta_count": norm_count,
            "adv_fwd": counts["fwd"],
            "adv_bwd": counts["bwd"],
            "adv_batches": 1,
            "ntokens": sample["ntokens"],
            "nsentences": n,
            "sample_size": sample_size,
            **stats,
        }
        if self.report_accuracy:
            n_correct, tot = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(tot.data)
        return total, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        ntokens = total("ntokens")
        batches = total("adv_batches")
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

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
