"""``--adv-chunks N``: the perturbed forward and its backward in N sentence chunks, for peak memory.

With the early clean backward (``early_backward.py``), an update of r3f, smart, arch or
zero-delta holds the parameter gradients G, allocated by the clean CE's backward, while
the perturbed forward builds its graph A: a peak of about G + A, against about A for
``none``. On an H200 at transformer_wmt_en_de_big (max-tokens 4096) that was 1.23x none's
peak. Backpropagating each chunk's KL as soon as it is computed keeps one chunk's graph
alive at a time, a peak of about G + A / N. Every chunk's backward but the last runs here,
locally (no all-reduce); the last one is the trainer's, which all-reduces once per update,
as without chunks.

The same objective, not the same bits. delta, the teacher and the ascent are computed on
the whole batch as without chunks, and the KL is a sum over sentences. But each chunk's
forward draws its own dropout masks, and the gradient is summed in another order: without
dropout it equals the unchunked gradient to float32 rounding (tests/test_chunks.py). A
chunk is a smaller batch for the GPU, which costs time where the model is small.

A chunk whose KL is not finite is dropped alone (the earlier chunks' gradients are in
``.grad`` already); the step is then counted as skipped, as an unchunked one would be.
"""

import contextlib
import logging
from typing import Dict, List, Tuple

import torch

logger = logging.getLogger(__name__)
_warned = []


def chunk_bounds(sentences: int, chunks: int) -> List[Tuple[int, int]]:
    """[start, end) of ``chunks`` runs of sentences, sizes differing by at most one, none
    empty (fewer chunks for a batch of fewer sentences)."""
    n = max(1, min(int(chunks), int(sentences)))
    cuts = [round(k * sentences / n) for k in range(n + 1)]
    return [(cuts[k], cuts[k + 1]) for k in range(n)]


def sentence_slice(sample: dict, start: int, end: int) -> dict:
    """The sample of sentences [start, end) for a chunk's forward and KL: ``id``, ``target``
    and every tensor of ``net_input`` with the batch as its first dimension cut; the other
    keys (alignments, constraints: not per sentence) kept as they are. ``ntokens`` is left
    out: the chunk's count is not known without a sync, and nothing downstream reads it."""
    batch = sample["target"].size(0)

    def cut(value):
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch:
            return value[start:end]
        return value

    part = {k: v for k, v in sample.items() if k != "ntokens"}
    part.update(id=cut(sample["id"]), target=sample["target"][start:end], nsentences=end - start,
                net_input={k: cut(v) for k, v in sample["net_input"].items()})
    return part


def chunked_regulariser(crit, model, sample, delta: Dict[str, torch.Tensor], teacher, chunks: int):
    """(reg, dropped): the batch's KL before lambda, its value summed over the chunks and
    its graph the last chunk's; ``dropped`` = chunks whose KL was not finite (not trained
    on). Every chunk but the last is backpropagated here, through ``crit.early_backward``."""
    early = crit.early_backward
    bounds = chunk_bounds(sample["target"].size(0), chunks)
    width = sample["target"].size(1) - crit.ignore_prefix_size  # the teacher's positions per sentence
    total, dropped = None, 0
    for k, (start, end) in enumerate(bounds):
        last = k == len(bounds) - 1
        part = sentence_slice(sample, start, end)
        with contextlib.nullcontext() if last else early.local():
            out = crit.perturbed_forward(model, part["net_input"], {s: d[start:end] for s, d in delta.items()})
            reg = crit.divergence(model, out, part, teacher.sentences(start, end, width))  # a scalar
            del out  # what the backward needs stays in reg's graph
            if not torch.isfinite(reg):
                dropped, reg = dropped + 1, reg.new_zeros(())
            elif not last:
                early.part(crit.adv_lambda * reg)
                reg = reg.detach()
        total = reg if total is None else total + reg  # the earlier chunks' are detached
    return total, dropped


def warn_unchunked(chunks: int) -> None:
    """Once per process: a step without the early clean backward (a wrapper other than
    torch DDP or legacy_ddp, logged by early_backward.make) has one joint backward, in
    which chunks would lower nothing; it runs unchunked."""
    if not _warned:
        _warned.append(True)
        logger.warning(f"--adv-chunks {chunks}: this step has no early clean backward, so the perturbed "
                       "forward runs in one piece (the same objective; peak memory as --adv-chunks 1)")
