"""Task ``arch_translation``: translation with ARCH's perturbation cache.

It is :class:`TranslationTask` plus the cache: the task owns the cache of the
training split (one :class:`~fairseq_arch.cache.ArchCache`), advances it at
every epoch start, and the criterion asks it, batch by batch, to store fresh
perturbations (refresh epochs) or to read them back (other epochs).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import TASK_REGISTRY, register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from .. import early_backward
from ..cache import ArchCache, load_embedding_matrix
from ..cache.read_ahead import look_ahead_in
from ..cache_math import REBUILD_NORMS
from ..distributed import all_gather_object
from ..injection import checkpointed
from ..registration import register_once
from ..validation import left_out_message, left_out_of_batches, refuse_non_finite

logger = logging.getLogger(__name__)

CACHE_DTYPE_CHOICES = ChoiceEnum(["float16", "float32"])
REBUILD_NORM_CHOICES = ChoiceEnum(list(REBUILD_NORMS))
NEIGHBOR_SEARCH_CHOICES = ChoiceEnum(["refresh", "epoch"])


@dataclass
class ArchTranslationConfig(TranslationConfig):
    arch_refresh_interval: int = field(
        default=15,
        metadata={"help": "Tc: epochs between fresh perturbations. Epoch E (--arch-first-refresh-epoch, "
                  "default 1) is a refresh, then E+Tc, E+2Tc, ...; 0 = compute once (in epoch E) and never "
                  "refresh (the paper's inf)"},
    )
    arch_first_refresh_epoch: int = field(
        default=1,
        metadata={"help": "E: the first ARCH epoch (a refresh). Epochs before it train with plain "
                  "label-smoothed CE (no regulariser, no ascent, no cache): the embeddings the first "
                  "neighbour search uses are then trained ones, not nearly random ones. 1 = the paper"},
    )
    arch_ema: float = field(
        default=0.01,
        metadata={"help": "alpha of Eq. 2, C <- alpha*C + (1-alpha)*fresh on refresh epochs "
                  "(the first refresh stores fresh as is); 0 = no EMA"},
    )
    arch_cache_fraction: float = field(
        default=0.1,
        metadata={"help": "p: fraction of training sentences whose token-level perturbations are "
                  "cached (fixed-seed sample); the others are rebuilt from neighbours. 1.0 = cache all"},
    )
    arch_neighbors: int = field(
        default=1,
        metadata={"help": "K: cached neighbours averaged for every uncached sentence (Eq. 3)"},
    )
    arch_neighbor_embeddings: str = field(
        default="model",
        metadata={"help": "word embeddings W of Eq. 4: 'model' (the model's own matrices at each "
                  "refresh), 'random' (random neighbours, the R-1-NN ablation), or a path to a "
                  "fairseq checkpoint / .npy / .pt matrix aligned with the dictionary"},
    )
    # Default 'paper' (Eq. 3 as written): it gave the higher validation BLEU of the two in the
    # quality benchmark, although 'neighbor' rebuilds a stronger perturbation (README, "Quality")
    arch_rebuild_norm: REBUILD_NORM_CHOICES = field(
        default="paper",
        metadata={"help": "size of an uncached sentence's rebuilt perturbation (Eq. 3): 'paper' = the "
                  "mean of its neighbours' mean rows on every token, projected (averaging rows that "
                  "point different ways cancels part of their length); 'neighbor' = rescaled to the mean "
                  "size of its K neighbours' cached sentences; 'eps' = rescaled to the ball's radius "
                  "(--adv-eps). Sizes in the ball's own measure (--adv-norm, --adv-granularity)"},
    )
    arch_neighbor_search: NEIGHBOR_SEARCH_CHOICES = field(
        default="refresh",
        metadata={"help": "when the neighbours of Eq. 4 are searched: 'refresh' = once per refresh, at its "
                  "end (the paper); 'epoch' = again at the start of every reuse epoch from the current "
                  "embeddings (the cached rows stay); logged: neighbours changed and search seconds"},
    )
    arch_recipe: ChoiceEnum(["text", "code"]) = field(
        default="text",
        metadata={"help": "'text': ARCH as the paper's text describes it; 'code': the official code's computation "
                  "(SimiaoZuo/Caching-Adv e5719e3: displacements cached, refreshes in epochs 1, Tc, 2Tc, ..., "
                  "non-negative init, padding unmasked; defaults --adv-eps 0.3 --adv-steps 2 --adv-step-size 1e-4 "
                  "--adv-kl symmetric; fairseq_arch/code_recipe.py)"},
    )
    arch_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "directory of the disk-backed cache (default: <save-dir>/arch_cache); "
                  "must be on a filesystem every rank sees"},
    )
    arch_cache_dtype: CACHE_DTYPE_CHOICES = field(
        default="float16",
        metadata={"help": "dtype of the cached token rows on disk"},
    )
    arch_prefetch: ChoiceEnum(["auto", "on", "off"]) = field(
        default="auto",
        metadata={"help": "reuse epochs: read the next batch's cached rows and neighbour rebuilds on a worker "
                  "thread while the current batch trains ('on'), or when the step asks for them ('off'); the same "
                  "numbers either way. 'auto' = on when training on CUDA, where host work is a visible share of a "
                  "step, off on a CPU, where it is under 1% and a thread only competes for the cores. Ignored by "
                  "--arch-recipe code, which always reads in the step"},
    )
    save_dir: str = II("checkpoint.save_dir")
    seed: int = II("common.seed")
    cpu: bool = II("common.cpu")  # --arch-prefetch auto
    # read for the start-of-run warning on --arch-first-refresh-epoch beyond --max-epoch
    max_epoch: int = II("optimization.max_epoch")


def validate_arch_config(cfg) -> None:
    """Fail at start, naming the option, on settings ARCH cannot run with."""
    refuse_non_finite(cfg, ArchTranslationConfig)
    if not (0.0 < cfg.arch_cache_fraction <= 1.0):
        raise ValueError(f"--arch-cache-fraction must be in (0, 1], got {cfg.arch_cache_fraction}")
    if cfg.arch_neighbors < 1:
        raise ValueError(f"--arch-neighbors must be >= 1, got {cfg.arch_neighbors}")
    if not (0.0 <= cfg.arch_ema < 1.0):
        raise ValueError(f"--arch-ema must be in [0, 1), got {cfg.arch_ema}")
    if cfg.arch_refresh_interval < 0:
        raise ValueError(f"--arch-refresh-interval must be >= 0 (0 = never refresh), got {cfg.arch_refresh_interval}")
    if cfg.arch_first_refresh_epoch < 1:
        raise ValueError(
            f"--arch-first-refresh-epoch must be >= 1 (fairseq epochs start at 1), got {cfg.arch_first_refresh_epoch}")
    if str(cfg.arch_rebuild_norm) not in REBUILD_NORMS:
        raise ValueError(f"--arch-rebuild-norm must be one of {', '.join(REBUILD_NORMS)}, got {cfg.arch_rebuild_norm!r}")
    if str(cfg.arch_neighbor_search) not in ("refresh", "epoch"):
        raise ValueError(f"--arch-neighbor-search must be 'refresh' or 'epoch', got {cfg.arch_neighbor_search!r}")
    if str(cfg.arch_recipe) == "code":
        for bad, why in ((cfg.arch_first_refresh_epoch != 1, "--arch-first-refresh-epoch other than 1"),
                         (str(cfg.arch_neighbor_search) != "refresh", "--arch-neighbor-search epoch"),
                         (str(cfg.arch_rebuild_norm) != "paper", "--arch-rebuild-norm other than paper"),
                         (str(cfg.arch_cache_dtype) != "float32",
                          "--arch-cache-dtype float16 (its displacements, ~1e-6 per coordinate, are below "
                          "float16's normal range): use --arch-cache-dtype float32")):
            if bad:
                raise ValueError(f"--arch-recipe code (the official code's computation) cannot run with {why}")
    src = cfg.arch_neighbor_embeddings
    if src not in ("model", "random") and not os.path.isfile(src):
        raise ValueError(
            f"--arch-neighbor-embeddings must be 'model', 'random' or an existing file, got {src!r}"
        )


def refuse_empty_split(data_path: str, split: str, src: str, tgt: str) -> None:
    """ValueError naming the file when ``split``'s binarized data (fairseq-preprocess's
    ``.bin`` / ``.idx``) exists but is empty: fairseq would fail with a bare "cannot mmap
    an empty file" traceback."""
    for a, b in ((src, tgt), (tgt, src)):
        for lang in (src, tgt):
            for ext in (".bin", ".idx"):
                path = os.path.join(data_path, f"{split}.{a}-{b}.{lang}{ext}")
                if os.path.isfile(path) and os.path.getsize(path) == 0:
                    raise ValueError(
                        f"{path} is empty (0 bytes): split '{split}' has no sentences. Binarize a non-empty "
                        f"corpus with fairseq-preprocess (its --trainpref / --validpref files) into {data_path}")


