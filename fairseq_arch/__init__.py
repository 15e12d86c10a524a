"""fairseq-arch: ARCH (Adversarial Regularization with CacHing, Zuo et al. 2021)
as a fairseq plugin. Use with ``--user-dir fairseq_arch``; importing this package
registers the ``arch_translation`` task and the
``adversarial_label_smoothed_cross_entropy`` criterion."""

__version__ = "0.1.0"

from . import checkpoint_compat, checkpoint_flush

checkpoint_compat.install()
checkpoint_flush.install()

from .tasks import arch_translation  # noqa: E402,F401  (registers the task)
from .criterions import adversarial_label_smoothed_cross_entropy  # noqa: E402,F401
