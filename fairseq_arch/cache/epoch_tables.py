"""Per-epoch neighbour tables (``--arch-neighbor-search epoch``): ``neighbors/e<epoch>/``
holds ``<side>_nbr.npy`` (N x K int32, as a generation's) and ``INFO.json`` (the
generation it was searched for, epoch, K, search time and backend, changed rows,
checksums). Kept outside the generation, which stays immutable once complete; a table
is written whole (a temporary directory renamed), so a run resumed mid-epoch finds the
table of the epoch's start or none."""

import json
import logging
import os
import shutil
from typing import Dict, Optional

import numpy as np

from .files import atomic_save_npy, atomic_write_json, crc32_problem, file_crc32, replaced_dir

logger = logging.getLogger(__name__)

INFO_FILE = "INFO.json"


def _table_file(side: str) -> str:
    return f"{side}_nbr.npy"


class EpochNeighborTables:
    """The directory ``neighbors/`` of a cache dir."""

    def __init__(self, root: str):
        self.root = root

    def epoch_dir(self, epoch: int) -> str:
        return os.path.join(self.root, f"e{epoch:04d}")

    def load_info(self, epoch: int, generation: str, k: int) -> Optional[dict]:
        """The INFO of the table of ``epoch`` written earlier (this epoch's start, before a
        crash or a mid-epoch checkpoint), if it is complete, of ``generation`` with ``k``
        neighbours, and undamaged; else None."""
        d = self.epoch_dir(epoch)
        try:
            with open(os.path.join(d, INFO_FILE)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        if info.get("generation") != generation or info.get("epoch") != epoch or info.get("k") != k:
            return None
        problem = crc32_problem(d, info.get("crc32", {}))
        if problem is not None:
            logger.warning(f"ARCH cache: {problem}; searching the neighbours of epoch {epoch} again")
            return None
        return info

    def table(self, epoch: int, side: str, mmap: bool = True) -> np.ndarray:
        return np.load(os.path.join(self.epoch_dir(epoch), _table_file(side)), mmap_mode="r" if mmap else None)

    def save(self, epoch: int, tables: Dict[str, np.ndarray], info: dict) -> dict:
        """Write the tables of ``epoch`` with ``info`` (their checksums added); returns the
        INFO written."""
        with replaced_dir(self.epoch_dir(epoch)) as tmp:
            for side, t in tables.items():
                atomic_save_npy(os.path.join(tmp, _table_file(side)), t)
            info = dict(info, crc32={_table_file(s): file_crc32(os.path.join(tmp, _table_file(s))) for s in tables})
            atomic_write_json(os.path.join(tmp, INFO_FILE), info)
        return info

    def remove_except(self, keep: Optional[int]) -> None:
        """Drop the tables of every epoch but ``keep`` (None: all)."""
        if not os.path.isdir(self.root):
            return
        for entry in os.listdir(self.root):
            if keep is None or entry != f"e{keep:04d}":
                shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
