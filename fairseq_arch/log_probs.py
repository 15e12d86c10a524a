"""Whether a model's log-probs are a plain log-softmax of its logits, so that a
divergence can be taken from the logits (:class:`~fairseq_arch.perturbation.LogitsDivergence`:
no vocabulary-sized temporaries kept for the backward)."""

import logging

import torch

from .injection import unwrap_model

logger = logging.getLogger(__name__)


def has_plain_log_softmax(model) -> bool:
    """Structurally: no adaptive softmax, and neither the model nor its decoder overrides
    fairseq's get_normalized_probs (transformer's override only delegates, for
    TorchScript; :func:`log_probs_are_log_softmax` confirms on numbers)."""
    from fairseq.models import BaseFairseqModel, FairseqDecoder

    core = unwrap_model(model)
    decoder = getattr(core, "decoder", None)
    if not isinstance(core, BaseFairseqModel) or not isinstance(decoder, FairseqDecoder):
        return False
    if getattr(decoder, "adaptive_softmax", None) is not None:
        return False

    def same(obj, base, name):
        return getattr(type(obj), name) is getattr(base, name)

    return (same(core, BaseFairseqModel, "get_normalized_probs_scriptable")
            and same(decoder, FairseqDecoder, "get_normalized_probs")
            and same(decoder, FairseqDecoder, "get_normalized_probs_scriptable"))


def log_probs_are_log_softmax(model, net_output) -> bool:
    """:func:`has_plain_log_softmax`, confirmed on the numbers of one sentence of
    ``net_output`` (the whole batch would cost vocabulary-sized tensors). Logged when not."""
    same = False
    if has_plain_log_softmax(model):
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
