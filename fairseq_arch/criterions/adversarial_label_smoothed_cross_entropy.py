"""Criterion ``adversarial_label_smoothed_cross_entropy``: label-smoothed CE plus an
adversarial regularizer on the token embeddings, for every method of the paper's
tables (``--adv-method``), through one perturbation/injection code path:

- ``none``:   label-smoothed CE only.
- ``r3f``:    CE + lambda * KL(f(x) || f(x + noise)), random noise, no ascent
              (Aghajanyan et al. 2020; symmetric KL by default).
- ``smart``:  CE + lambda * KL(f(x) || f(x + delta)), delta by S projected ascent steps
              every update (the adversarial part of Jiang et al. 2020).
- ``freelb``: mean over t = 0..S of CE(x + delta_t), delta_{t+1} = Proj(delta_t + eta g/||g||)
              with g the CE gradient; parameter gradients of all S+1 steps accumulate
              into one backward ("free" large batch, Zhu et al. 2020). No clean term.
- ``arch``:   as smart on refresh epochs, cached/rebuilt perturbations on the others
              (needs ``--task arch_translation``).
- ``rdrop``:  R-Drop (Liang et al., NeurIPS 2021): two forwards of the same batch with
              dropout on (different masks), no perturbation, no cache; the label-smoothed
              CE of both plus alpha * symmetric KL between the two predictions, gradients
              through both. alpha = ``--adv-lambda`` (their IWSLT'14 De-En setting: 5).
              Scale convention: see :meth:`_rdrop`.
``--adv-lambda 0`` turns every method into ``none`` exactly.

delta perturbs the token-embedding lookup of the source and of the decoder input
(before the sqrt(d) scale). The clean prediction f(x) is a fixed (detached) teacher.

Forward/backward counting (logged, and asserted in the tests): every model call is a
forward; every gradient computation is a backward (each ``torch.autograd.grad`` of an
ascent step plus the trainer's ``loss.backward()``). Per batch, S = ``--adv-steps``:

    none   1 forward,   1 backward        r3f     2 forwards, 1 backward
    smart  S+2, S+1                       freelb  S+1, S+1
    arch   refresh epoch S+2, S+1;  other epochs 2, 1
    rdrop  2, 1

The paper's Table 1 counts one forward fewer for smart and for ARCH's refresh epochs
(it does not count the forward at the random start): SMART 1+S, ARCH 2+(S-1)/Tc.
"""

import contextlib
import logging
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
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from omegaconf import II

from ..injection import check_applied, checkpointed, perturbed_embeddings, unwrap_model
from ..perturbation import Teacher, ascent_step, divergence, project, seeded_init, sentence_norms

logger = logging.getLogger(__name__)

SIDE_IDS = {"source": 0, "target": 1}

# methods that take gradients w.r.t. delta with torch.autograd.grad (their ascent)
ASCENT_METHODS = ("smart", "freelb", "arch")


METHODS = ("none", "r3f", "smart", "freelb", "arch", "rdrop")


@dataclass
class AdversarialLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    adv_method: ChoiceEnum(list(METHODS)) = field(
        default="arch", metadata={"help": "regularization method: none | r3f | smart | freelb | arch | rdrop "
                                  "(arch needs --task arch_translation; rdrop = R-Drop, two dropout "
                                  "forwards + --adv-lambda (R-Drop's alpha) x symmetric KL, no perturbation)"})
    adv_lambda: float = field(default=1.0, metadata={"help": "lambda: weight of the adversarial regularizer; 0 = plain label "
                                                    "smoothing. rdrop: R-Drop's alpha (their IWSLT'14 De-En setting: 5)"})
    adv_eps: float = field(default=0.1, metadata={"help": "epsilon: radius of the perturbation ball"})
    adv_steps: int = field(default=3, metadata={"help": "S: projected gradient ascent steps per fresh perturbation"})
    adv_step_size: float = field(default=0.1, metadata={"help": "eta: ascent step size (the step is eta * g / ||g||)"})
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
                                "symmetric = (KL(p||q) + KL(q||p)) / 2 (default: symmetric for r3f, "
                                "forward otherwise)"})
    adv_probe_sentences: int = field(
        default=0, metadata={"help": "mechanism probe: at the start of every epoch >= 2, rank 0 logs "
                             "'ARCH probe epoch E: ...' = the KL a fresh ascent, the cached rows, the "
                             "neighbour-rebuilt rows and random deltas of the same norm induce on this many "
                             "fixed training sentences (eval mode; RNG and parameters untouched); 0 = off"})
    seed: int = II("common.seed")
    # the model's precision: an R3F noise below its resolution is rounded away (see _warn_precision)
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")


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
    if c.adv_method not in METHODS:
        raise ValueError(f"--adv-method must be one of {METHODS}, got {c.adv_method!r}")
    if c.adv_method == "freelb" and c.adv_steps < 1:
        raise ValueError("--adv-method freelb needs --adv-steps >= 1 (its ascent steps)")


