"""Exact K-nearest-neighbour search by cosine similarity (paper Eq. 4).

The database is the set of cached sentences (p N vectors), the queries are all
other sentences, searched in chunks so that N = 10^6 fits in a few GB. Backends:

- ``faiss-cpu``: ``IndexFlatIP`` on L2-normalised vectors (exact inner product);
- ``faiss-gpu``: the same index on the training GPU when faiss has a GPU build;
- ``torch``: exact matmul + top-k on the training device, used on CUDA when faiss
  has no GPU build, and as the brute-force reference in the tests.
All three are exact, so they agree up to ties and float rounding.
"""

import logging
from typing import Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

_TINY = 1e-12


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm (zero rows stay zero): inner product = cosine."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(_TINY)


def brute_force_knn(queries: torch.Tensor, database: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference exact search: (scores, indices), each ``n x k``, best first."""
    assert 1 <= k <= database.size(0), f"k={k} but only {database.size(0)} candidates"
    sims = normalize_rows(queries) @ normalize_rows(database).t()
    return sims.topk(k, dim=1, largest=True, sorted=True)


def _faiss():
    # faiss logs every instruction set it fails to load (avx512, avx2) at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss  # noqa: F401
    except ImportError as e:  # pragma: no cover - dependency is in setup.py
        raise ImportError(
            "fairseq-arch needs faiss for the neighbour search: pip install faiss-cpu "
            "(or faiss-gpu on CUDA machines)"
        ) from e
    return faiss


def faiss_has_gpu() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    return "faiss-cpu"


class CosineIndex:
    """Exact cosine-similarity index over ``database`` (M x C) on ``device``."""

    def __init__(self, database: torch.Tensor, device="cpu", backend: str = None):
        self.device = torch.device(device)
        self.backend = backend or choose_backend(self.device)
        self.size = database.size(0)
        db = normalize_rows(database)
        if self.backend == "torch":
            self._db = db.to(self.device)
            return
        faiss = _faiss()
        index = faiss.IndexFlatIP(db.size(1))
        if self.backend == "faiss-gpu":
            self._res = faiss.StandardGpuResources()
            dev = self.device.index if self.device.index is not None else torch.cuda.current_device()
            index = faiss.index_cpu_to_gpu(self._res, dev, index)
        elif self.backend != "faiss-cpu":
            raise ValueError(f"unknown neighbour backend {self.backend!r}")
        index.add(np.ascontiguousarray(db.cpu().numpy(), dtype=np.float32))
        self._index = index

    def search(self, queries: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices into the database), each ``n x k`` on the CPU, best first."""
        assert 1 <= k <= self.size, f"K={k} neighbours asked but only {self.size} cached sentences"
        if queries.size(0) == 0:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        q = normalize_rows(queries)
        if self.backend == "torch":
            s, i = (q.to(self.device) @ self._db.t()).topk(k, dim=1)
            return s.cpu(), i.cpu()
        s, i = self._index.search(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32), k)
        return torch.from_numpy(s), torch.from_numpy(i).long()
