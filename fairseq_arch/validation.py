"""Start-of-run checks shared by the task and the criterion: small pure functions,
testable without fairseq.

- :func:`refuse_non_finite`: every float option of a config dataclass (found from its
  fields, so a new option is covered without a list to update) must be finite; ``nan``
  passes comparisons such as ``> 0`` silently wrong, and ``inf`` ends in a
  FloatingPointError deep in the first batches.
- :func:`left_out_of_batches`: how many sentences of a split fairseq's batching leaves
  out of every epoch, and why.
"""

import dataclasses
import importlib.util
import math
import typing
from typing import Iterable, List, Optional, Sequence

import numpy as np


def option_name(field_name: str) -> str:
    """``adv_eps`` -> ``--adv-eps`` (fairseq's command-line spelling of a config field)."""
    return "--" + field_name.replace("_", "-")


def float_fields(config_class) -> List[str]:
    """Names of the fields of a dataclass typed ``float`` or ``Optional[float]``
    (inherited fields included)."""
    names = []
    for f in dataclasses.fields(config_class):
        t = f.type
        if t is float or (typing.get_origin(t) is typing.Union and float in typing.get_args(t)):
            names.append(f.name)
    return names


def non_finite_options(cfg, config_class) -> List[str]:
    """``--option value`` for every float option of ``config_class`` whose value in
    ``cfg`` (a dataclass, DictConfig or namespace; missing fields skipped) is nan or +-inf."""
    bad = []
    for name in float_fields(config_class):
        value = getattr(cfg, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            bad.append(f"{option_name(name)} {value}")
    return bad


def refuse_non_finite(cfg, config_class) -> None:
    """ValueError naming every float option of ``cfg`` that is not a finite number."""
    bad = non_finite_options(cfg, config_class)
    if bad:
        raise ValueError(f"{', '.join(bad)}: {'these options need' if len(bad) > 1 else 'this option needs'} "
                         "a finite number (not nan or inf)")


def left_out_of_batches(n_sentences: int, batches: Iterable[Sequence[int]], size_filtered: int = 0) -> int:
    """Sentences of a split of ``n_sentences`` that are in none of ``batches`` and were
    not dropped for their size (``size_filtered``: fairseq logs those itself)."""
    parts = [np.asarray(b, dtype=np.int64).reshape(-1) for b in batches]
    covered = int(np.unique(np.concatenate(parts)).size) if parts else 0
    return max(n_sentences - covered - size_filtered, 0)


def left_out_message(split: str, left: int, n_sentences: int, multiple: int) -> Optional[str]:
    """The start-of-run line for ``left`` sentences of ``split`` in no batch (None: 0)."""
    if left <= 0:
        return None
    cause = (f"fairseq's batch_by_size drops the last length-sorted batch (the longest sentences) because its "
             f"size is not a multiple of --required-batch-size-multiple {multiple}; "
             "--required-batch-size-multiple 1 keeps every sentence" if multiple > 1
             else "fairseq's batching left them out")
    return (f"{left} of {n_sentences} sentences of '{split}' are in no batch: every epoch leaves the same ones "
            f"out. {cause}")


def bf16_problem(bf16: bool, tpu: bool, has_xla: bool) -> Optional[str]:
    """fairseq 0.12 turns --bf16 into --tpu (fairseq/options.py) and its Trainer then asks
    torch_xla for a device: without torch_xla the run dies with an AttributeError before the
    first batch, on CUDA as on CPU. The message names what works instead."""
    if not (bf16 and tpu) or has_xla:
        return None
    return ("--bf16: fairseq 0.12 trains in bf16 only on TPUs (it sets --tpu and needs torch_xla, which is not "
            "installed), so it would stop before the first batch. On a GPU use --amp (mixed precision with "
            "dynamic loss scaling) or --fp16; on a CPU leave both out")


def refuse_bf16_without_xla(cfg) -> None:
    problem = bf16_problem(bool(getattr(cfg, "bf16", False)), bool(getattr(cfg, "tpu", False)),
                           importlib.util.find_spec("torch_xla") is not None)
    if problem:
        raise ValueError(problem)
