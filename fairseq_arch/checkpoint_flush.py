"""Every rank makes its cache rows durable when fairseq saves a checkpoint.

fairseq calls ``task.state_dict()`` (where ``arch_translation`` flushes its cache) on the
rank that writes the checkpoint only: with data parallel training the other ranks' shard
files (fairseq_arch.cache.shards: each rank appends the rows of a refresh epoch to shards of its own)
would not be fsync'ed when the checkpoint that counts their batches as done is written, and
a crash of their node right after it could lose rows the resumed run will not write again.
``fairseq_cli/train.py`` calls ``checkpoint_utils.save_checkpoint`` on every rank (the
ranks that do not write return early inside it), so we wrap that function: first this
rank's flush, then fairseq's save, unchanged. fairseq keeps the best validation score as an
attribute of the function (``save_checkpoint.best``, read and written through the module's
name), which the wrapper therefore carries on its own, as the module's function did.
"""

import functools
import logging

logger = logging.getLogger(__name__)


def flush_before_save(real):
    @functools.wraps(real)
    def save_checkpoint(cfg, trainer, *args, **kwargs):
        cache = getattr(getattr(trainer, "task", None), "arch_cache", None)
        if cache is not None and not getattr(cfg, "no_save", False):
            if cache.flush():
                logger.info(f"ARCH cache: rank {cache.rank}'s rows of {cache.access.generation} made durable for the checkpoint")
        return real(cfg, trainer, *args, **kwargs)

    save_checkpoint.flushes_arch_cache = True
    return save_checkpoint


def install() -> None:
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils.save_checkpoint, "flushes_arch_cache", False):
        checkpoint_utils.save_checkpoint = flush_before_save(checkpoint_utils.save_checkpoint)
