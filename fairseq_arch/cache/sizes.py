"""How big rebuilt sentences are (``--arch-rebuild-norm``), and the cached sentences'
sizes that ``neighbor`` mode reads."""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import cache_math
from ..perturbation import project
from .store import PerturbationCacheStore

logger = logging.getLogger(__name__)


class RebuildSizer:
    """Eq. 3 for uncached sentences, sized by ``--arch-rebuild-norm`` in the measure of the
    criterion's ball (``ball``: --adv-eps, --adv-norm, --adv-granularity)."""

    def __init__(self, rebuild_norm: str, ball: Tuple[float, str, str]):
        assert rebuild_norm in cache_math.REBUILD_NORMS, rebuild_norm
        self.mode = str(rebuild_norm)
        self.eps, self.norm, self.granularity = float(ball[0]), str(ball[1]), str(ball[2])

    @property
    def measure(self) -> str:
        """The name of the sizes' measure, recorded with a generation's sizes."""
        return f"{self.norm}/{self.granularity}"

    def with_mode(self, rebuild_norm: str) -> "RebuildSizer":
        return RebuildSizer(rebuild_norm, (self.eps, self.norm, self.granularity))

    def vectors(self, neighbor_means: torch.Tensor, lengths, neighbor_norms: Optional[torch.Tensor]) -> torch.Tensor:
        """B x C Eq. 3 vectors (one per sentence, for all of its tokens) from the B x K x C
        means of the neighbours' rows: ``paper`` as published (the word average of rows
        that point different ways cancels part of their length, so rebuilt sentences end
        inside the ball and, the KL growing like the squared size, regularise less than
        cached ones); ``neighbor``: the mean size of the K neighbours' cached sentences
        (``neighbor_norms``, B x K); ``eps``: the ball's radius. The caller projects."""
        if self.mode == "paper":
            return cache_math.rebuilt_vectors(neighbor_means, lengths)
        if neighbor_norms is None:  # eps mode needs no stored sizes, only the batch size
            neighbor_norms = torch.zeros(neighbor_means.size(0), neighbor_means.size(1), device=neighbor_means.device)
        target = cache_math.rebuild_targets(self.mode, neighbor_norms, self.eps)
        return cache_math.rebuilt_vectors(neighbor_means, lengths, target, self.norm, self.granularity)

    def rows(self, neighbor_means: torch.Tensor, lengths, neighbor_norms: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """The ``len_b x C`` rows of :meth:`vectors` (one vector on every token)."""
        return cache_math.expand_vectors(self.vectors(neighbor_means, lengths, neighbor_norms), lengths)

    def project_rows(self, rows: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Each ``len x C`` row projected onto the ball, as a batch's read projects it
        (:func:`fairseq_arch.perturbation.project`): what a row rebuilt outside a batch
        (finalize.py's unwritten rows) is stored as, so that a generation holds only
        perturbations inside the ball."""
        out = []
        for r in rows:
            mask = torch.ones(1, r.size(0), dtype=torch.bool)
            out.append(project(r.unsqueeze(0), mask, self.eps, self.norm, self.granularity)[0])
        return out

    def sizes_of(self, flat_rows: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
        """Each cached sentence's size in the ball's measure (M float32)."""
        return cache_math.row_norms(flat_rows, offsets, self.norm, self.granularity)

    def load_sizes(self, store: PerturbationCacheStore, name: str) -> Optional[Dict[str, np.ndarray]]:
        """The cached sentences' sizes ``neighbor`` mode reads (None in the other modes):
        stored at finalisation in the measure of the run that finalised. A resume with
        another --adv-norm / --adv-granularity is refused by the layout (layout.json
        records the ball); sizes in another measure are still recomputed in memory here
        (one pass over the rows) rather than trusted."""
        if self.mode != "neighbor":
            return None
        stored = store.generation_info(name).get("norm_measure")
        if stored == self.measure:
            return {side: store.load_array(name, side, "sizes") for side in store.sides}
        logger.info(f"ARCH cache: {name} has its sentence sizes in the measure {stored}, this run's is "
                    f"{self.measure}; computing them")
        return {side: self.sizes_of(store.perturbation_rows(name, side), store.offsets[side])
                for side in store.sides}
