"""Add perturbations to the token-embedding lookup of a fairseq encoder-decoder.

A forward hook on ``encoder.embed_tokens`` / ``decoder.embed_tokens`` adds delta to
the lookup output, i.e. *before* fairseq multiplies by ``embed_scale`` (sqrt(d)) and
adds positions. With ``--share-all-embeddings`` both sides call the same module, so
the hook tells them apart by the identity of the token tensor it is called on.

fairseq's LSTM encoder does not embed ``src_tokens`` itself: it first moves the left
padding to the right (``utils.convert_padding_direction``) and embeds that new tensor.
The hook recognises the moved tokens and moves delta's rows the same way, so every
token keeps its own perturbation row (and padding stays zero).
"""

from contextlib import contextmanager
from typing import Dict, Optional

import torch
import torch.nn as nn


def checkpointed(model: nn.Module) -> bool:
    """Whether fairseq's checkpoint_wrapper (activation checkpointing) wraps a module of
    ``model``."""
    return any(hasattr(m, "precheckpoint_forward") for m in model.modules())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare fairseq model under DDP / legacy-DDP / proxy wrappers. Ascent
    forwards go through it so that DDP's reducer only sees the forwards whose
    parameter gradients it must reduce (with --broadcast-buffers, a forward through
    DDP is also a collective: a rank that skips an ascent would hang the others).

    fairseq wraps DDP in a ``ModuleProxyWrapper`` that forwards attribute lookups
    (``.encoder``, ``.decoder``) to the model inside, so "has an encoder" is no test
    of being unwrapped: walk ``.module`` down to the ``BaseFairseqModel``."""
    from fairseq.models import BaseFairseqModel

    while not isinstance(model, BaseFairseqModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    assert hasattr(model, "encoder") and hasattr(model, "decoder"), (
        f"ARCH needs an encoder-decoder model with embed_tokens, got {type(model).__name__}"
    )
    return model


def embedding_modules(model: nn.Module) -> Dict[str, nn.Module]:
    core = unwrap_model(model)
    return {"source": core.encoder.embed_tokens, "target": core.decoder.embed_tokens}


def left_to_right_index(tokens: torch.Tensor, pad: int) -> Optional[torch.Tensor]:
    """B x T gather index that moves left padding to the right exactly as fairseq's
    ``utils.convert_padding_direction(tokens, pad, left_to_right=True)`` does (a
    rotation of each row by its number of pads); None when it would not move anything."""
    pad_mask = tokens.eq(pad)
    if tokens.size(1) == 0 or not pad_mask[:, 0].any():
        return None  # no left padding: fairseq embeds the tensor it was given
    max_len = tokens.size(1)
    positions = torch.arange(max_len, device=tokens.device).expand_as(tokens)
    return torch.remainder(positions + pad_mask.long().sum(dim=1, keepdim=True), max_len)


@contextmanager
def perturbed_embeddings(
    model: nn.Module,
    src_tokens: torch.Tensor,
    prev_output_tokens: torch.Tensor,
    delta_src: Optional[torch.Tensor],
    delta_tgt: Optional[torch.Tensor],
):
    """Within the block, every forward of ``model`` on exactly these token tensors
    sees ``embed_tokens(tokens) + delta``. Yields a dict counting how often each
    side was perturbed, so callers can check that the model really used the hook."""
    applied = {"source": 0, "target": 0}
    moved_src = {}  # padding_idx -> (right-padded src_tokens, delta_src moved alike), lazily

    def right_padded_source(pad: int):
        if pad not in moved_src:
            index = left_to_right_index(src_tokens, pad)
            moved_src[pad] = None if index is None else (
                src_tokens.gather(1, index),
                delta_src.gather(1, index.unsqueeze(-1).expand_as(delta_src)),
            )
        return moved_src[pad]

    def hook(module, inputs, output):
        tokens = inputs[0]
        if delta_src is not None and tokens is src_tokens:
            applied["source"] += 1
            return output + delta_src.to(output.dtype)
        if delta_tgt is not None and tokens is prev_output_tokens:
            applied["target"] += 1
            return output + delta_tgt.to(output.dtype)
        pad = getattr(module, "padding_idx", None)
        if delta_src is not None and pad is not None and tokens.shape == src_tokens.shape:
            # not src_tokens itself: the LSTM encoder's right-padded copy of it?
            moved = right_padded_source(pad)
            if moved is not None and torch.equal(tokens, moved[0]):
                applied["source"] += 1
                return output + moved[1].to(output.dtype)
        return None

    handles = []
    seen = set()
    for module in embedding_modules(model).values():
        if id(module) not in seen:  # shared embeddings: one hook serves both sides
            seen.add(id(module))
            handles.append(module.register_forward_hook(hook))
    try:
        yield applied
    finally:
        for h in handles:
            h.remove()


def check_applied(applied: Dict[str, int], delta_src, delta_tgt, forwards: int = 1) -> None:
    for side, d in (("source", delta_src), ("target", delta_tgt)):
        want = forwards if d is not None else 0
        if applied[side] != want:
            raise RuntimeError(
                f"the {side} perturbation was applied {applied[side]} times in {forwards} "
                f"forward(s), expected {want}: the model must call embed_tokens on the "
                "src_tokens / prev_output_tokens tensors it is given (fairseq transformer "
                "models do; lstm encoders embed a right-padded copy, which the hook recognises)"
            )
