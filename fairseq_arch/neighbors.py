"""Exact K-nearest-neighbour search by cosine similarity (paper Eq. 4).

The database is the set of cached sentences (p N vectors), the queries are all
other sentences, searched in chunks so that N = 10^6 fits in a few GB. Backends:

- ``faiss-cpu``: ``IndexFlatIP`` on L2-normalised vectors (exact inner product);
- ``faiss-gpu``: the same index on the training GPU when faiss has a GPU build;
- ``torch``: exact matmul + top-k on the training device, used on CUDA when faiss
  has no GPU build, wherever faiss is not installed, and as the brute-force
  reference in the tests. The similarity block is tiled so that it never exceeds
  :data:`TORCH_BLOCK_BYTES` (a 32768-query chunk against 450k cached sentences
  would otherwise be a 59 GB matrix on the GPU).
All three are exact, so they agree up to ties and float rounding. Which one ran is
logged once per index (and stored with each cache generation).

faiss is an extra (``pip install -e .[cpu]`` or ``.[gpu]``): faiss-cpu and faiss-gpu
both install the package ``faiss``, so with both installed the install order decides
which one is imported and uninstalling either breaks the other. That state is
refused with the command that fixes it.
"""

import importlib.metadata
import logging
from typing import List, Optional, Tuple

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


# largest similarity block (queries x database, float32) the torch backend materialises
TORCH_BLOCK_BYTES = 1 << 30


class FaissConflictError(ImportError):
    """More than one faiss distribution is installed (they overwrite each other)."""


def faiss_distributions() -> List[str]:
    """Installed distributions that provide the ``faiss`` package (faiss-cpu,
    faiss-gpu, faiss-gpu-cu12, ...), by their metadata."""
    names = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "faiss" or name.startswith("faiss-"):
            names.add(name)
    return sorted(names)


def check_faiss_distributions(names: Optional[List[str]] = None) -> None:
    names = faiss_distributions() if names is None else names
    if len(names) > 1:
        keep = next((n for n in names if "gpu" in n), names[0])
        raise FaissConflictError(
            f"several faiss distributions are installed ({', '.join(names)}): they all own the package "
            "'faiss', so which one is imported depends on the install order. Keep one: "
            f"pip uninstall -y {' '.join(names)} && pip install {keep} "
            "(or reinstall with pip install -e .[cpu] / .[gpu], README \"Dependencies\")")


_faiss_module = None


def _faiss():
    """The faiss module, or None when no faiss distribution is installed."""
    global _faiss_module
    if _faiss_module is None:
        check_faiss_distributions()
        # faiss logs every instruction set it fails to load (avx512, avx2) at INFO
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        try:
            import faiss
        except ImportError:
            return None
        _faiss_module = faiss
    return _faiss_module


def faiss_has_gpu() -> bool:
    faiss = _faiss()
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(device: torch.device) -> str:
    """faiss on the index's device when the installed faiss can run there, else the
    exact tiled torch search on that device (same neighbours up to ties)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    return "faiss-cpu" if _faiss() is not None else "torch"


def _backend_reason(backend: str, device: torch.device) -> str:
    if backend != "torch":
        return ""
    if _faiss() is None:
        return " (faiss not installed: pip install -e .[cpu] or .[gpu] for faster searches at scale)"
    if device.type == "cuda":
        return " (this faiss has no GPU support: pip install -e .[gpu])"
    return ""


def tile_rows(n_queries: int, n_database: int, block_bytes: int) -> Tuple[int, int]:
    """(query rows, database rows) per similarity block so that the float32 block
    ``q x d`` stays within ``block_bytes``: whole database rows first (one pass, one
    top-k), else one query at a time against database tiles."""
    assert block_bytes >= 4, f"block budget {block_bytes} bytes holds no similarity"
    per_row = 4 * max(n_database, 1)
    if per_row <= block_bytes:
        return max(1, min(n_queries, block_bytes // per_row)), n_database
    return 1, max(1, block_bytes // 4)


def tiled_knn(q: torch.Tensor, db: torch.Tensor, k: int, block_bytes: int = TORCH_BLOCK_BYTES,
              stats: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``q @ db.t()`` (rows already normalised, same device) in blocks
    of at most ``block_bytes``; database tiles are merged with a running top-k.
    ``stats["max_block_bytes"]`` records the largest block made (for the tests)."""
    n, m = q.size(0), db.size(0)
    rows, cols = tile_rows(n, m, block_bytes)
    out_s = torch.empty(n, k, device=q.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=q.device)
    for a in range(0, n, rows):
        qa = q[a:a + rows]
        best_s, best_i = None, None
        for c in range(0, m, cols):
            block = qa @ db[c:c + cols].t()  # rows x cols
            if stats is not None:
                stats["max_block_bytes"] = max(stats.get("max_block_bytes", 0), block.numel() * block.element_size())
            s, i = block.topk(min(k, block.size(1)), dim=1)
            i = i + c
            if best_s is not None:
                both_s, both_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
                s, j = both_s.topk(min(k, both_s.size(1)), dim=1)
                i = both_i.gather(1, j)
            best_s, best_i = s, i
            del block
        out_s[a:a + rows], out_i[a:a + rows] = best_s, best_i
    return out_s, out_i