def _latest_gnorm():
    """The gradient norm fairseq logged for the update being reduced (None if it
    logged none, e.g. a skipped non-finite update)."""
    for agg in metrics.get_active_aggregators():
        meter = agg.get("gnorm")
        if meter is not None and getattr(meter, "count", 0):
            key = (id(agg), meter.count)
            if key == getattr(_latest_gnorm, "seen", None):
                return None  # no new gnorm since the last reduction
            _latest_gnorm.seen = key
            return float(meter.val)
    return None


def _gnorm_var(meters) -> float:
    if "gnorm" not in meters or "gnorm_sq" not in meters:
        return float("nan")
    return round(max(float(meters["gnorm_sq"].avg) - float(meters["gnorm"].avg) ** 2, 0.0), 5)


# -- precision, activation checkpointing (issue 11) --------------------------------------

# The ascent objective's scale when the backward runs in fp16 (--fp16, --amp): dynamic, as
# torch's GradScaler, which starts at the same 2**15.
ASCENT_SCALE_INIT = 2.0 ** 15
ASCENT_SCALE_RETRIES = 4  # halvings (each a re-run of the ascent) before a batch is skipped
ASCENT_SCALE_GROWTH = 200  # clean ascents in a row after which a reduced scale doubles back

# R3F's noise against the model's precision. Measured (transformer_iwslt_de_en dims, C = 512,
# fairseq's init; the noise as it reaches the layer-0 input embed_scale * (lookup + noise) +
# positions, computed in the model's dtype): coordinates changed / cosine with the noise
#   std 1e-5 (R3F's):  bf16  1.9% / 0.12    fp16 23.1% / 0.61
#   std 1e-4:          bf16 28.8% / 0.67    fp16 83.1% / 0.98
#   std 1e-3:          bf16 86.4% / 0.985   fp16 98.3% / 1.00
# Below about finfo(dtype).eps / 8 (bf16 9.8e-4, fp16 1.2e-4) most of it is rounded away.
# (--amp keeps the parameters, the lookup and the residual stream in fp32.)
NOISE_FLOOR = {"--bf16": torch.finfo(torch.bfloat16).eps / 8, "--fp16": torch.finfo(torch.float16).eps / 8}


def refuse_activation_checkpointing(method: str, flags) -> None:
    """fairseq's activation checkpointing (reentrant) raises on torch.autograd.grad, which
    the ascent of smart / freelb / arch takes w.r.t. delta: refuse it with the flag's name
    instead of crashing in the first batch."""
    if method in ASCENT_METHODS:
        raise ValueError(
            f"--adv-method {method} cannot run with {' / '.join(flags)}: fairseq's activation "
            "checkpointing refuses torch.autograd.grad, which the ascent needs for its gradient "
            f"w.r.t. delta. Drop {' / '.join(flags)} (or use --adv-method r3f, rdrop or none: no ascent)")


def fp16_backward(model) -> bool:
    """Whether ``model``'s backward runs in fp16 (fp16 parameters, --fp16; or fp16 autocast on
    its device, --amp), where small gradients underflow. bf16 has fp32's exponent range."""
    p = next(model.parameters())
    if p.dtype == torch.float16:
        return True
    device = p.device.type
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    except (TypeError, AttributeError):  # torch < 2.4: no device_type argument
        if device == "cuda":
            return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.float16
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.float16