def cache_never_used(method, cfg) -> Optional[str]:
    """The start-of-run warning when ``--arch-first-refresh-epoch`` is beyond
    ``--max-epoch`` for a method with ARCH's cache (None otherwise)."""
    max_epoch = getattr(cfg, "max_epoch", None) or 0  # 0: no limit
    first = cfg.arch_first_refresh_epoch
    if not getattr(method, "needs_cache", False) or max_epoch <= 0 or first <= max_epoch:
        return None
    return (f"--arch-first-refresh-epoch {first} is beyond --max-epoch {max_epoch}: --adv-method "
            f"{method.name} never runs; every epoch trains plain label-smoothed cross-entropy. Lower "
            f"--arch-first-refresh-epoch or raise --max-epoch")


@register_once(TASK_REGISTRY, register_task, "arch_translation", ArchTranslationConfig)
class ArchTranslationTask(TranslationTask):
    """Translation whose criterion regularises with cached adversarial perturbations."""

    cfg: ArchTranslationConfig

    def __init__(self, cfg: ArchTranslationConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        validate_arch_config(cfg)
        self.fixed_embeddings = None
        src = cfg.arch_neighbor_embeddings
        if src not in ("model", "random"):
            w = load_embedding_matrix(src)
            for side, d in (("source", src_dict), ("target", tgt_dict)):
                if w[side].dim() != 2 or w[side].size(0) != len(d):
                    raise ValueError(
                        f"--arch-neighbor-embeddings {src}: the {side} matrix has shape "
                        f"{tuple(w[side].shape)} but the {side} dictionary has {len(d)} entries"
                    )
            self.fixed_embeddings = w
        self.arch_cache: Optional[ArchCache] = None
        self.arch_criterion = None  # the criterion build_criterion made (its sides, ball, method)
        self.dummy_batches = 0  # fairseq dummy batches of this rank since the last epoch start
        self.size_filtered = {}  # id(dataset) -> sentences fairseq filtered for their size
        self.left_out_reported = set()  # id(dataset) of the splits whose left-out count was checked

    @property
    def prefetches(self) -> bool:
        """--arch-prefetch resolved: 'auto' is on exactly when fairseq trains on CUDA."""
        mode = str(self.cfg.arch_prefetch)
        return mode == "on" or (mode == "auto" and torch.cuda.is_available() and not getattr(self.cfg, "cpu", False))

    @property
    def cache_dir(self) -> str:
        return self.cfg.arch_cache_dir or os.path.join(self.cfg.save_dir, "arch_cache")

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        # fairseq's activation checkpointing (reentrant) raises on torch.autograd.grad, which
        # the ascent of smart / freelb / arch needs: the criterion, built next, refuses these
        # flags for those methods at start (and checks the model itself at its first ascent)
        flags = [f"--{name.replace('_', '-')}" for name in ("checkpoint_activations", "offload_activations")
                 if getattr(cfg, name, False)]
        if not flags and checkpointed(model):
            flags = ["--checkpoint-activations"]  # wrapped by an architecture of its own accord
        self.activation_checkpointing = flags
        return model

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        if not hasattr(criterion, "method"):
            raise ValueError(
                f"--task arch_translation needs a criterion that uses its cache "
                f"(--criterion adversarial_label_smoothed_cross_entropy), got {type(criterion).__name__}"
            )
        # the cache stores only the perturbed sides, and sizes rebuilt sentences in the
        # criterion's ball; methods without a cache run on this task too, so that every
        # row of the paper's tables differs by flags only
        self.arch_criterion = criterion
        message = cache_never_used(criterion.method, self.cfg)
        if message:
            logger.warning(message)
        return criterion

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        if split == self.cfg.train_subset and len(utils.split_paths(self.cfg.data)) > 1:
            raise ValueError(
                "arch_translation caches per training sentence and needs one fixed training set: "
                f"--data has several ':'-separated shards ({self.cfg.data})"
            )
        paths = utils.split_paths(self.cfg.data)
        refuse_empty_split(paths[(epoch - 1) % len(paths)], split, self.cfg.source_lang, self.cfg.target_lang)
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def filter_indices_by_size(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        kept = super().filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        # fairseq logs these itself (--skip-invalid-size-inputs-valid-test): kept apart from
        # the sentences its batching leaves out silently (report_left_out)
        self.size_filtered[id(dataset)] = len(indices) - len(kept)
        return kept

    def get_batch_iterator(self, dataset, *args, seed=1, epoch=1, **kwargs):
        # fairseq 0.12 breaks length-sorting ties with numpy_seed(seed + epoch) of the
        # epoch the iterator is *built* in: a run resumed at epoch e batches the
        # training set differently from the uninterrupted run, which built its
        # iterator at epoch 1 (the measured "resume drift" of plain fairseq). Build
        # the training batches as at epoch 1, keep `seed` for the per-epoch shuffle.
        if dataset is self.datasets.get(self.cfg.train_subset) and not getattr(self.cfg, "rebuild_batches", False):
            itr = super().get_batch_iterator(dataset, *args, seed=seed + 1 - epoch, epoch=epoch, **kwargs)
            itr.seed = seed
        else:
            itr = super().get_batch_iterator(dataset, *args, seed=seed, epoch=epoch, **kwargs)
        crit = self.arch_criterion
        if (dataset is self.datasets.get(self.cfg.train_subset) and self.prefetches
                and (crit is None or crit.method.needs_cache)):
            look_ahead_in(itr, self._prefetch)  # batch t + 1's cache read runs while t trains
        if args:
            return itr  # positional options (no caller of fairseq's does this): not checked
        self.report_left_out(dataset, itr, kwargs.get("required_batch_size_multiple", 1),
                             log=kwargs.get("shard_id", 0) == 0)
        return itr

    def _prefetch(self, sample) -> None:
        """A training batch about to be handed out after the current one (fairseq's own
        dummy and empty batches have no ids and never read the cache)."""
        ids = sample.get("id") if isinstance(sample, dict) else None
        if self.arch_cache is not None and ids is not None:
            self.arch_cache.prefetch(ids.cpu().numpy() if torch.is_tensor(ids) else ids)

    def report_left_out(self, dataset, itr, multiple: int, log: bool = True) -> int:
        """Sentences of ``dataset`` in none of the iterator's batches (fairseq's batch_by_size
        drops a last batch whose size is not a multiple of --required-batch-size-multiple,
        default 8): warned once per split (on rank 0), refused when no sentence is left."""
        if callable(getattr(itr, "batch_sampler", None)) or id(dataset) in self.left_out_reported:
            return 0  # --rebuild-batches (batches made at each epoch start), or checked already
        n, batches = len(dataset), itr.frozen_batches
        left = left_out_of_batches(n, batches, self.size_filtered.get(id(dataset), 0))
        split = next((k for k, v in self.datasets.items() if v is dataset), "unnamed")
        if left and not any(len(b) for b in batches):
            raise ValueError(f"none of the {n} sentences of '{split}' is in a batch: fairseq's batch_by_size "
                             f"drops a last batch whose size is not a multiple of --required-batch-size-multiple "
                             f"{multiple}; use --required-batch-size-multiple 1 (or a larger corpus)")
        self.left_out_reported.add(id(dataset))
        message = left_out_message(split, left, n, multiple)
        if message and log:
            logger.warning(message)
        return left

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        crit = self.arch_criterion
        if crit is None:
            raise RuntimeError("arch_translation: begin_epoch before build_criterion (the cache needs the criterion)")
        if crit.method.needs_cache:
            self._advance_cache(epoch, model, crit)
        if crit.adv_probe_sentences > 0:
            from ..probe import log_probe

            log_probe(self, model, crit, epoch, crit.adv_probe_sentences)

    def _advance_cache(self, epoch, model, crit):
        if self.arch_cache is None:
            self.arch_cache = ArchCache(
                self.cache_dir,
                self.dataset(self.cfg.train_subset),
                self.src_dict,
                self.tgt_dict,
                refresh_interval=self.cfg.arch_refresh_interval,
                ema=self.cfg.arch_ema,
                fraction=self.cfg.arch_cache_fraction,
                num_neighbors=self.cfg.arch_neighbors,
                neighbor_embeddings=self.cfg.arch_neighbor_embeddings,
                fixed_embeddings=self.fixed_embeddings,
                dtype=str(self.cfg.arch_cache_dtype),
                seed=self.cfg.seed,
                sides=crit.sides,
                first_refresh_epoch=self.cfg.arch_first_refresh_epoch,
                rebuild_norm=str(self.cfg.arch_rebuild_norm),
                neighbor_search=str(self.cfg.arch_neighbor_search),
                ball=crit.space.ball,
                schedule=str(self.cfg.arch_recipe),
                read_ahead=self.prefetches,
            )
        # every rank is here (begin_epoch is collective anyway: the cache's gather)
        dummies = all_gather_object(self.dummy_batches)
        self.dummy_batches = 0
        if any(dummies):
            logger.info(f"ARCH: dummy batches per rank in the last epoch: {dummies} "
                        "(they never read or write the cache)")
        self.arch_cache.begin_epoch(epoch, model)
        # logged inside fairseq's "train" aggregation: shows up in the epoch summary
        metrics.log_scalar("arch_nn_search_s", self.arch_cache.last_search_seconds, priority=900, round=3)
        if self.cfg.arch_neighbor_search == "epoch" and self.arch_cache.mode == "reuse":
            changed = self.arch_cache.last_nbr_changed  # None: no search this epoch (or nothing to compare)
            metrics.log_scalar("arch_nbr_changed", changed[0] if changed else 0, priority=901, round=0)
            metrics.log_scalar("arch_nbr_changed_frac", changed[0] / changed[1] if changed else 0.0,
                               priority=902, round=4)

    # arch, smart, r3f: backpropagate the clean CE before the perturbed forward, so the
    # clean and perturbed graphs are never alive together (fairseq_arch/early_backward.py).
    # False: one joint backward of CE + KL (the tests compare the two).
    early_clean_backward = True

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # ignore_grad marks fairseq's dummy batches (a rank with no data left, OOM
        # retries): a stand-in sample, possibly from the valid set, whose ids must
        # never touch the cache. The criterion still runs both forwards so that
        # every rank's autograd graph has the same shape.
        if ignore_grad:
            # fairseq drops a dummy batch's logging outputs (and only rank 0 logs INFO):
            # counted here, reported by rank 0 at the next epoch start
            self.dummy_batches += 1
        model.train()  # as FairseqTask.train_step: the early backward is for training steps
        early = early_backward.make(self.early_clean_backward, criterion, model, optimizer, ignore_grad)
        with criterion.train_step_options(dummy_batch=ignore_grad, early_backward=early):
            if early is None:
                return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
            # FairseqTask.train_step, with the criterion's clean CE backpropagated inside it
            model.set_num_updates(update_num)
            with early, torch.autograd.profiler.record_function("forward"):
                with torch.autocast(device_type="cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                    loss, sample_size, logging_output = criterion(model, sample)
        if ignore_grad:
            loss *= 0
        early.backward_rest(loss, model, sample)
        return loss, sample_size, logging_output

    def state_dict(self):
        # called when fairseq saves a checkpoint: make the rows written so far
        # durable, so a crash after this checkpoint cannot lose them
        if self.arch_cache is not None:
            self.arch_cache.flush()
            self.state.merge_state_dict({"arch_cache": self.arch_cache.state_dict()})
        return super().state_dict()