class CosineIndex:
    """Exact cosine-similarity index over ``database`` (M x C) on ``device``."""

    def __init__(self, database: torch.Tensor, device="cpu", backend: str = None,
                 block_bytes: int = TORCH_BLOCK_BYTES):
        self.device = torch.device(device)
        self.backend = backend or choose_backend(self.device)
        self.size = database.size(0)
        self.block_bytes = block_bytes
        self.stats = {}
        logger.info(f"neighbour search: {self.backend} on {self.device}, {self.size} cached sentences"
                    f"{_backend_reason(self.backend, self.device)}")
        db = normalize_rows(database)
        if self.backend == "torch":
            self._db = db.to(self.device)
            return
        faiss = _faiss()
        if faiss is None:
            raise ImportError(f"neighbour backend {self.backend!r} needs faiss: pip install -e .[cpu] (or .[gpu])")
        index = faiss.IndexFlatIP(db.size(1))
        if self.backend == "faiss-gpu":
            # the training step's cached blocks would otherwise sit beside faiss's
            # own allocations (its temporary memory is sized from what is free)
            torch.cuda.empty_cache()
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
            s, i = tiled_knn(q.to(self.device), self._db, k, self.block_bytes, self.stats)
            return s.cpu(), i.cpu()
        s, i = self._index.search(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32), k)
        return torch.from_numpy(s), torch.from_numpy(i).long()


# The neighbour-table degeneracy check (a warning, never a refusal). When the sentence
# vectors collapse (non-finite or constant embedding rows, sentences of <unk> only), every
# score ties and the search returns the same cached sentence for everyone: all uncached
# sentences are then trained with one sentence's perturbation, and nothing fails.
# Rule: one cached sentence is the nearest neighbour of more than DEGENERATE_SHARE (half)
# of the uncached sentences. A working search spreads them: measured (p = 0.1 and 0.3,
# K = 1, both sides), the most common nearest neighbour serves at most 1.0% of Multi30k's
# 29k training sentences with the model's initial embeddings, at most 8.8% of a 1500-
# sentence Multi30k slice with initial or trained embeddings (the quality benchmark's
# baseline, epoch 48), with 65-93% of the cached sentences serving someone; a collapse
# gives 100% and 1 (tests/test_bad_input.py measures a slice again). Half is five times
# the worst measured share, far from both. A rule on the number of distinct neighbours
# was not taken: it depends on p N and on hubness, the top share does not. Below
# DEGENERATE_MIN_CACHED cached sentences a shared neighbour is unavoidable, and below
# DEGENERATE_MIN_QUERIES uncached ones the share is noise: no verdict.
DEGENERATE_SHARE = 0.5
DEGENERATE_MIN_CACHED = 8
DEGENERATE_MIN_QUERIES = 32


def neighbour_concentration(nearest: np.ndarray) -> Tuple[float, int, int]:
    """(share of the most common value, that value, number of distinct values) of the
    nearest-neighbour column of the uncached sentences (cached positions, >= 0)."""
    nearest = np.asarray(nearest).reshape(-1)
    if nearest.size == 0:
        return 0.0, -1, 0
    values, counts = np.unique(nearest, return_counts=True)
    top = int(np.argmax(counts))
    return float(counts[top]) / nearest.size, int(values[top]), len(values)


def degenerate_neighbours(nearest: np.ndarray, num_cached: int, side: str = "") -> Optional[str]:
    """A warning when one cached sentence is the nearest neighbour of more than
    DEGENERATE_SHARE of the uncached sentences (rule above), else None."""
    nearest = np.asarray(nearest).reshape(-1)
    if num_cached < DEGENERATE_MIN_CACHED or nearest.size < DEGENERATE_MIN_QUERIES:
        return None
    share, value, distinct = neighbour_concentration(nearest)
    if share <= DEGENERATE_SHARE:
        return None
    return (f"ARCH neighbour table{' (' + side + ')' if side else ''} is degenerate: cached sentence {value} is "
            f"the nearest neighbour of {share:.0%} of the {nearest.size} uncached sentences ({distinct} distinct "
            f"neighbours among {num_cached} cached): their perturbations are all rebuilt from it. The sentence "
            "vectors have collapsed: check --arch-neighbor-embeddings (non-finite or constant rows) or the "
            "model's embeddings")