def _warn_precision(crit, flag: Optional[str]) -> None:
    """At start: --bf16 / --fp16 with an R3F noise below the dtype's resolution (NOISE_FLOOR)."""
    if flag is None or crit.adv_method != "r3f" or crit.adv_init != "normal":
        return
    floor = NOISE_FLOOR[flag]
    if crit.adv_init_scale < floor:
        logger.warning(
            f"--adv-method r3f with {flag}: its noise (std {crit.adv_init_scale:g}, --adv-init-scale) is "
            f"below {flag[2:]}'s resolution at the embeddings it is added to: most of it is rounded away "
            f"(measured at std 1e-5 with C=512: bf16 changes 1.9% of the layer-0 input's coordinates, fp16 23%). "
            f"Use --adv-init-scale {floor:.0e} or more, or --amp / fp32, which keep the embeddings in fp32")


@contextlib.contextmanager
def frozen_parameters(model):
    """The ascent's forwards with ``requires_grad`` off on every parameter (restored after):
    the ascent needs d KL / d delta only, and autograd then keeps only what that gradient
    needs (a linear layer keeps its weight, not its input, which the weight's gradient would
    need), so the ascent's graph holds a fraction of a training forward's activations
    (peak memory, issue 11). The gradient w.r.t. delta is the same computation either way.
    ``model`` is the unwrapped model: no DDP hook or parameter ``.grad`` is involved."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def plain_log_softmax(model) -> bool:
    """Whether ``model.get_normalized_probs(out, log_probs=True)`` is fairseq's plain
    float32 log-softmax of ``out[0]``: no adaptive softmax, and neither the model nor its
    decoder overrides fairseq's get_normalized_probs (then the divergence can be taken from
    the logits, see AdversarialLabelSmoothedCrossEntropyCriterion._divergence)."""
    from fairseq.models import BaseFairseqModel, FairseqDecoder

    core = unwrap_model(model)
    decoder = getattr(core, "decoder", None)
    if not isinstance(core, BaseFairseqModel) or not isinstance(decoder, FairseqDecoder):
        return False
    if getattr(decoder, "adaptive_softmax", None) is not None:
        return False
    same = lambda obj, base, name: getattr(type(obj), name) is getattr(base, name)  # noqa: E731
    # (transformer's get_normalized_probs is overridden only to delegate, for TorchScript;
    # the criterion also compares the two on its first batch, see _divergence)
    return (same(core, BaseFairseqModel, "get_normalized_probs_scriptable")
            and same(decoder, FairseqDecoder, "get_normalized_probs")
            and same(decoder, FairseqDecoder, "get_normalized_probs_scriptable"))


def _register(name, dataclass):
    if name in CRITERION_REGISTRY:  # imported twice (pip install -e . + --user-dir)
        return lambda cls: cls
    return register_criterion(name, dataclass=dataclass)


@_register("adversarial_label_smoothed_cross_entropy", AdversarialLabelSmoothedCrossEntropyCriterionConfig)
class AdversarialLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):

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
        adv_init=None,
        adv_init_scale=None,
        adv_sides="both",
        adv_kl=None,
        adv_method="arch",
        adv_probe_sentences=0,
        seed=1,
        fp16=False,
        bf16=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        adv_method = str(adv_method)
        validate_adv_config(SimpleNamespace(
            adv_lambda=adv_lambda, adv_eps=adv_eps, adv_steps=adv_steps, adv_step_size=adv_step_size,
            adv_init_scale=adv_init_scale, adv_method=adv_method))
        if adv_method == "arch" and not hasattr(task, "arch_cache"):
            raise ValueError(
                "--adv-method arch (the default) needs its cache: use --task arch_translation "
                f"(got --task {type(task).__name__}); none, r3f, smart, freelb and rdrop run with any translation task"
            )
        self.adv_method = adv_method
        if adv_init is None:
            adv_init = "normal" if adv_method == "r3f" else "uniform"
        if adv_kl is None:
            adv_kl = "symmetric" if adv_method == "r3f" else "forward"
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
        self._batches_seen = 0  # seeds fresh noise when the task has no epoch (plain translation)
        if adv_probe_sentences < 0:
            raise ValueError(f"--adv-probe-sentences must be >= 0, got {adv_probe_sentences}")
        self.adv_probe_sentences = adv_probe_sentences
        if adv_probe_sentences > 0:
            self._install_probe_hook(task)
        flags = getattr(task, "activation_checkpointing", None)  # set by arch_translation's build_model
        if flags:
            refuse_activation_checkpointing(adv_method, flags)
        self._checked_models = set()  # ids of models checked for activation checkpointing
        self._logits_checked = {}  # id(model) -> whether its log-probs are a log-softmax of its logits
        _warn_precision(self, "--bf16" if bf16 else "--fp16" if fp16 else None)
        # --amp / --fp16: the ascent objective is multiplied by a scale of its own, so that
        # its gradient survives the fp16 backward (see _ascent_scale)
        self._ascent_scale_now = ASCENT_SCALE_INIT
        self._ascent_clean_runs = 0

    def _install_probe_hook(self, task) -> None:
        """--adv-probe-sentences: run fairseq_arch.probe after the task's own begin_epoch
        (fairseq calls it on every rank with the unwrapped model, once per epoch, after
        the cache has advanced). Wraps this task instance's method, any task class."""
        if getattr(task, "_adv_probe_criterion", None) is None:
            inner = task.begin_epoch

            def begin_epoch(epoch, model):
                inner(epoch, model)
                from ..probe import log_probe

                crit = task._adv_probe_criterion
                log_probe(task, model, crit, epoch, crit.adv_probe_sentences)

            task.begin_epoch = begin_epoch
        task._adv_probe_criterion = self  # the last criterion built for the task probes

    @property
    def uses_arch_cache(self) -> bool:
        return self.adv_method == "arch"

    # -- helpers ---------------------------------------------------------------

    def project(self, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return project(delta, mask, self.adv_eps, self.adv_norm, self.adv_granularity)

    def _lprobs_fp32(self, model, net_output, sample):
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        return lprobs.float(), target

    def _teacher(self, lprobs: torch.Tensor, tgt_mask: torch.Tensor, sample) -> Teacher:
        """The batch's detached clean prediction, real target rows only (N x V float32)."""
        return Teacher(lprobs, tgt_mask, self._real_tokens(sample))

    def _divergence(self, model, net_output, sample, teacher: Teacher) -> torch.Tensor:
        """``--adv-kl`` divergence of a perturbed forward's output from the teacher, summed
        over real target tokens. From the logits where the model's log-probs are a plain
        log-softmax of them (Teacher.divergence(logits=True): no vocabulary-sized
        temporaries kept for the backward), else from the model's own log-probs (adaptive
        softmax, a decoder with its own get_normalized_probs)."""
        if self._logits_checked.get(id(model)) is None:
            self._logits_checked[id(model)] = self._log_softmax_of_logits(model, net_output)
        if self._logits_checked[id(model)]:
            # the logits get_lprobs_and_target's log-probs are a log-softmax of, cut as it cuts
            logits = net_output[0][:, self.ignore_prefix_size:, :]
            return teacher.divergence(logits, self.adv_kl, logits=True)
        student, _ = self._lprobs_fp32(model, net_output, sample)
        return teacher.divergence(student, self.adv_kl)

    @staticmethod
    def _log_softmax_of_logits(model, net_output) -> bool:
        """Once per model: plain_log_softmax's structural check, confirmed on the numbers of
        one sentence (the whole batch would cost vocabulary-sized tensors)."""
        same = False
        if plain_log_softmax(model):
            with torch.no_grad():
                one = net_output[0][:1]
                try:
                    lprobs = model.get_normalized_probs((one,) + tuple(net_output[1:]), log_probs=True)
                    same = torch.allclose(lprobs.float(), torch.log_softmax(one.float(), -1), rtol=1e-4, atol=1e-4)
                except Exception:  # a decoder whose normalisation needs the whole batch
                    same = False
        if not same:
            logger.info("the model's log-probs are not a log-softmax of its logits: the "
                        "divergence is taken from the log-probs (more memory)")
        return same

    def _perturbed_forward(self, model, net_input, delta: Dict[str, torch.Tensor]):
        src, prev = net_input["src_tokens"], net_input["prev_output_tokens"]
        d_src, d_tgt = delta.get("source"), delta.get("target")
        with perturbed_embeddings(model, src, prev, d_src, d_tgt) as applied:
            out = model(**net_input)
        check_applied(applied, d_src, d_tgt)
        return out

    def _noise_key(self) -> int:
        """The "epoch" part of a sample's init seed: the epoch with arch_translation
        (same noise for a sample whatever rank/batch it is in), else a batch counter."""
        cache = getattr(self.task, "arch_cache", None)
        if cache is not None and cache.epoch is not None:
            return cache.epoch
        return 1_000_000 + self._batches_seen

    def _init(self, core, sample, masks, key, project_to_ball=True):
        """Seeded initial perturbation of every perturbed side (B x T x C, fp32), generated
        on the batch's device from the ids there (no host round trip)."""
        dims = {"source": core.encoder.embed_tokens.embedding_dim,
                "target": core.decoder.embed_tokens.embedding_dim}
        delta = {}
        for side in self.sides:
            d = seeded_init(sample["id"], masks[side], dims[side], self.seed, key, SIDE_IDS[side],
                            self.adv_init, self.adv_init_scale, self.adv_norm, self.adv_granularity)
            delta[side] = self.project(d, masks[side]) if project_to_ball else d
        return delta

    def _real_tokens(self, sample) -> Optional[int]:
        """The number of real target tokens as the host knows it (fairseq's ntokens), for
        :func:`divergence` to drop the padding rows without a sync; None where the
        target the loss sees is not the whole target (--ignore-prefix-size)."""
        return sample.get("ntokens") if self.ignore_prefix_size == 0 else None

    def _check_checkpointing(self, core) -> None:
        """Any task (arch_translation refuses it at start, in build_model): the first ascent
        on a model with fairseq's activation checkpointing raises, naming the flag."""
        if id(core) not in self._checked_models:
            if checkpointed(core):
                refuse_activation_checkpointing(self.adv_method, ["--checkpoint-activations", "--offload-activations"])
            self._checked_models.add(id(core))

    def _ascent_scale(self, core) -> float:
        """The factor on the ascent's objective: 1, but for an fp16 backward (--fp16, --amp),
        where the KL's gradient w.r.t. delta (about 1e-4 in norm, spread over B x T x C
        coordinates) underflows and the ascent would not move: there a dynamic scale of our
        own (halved on a non-finite ascent, see _ascent_done). The normalised step
        g / ||g|| does not depend on it."""
        return self._ascent_scale_now if fp16_backward(core) else 1.0

    def _step(self, delta, grads, masks, finite=None):
        """One projected ascent step of every side. ``finite`` accumulates, on the device,
        whether every gradient so far was finite: one check per ascent (_ascent_done), not a
        host-device sync per step."""
        out = {}
        for side, g in zip(self.sides, grads):
            ok = torch.isfinite(g).all()
            finite = ok if finite is None else finite & ok
            out[side] = ascent_step(delta[side].detach(), g, masks[side], self.adv_eps,
                                    self.adv_step_size, self.adv_norm, self.adv_granularity)
        return out, finite

    def _ascent_done(self, finite, scale: float) -> bool:
        """Whether an ascent ran on finite gradients (one sync). With a scale > 1 a
        non-finite one halves the scale for a retry (False); a clean run of
        ASCENT_SCALE_GROWTH ascents doubles it back. Raises FloatingPointError (the caller
        skips the batch) when no retry is left."""
        if finite is None or bool(finite):
            if scale > 1.0 and self._ascent_scale_now < ASCENT_SCALE_INIT:
                self._ascent_clean_runs += 1
                if self._ascent_clean_runs >= ASCENT_SCALE_GROWTH:
                    self._ascent_scale_now, self._ascent_clean_runs = self._ascent_scale_now * 2, 0
            return True
        self._ascent_clean_runs = 0
        if scale <= 1.0:
            raise FloatingPointError("non-finite ascent gradient")
        # the scale persists: the next batches start from the reduced one
        self._ascent_scale_now = max(1.0, scale / 2)
        logger.info(f"adversarial ascent: non-finite gradient at scale {scale:g}, retrying at {self._ascent_scale_now:g}")
        return False

    def _with_scale_retries(self, core, run):
        """``run(scale)`` -> (result, finite): an ascent at the current objective scale
        (_ascent_scale), run again at half the scale while it was not finite, at most
        ASCENT_SCALE_RETRIES times (_ascent_done); its result once finite."""
        for _ in range(ASCENT_SCALE_RETRIES + 1):
            scale = self._ascent_scale(core)
            result, finite = run(scale)
            if self._ascent_done(finite, scale):
                return result
        raise FloatingPointError(f"non-finite ascent gradient after {ASCENT_SCALE_RETRIES} smaller scales")

    def _ascent(self, core, sample, teacher, tgt_mask, masks, key, counts):
        """Fresh perturbations: seeded init in the ball, then S projected ascent steps
        on the divergence, with gradients w.r.t. delta only (parameter .grad and DDP
        hooks are not touched: ``core`` is the unwrapped model). In fp16 the objective is
        scaled (_ascent_scale), and an ascent that overflows is run again at half the scale,
        at most ASCENT_SCALE_RETRIES times."""
        self._check_checkpointing(core)
        if not isinstance(teacher, Teacher):  # a B x T x V log-prob tensor (tests, probe)
            teacher = self._teacher(teacher, tgt_mask, sample)
        init = self._init(core, sample, masks, key)

        def run(scale):
            delta, finite = dict(init), None
            for _ in range(self.adv_steps):
                for side in self.sides:
                    delta[side] = delta[side].detach().requires_grad_(True)
                with frozen_parameters(core):
                    out = self._perturbed_forward(core, sample["net_input"], delta)
                counts["fwd"] += 1
                obj = self._divergence(core, out, sample, teacher) * scale
                del out  # the logits stay alive in the divergence's graph only
                grads = torch.autograd.grad(obj, [delta[s] for s in self.sides])
                counts["bwd"] += 1
                delta, finite = self._step(delta, grads, masks, finite)
            return {s: d.detach() for s, d in delta.items()}, finite

        return self._with_scale_retries(core, run)

    def _freelb(self, model, sample, masks, counts):
        """FreeLB: the CE at S+1 perturbations, each one ascent step from the last;
        the S+1 graphs share one backward, so parameter gradients are their mean.
        Scaled and retried in fp16 as _ascent."""
        core = unwrap_model(model)
        self._check_checkpointing(core)
        init = self._init(core, sample, masks, self._noise_key())

        def run(scale):
            delta, finite, losses, nlls = dict(init), None, [], []
            for t in range(self.adv_steps + 1):
                for side in self.sides:
                    delta[side] = delta[side].detach().requires_grad_(True)
                out = self._perturbed_forward(model, sample["net_input"], delta)
                counts["fwd"] += 1
                loss_t, nll_t = self.compute_loss(model, out, sample, reduce=True)
                losses.append(loss_t)
                nlls.append(nll_t.detach())
                if t < self.adv_steps:
                    grads = torch.autograd.grad(loss_t * scale, [delta[s] for s in self.sides], retain_graph=True)
                    counts["bwd"] += 1
                    delta, finite = self._step(delta, grads, masks, finite)
            result = torch.stack(losses).mean(), torch.stack(nlls).mean(), {s: d.detach() for s, d in delta.items()}
            return result, finite

        return self._with_scale_retries(core, run)

    def _rdrop(self, model, sample, counts):
        """R-Drop: two forwards of the batch with dropout on, each with its own masks.

        Followed: the authors' fairseq criterion (github.com/dropreg/R-Drop,
        ``reg_label_smoothed_cross_entropy``: ``forward_reg`` + ``compute_kl_loss``). It
        forwards the batch concatenated with itself once and minimises
        ``LS(p1) + LS(p2) + alpha * (KL(p1||p2) + KL(p2||p1)) / 2``, every term summed
        over the real target tokens, divided by the tokens of ONE copy (sample_size =
        ntokens), with no detach (gradients through both distributions). We run two
        forwards of the batch instead (the same computation and masks distribution,
        counted as 2 forwards like r3f's), and the symmetric KL is
        :func:`divergence` ``(.., "symmetric")``, which is their ``compute_kl_loss``.

        Scale: we minimise half of their objective, ``(LS1 + LS2)/2 + alpha/2 * symKL``,
        so that the logged ``loss`` / ``nll_loss`` / ``ls_loss`` (the mean of the two
        passes) and ``gnorm`` are on the one-pass scale of every other method
        (``adv_loss`` is the symmetric KL per token). A constant factor on the whole
        objective changes neither its minimiser, nor Adam's updates (up to Adam's
        epsilon), nor fp16 loss scaling; only an absolute ``--clip-norm`` sees it (the
        recipes use ``--clip-norm 0``). Returns (LS mean, nll mean, symKL, 1st output).
        """
        net_input = sample["net_input"]
        out1 = model(**net_input)
        out2 = model(**net_input)
        counts["fwd"] += 2
        lp1, target = self.get_lprobs_and_target(model, out1, sample)
        lp2, _ = self.get_lprobs_and_target(model, out2, sample)
        ls1, nll1 = label_smoothed_nll_loss(lp1, target, self.eps, ignore_index=self.padding_idx, reduce=True)
        ls2, nll2 = label_smoothed_nll_loss(lp2, target, self.eps, ignore_index=self.padding_idx, reduce=True)
        reg = divergence(lp1.float(), lp2.float(), target.ne(self.padding_idx), "symmetric")
        return (ls1 + ls2) / 2, (nll1 + nll2) / 2, reg, out1

    # -- ARCH epochs before --arch-first-refresh-epoch ---------------------------------

    def _arch_off(self) -> bool:
        """ARCH before its first refresh epoch (the cache's mode "off"): plain
        label-smoothed CE, counted as one forward and one backward, like --adv-method none."""
        cache = getattr(self.task, "arch_cache", None) if self.adv_method == "arch" else None
        return cache is not None and cache.mode == "off"

    # -- main ------------------------------------------------------------------

    def forward(self, model, sample, reduce=True):
        plain = self.adv_method == "none" or self.adv_lambda == 0 or self._arch_off()
        if not (model.training and reduce) or plain:
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
            if model.training:
                logging_output.update(adv_fwd=1, adv_bwd=1, adv_batches=1)
            return loss, sample_size, logging_output
        self._batches_seen += 1
        counts = {"fwd": 0, "bwd": 0}
        net_input = sample["net_input"]
        core = unwrap_model(model)
        masks = {"source": net_input["src_tokens"].ne(self.padding_idx),
                 "target": net_input["prev_output_tokens"].ne(self.padding_idx)}
        ids = sample["id"]  # stays on the device: the cache brings it to the host once, if needed
        n = ids.numel()
        stats = {"arch_fresh": 0, "arch_cached": 0, "arch_rebuilt": 0, "adv_skipped": 0}

        if self.adv_method == "freelb":
            try:
                loss, nll_loss, delta = self._freelb(model, sample, masks, counts)
            except FloatingPointError:
                # a non-finite ascent: train this batch on the clean CE instead, count it
                loss, nll_loss = self.compute_loss(model, model(**net_input), sample, reduce=True)
                counts["fwd"] += 1
                delta, stats["adv_skipped"] = {}, 1
            counts["bwd"] += 1
            return self._outputs(sample, loss, loss, nll_loss, loss.new_zeros(()), delta, masks, counts, stats, None, model)

        if self.adv_method == "rdrop":
            loss, nll_loss, reg, net_output = self._rdrop(model, sample, counts)
            if not torch.isfinite(reg):
                reg, stats["adv_skipped"] = loss.new_zeros(()), 1  # as below: never train on it
            counts["bwd"] += 1
            # half of R-Drop's objective (see _rdrop): alpha/2 on the symmetric KL
            total = loss + 0.5 * self.adv_lambda * reg.to(loss.dtype)
            return self._outputs(sample, total, loss, nll_loss, reg, {}, masks, counts, stats, net_output, model)

        net_output = model(**net_input)  # clean forward, through the DDP wrapper
        counts["fwd"] += 1
        # one log-softmax serves the label-smoothed loss and the (detached) teacher
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        loss, nll_loss = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=True)
        tgt_mask = target.ne(self.padding_idx)
        early_backward = getattr(self, "early_backward", None)  # armed by arch_translation's train_step
        if early_backward is not None:
            # Peak memory: the teacher is detached, so the CE's gradient is final already.
            # Backpropagating it now (locally: the task holds off DDP's all-reduce) frees
            # the clean graph before the ascent and the perturbed forward build theirs;
            # the trainer's backward then runs through lambda * KL only. `loss` keeps its
            # value: the logged and returned loss is still the total.
            if not self.report_accuracy:
                net_output = None  # the clean logits: read again only for the accuracy
            early_backward(loss)
            loss = loss.detach()
        # the teacher's rows are copied after the early backward: during it the graph holds
        # the log-probs anyway, and the copy would add to the clean backward's peak
        teacher = self._teacher(lprobs, tgt_mask, sample)
        del lprobs  # B x T x V, no longer needed (the teacher holds the real rows)

        skip = False
        cache = getattr(self.task, "arch_cache", None) if self.adv_method == "arch" else None
        if self.dummy_batch:
            # a dummy batch's ids must never touch the cache: zero perturbation
            delta = {s: torch.zeros(*masks[s].shape, d, device=masks[s].device)
                     for s, d in (("source", core.encoder.embed_tokens.embedding_dim),
                                  ("target", core.decoder.embed_tokens.embedding_dim)) if s in self.sides}
        elif self.adv_method == "r3f":
            delta = self._init(core, sample, masks, self._noise_key(), project_to_ball=False)
        elif self.adv_method == "smart" or (cache is not None and cache.mode == "refresh"):
            assert self.adv_method == "smart" or cache.mode is not None, "arch cache not started"
            key = cache.epoch if cache is not None else self._noise_key()
            try:
                fresh = self._ascent(core, sample, teacher, tgt_mask, masks, key, counts)
            except FloatingPointError:
                fresh, skip = None, True
            if fresh is not None and cache is not None:
                delta = {s: cache.store_fresh(ids, s, fresh[s], masks[s], self.project) for s in self.sides}
                stats["arch_fresh"] = n
            else:
                delta = fresh
        else:
            assert cache is not None and cache.mode == "reuse", "arch cache not started (begin_epoch not called?)"
            delta = {}
            for s in self.sides:
                delta[s], n_cached, n_rebuilt = cache.read(ids, s, masks[s], self.project)
            stats["arch_cached"], stats["arch_rebuilt"] = n_cached, n_rebuilt

        reg = loss.new_zeros(())
        if not skip:
            adv_output = self._perturbed_forward(model, net_input, delta)
            counts["fwd"] += 1
            reg = self._divergence(model, adv_output, sample, teacher)
            del adv_output
            if not torch.isfinite(reg):
                # never let a non-finite regulariser poison the model: drop it, count it
                reg, skip = loss.new_zeros(()), True
        stats["adv_skipped"] = int(skip)
        counts["bwd"] += 1  # the trainer's backward of the total loss
        total = loss + self.adv_lambda * reg.to(loss.dtype)
        return self._outputs(sample, total, loss, nll_loss, reg, delta if not skip else {}, masks, counts,
                             stats, net_output, model)

    def _outputs(self, sample, total, ls_loss, nll_loss, reg, delta, masks, counts, stats, net_output, model):
        # a tensor on every rank and batch, also with no delta (a skipped regulariser):
        # fairseq syncs tensor and float log values in separate buffers, so a float on one
        # rank and a tensor on another is a collective size mismatch (gloo aborts)
        norm_sum, norm_count = torch.zeros((), dtype=torch.float32, device=total.device), 0
        for s, d in (delta or {}).items():
            norms = sentence_norms(d, masks[s])
            norm_sum = norm_sum + norms.sum()  # a tensor: summed by fairseq, no sync here
            norm_count += norms.numel()
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": total.data,
            "ls_loss": ls_loss.data,
            "nll_loss": nll_loss.data,
            "adv_loss": reg.data,
            "adv_delta_norm": norm_sum,
            "adv_delta_count": norm_count,
            "adv_fwd": counts["fwd"],
            "adv_bwd": counts["bwd"],
            "adv_batches": 1,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            **stats,
        }
        if self.report_accuracy and net_output is not None:
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
        # Fig. 3: variance of the global gradient norm. fairseq logs this update's
        # "gnorm" just before it reduces the criterion's metrics; log its square too
        # so that every aggregation (log interval, epoch) has E[g^2] - E[g]^2.
        gnorm = _latest_gnorm()
        if gnorm is not None:
            metrics.log_scalar("gnorm_sq", gnorm ** 2, priority=401, round=3)
            metrics.log_derived("gnorm_var", _gnorm_var, priority=402)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
