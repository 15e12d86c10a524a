"""The neighbour search backends (fairseq_arch/neighbors.py): tiled torch search under a
memory budget, backend choice with and without faiss, and the faiss-cpu + faiss-gpu
conflict. Pure tests: no fairseq, no training."""

import logging

import pytest
import torch

from fairseq_arch import neighbors
from fairseq_arch.neighbors import CosineIndex, brute_force_knn, tile_rows, tiled_knn

pytestmark = pytest.mark.fast


def _data(n_db=700, n_q=900, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_db, dim, generator=g), torch.randn(n_q, dim, generator=g)


@pytest.mark.parametrize("budget", [4 * 700 * 900, 4 * 700 * 3, 4 * 700, 4 * 50, 4 * 3])
@pytest.mark.parametrize("k", [1, 4])
def test_tiled_search_equals_brute_force_and_stays_in_budget(budget, k):
    db, q = _data()
    ref_s, ref_i = brute_force_knn(q, db, k)
    stats = {}
    s, i = tiled_knn(neighbors.normalize_rows(q), neighbors.normalize_rows(db), k, budget, stats)
    assert torch.equal(i, ref_i)
    assert torch.allclose(s, ref_s, atol=1e-6)
    assert 0 < stats["max_block_bytes"] <= budget


def test_torch_index_bounds_the_similarity_block():
    """The issue's case in miniature: the whole chunk x database matrix (here 900 x 700
    floats = 2.5 MB) must not be made when the budget is 64 KiB."""
    db, q = _data()
    index = CosineIndex(db, "cpu", backend="torch", block_bytes=64 << 10)
    _, got = index.search(q, 3)
    assert torch.equal(got, brute_force_knn(q, db, 3)[1])
    assert index.stats["max_block_bytes"] <= 64 << 10
    assert index.stats["max_block_bytes"] >= (64 << 10) // 2  # and it uses the budget, not one row at a time


def test_tile_rows():
    assert tile_rows(10, 100, 4 * 100 * 10) == (10, 100)   # everything in one block
    assert tile_rows(10, 100, 4 * 100 * 3) == (3, 100)     # whole database rows, 3 queries a block
    assert tile_rows(10, 100, 4 * 40) == (1, 40)           # database tiles for one query
    with pytest.raises(AssertionError, match="budget"):
        tile_rows(10, 100, 2)


def test_default_budget_is_one_gib():
    assert neighbors.TORCH_BLOCK_BYTES == 1 << 30
    # the case: 32768 queries x 450k cached sentences -> one query row is 1.8 MB,
    # so a block holds 596 queries and stays under 1 GiB
    rows, cols = tile_rows(32768, 450_000, neighbors.TORCH_BLOCK_BYTES)
    assert cols == 450_000 and rows * cols * 4 <= 1 << 30


def test_backend_without_faiss_is_the_torch_search_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(neighbors, "_faiss", lambda: None)
    assert neighbors.choose_backend("cpu") == "torch"
    assert neighbors.choose_backend("cuda") == "torch"
    db, q = _data(50, 20)
    with caplog.at_level(logging.INFO, logger="fairseq_arch.neighbors"):
        index = CosineIndex(db, "cpu")
    assert index.backend == "torch"
    assert "faiss not installed" in caplog.text and "torch on cpu" in caplog.text
    assert torch.equal(index.search(q, 2)[1], brute_force_knn(q, db, 2)[1])
    with pytest.raises(ImportError, match="needs faiss"):
        CosineIndex(db, "cpu", backend="faiss-cpu")


def test_faiss_backend_is_logged(caplog):
    db, _ = _data(50, 20)
    with caplog.at_level(logging.INFO, logger="fairseq_arch.neighbors"):
        CosineIndex(db, "cpu")
    assert "neighbour search: faiss-cpu on cpu, 50 cached sentences" in caplog.text


def test_two_faiss_distributions_are_refused():
    neighbors.check_faiss_distributions(["faiss-cpu"])
    neighbors.check_faiss_distributions([])
    with pytest.raises(neighbors.FaissConflictError, match="pip uninstall -y faiss-cpu faiss-gpu-cu12"):
        neighbors.check_faiss_distributions(["faiss-cpu", "faiss-gpu-cu12"])


def test_this_environment_has_exactly_one_faiss():
    """scripts/install.sh installs .[cpu] (or .[gpu] with ARCH_FAISS=gpu), never both."""
    names = neighbors.faiss_distributions()
    assert len(names) == 1, names


def test_faiss_gpu_index_is_built_after_emptying_torch_cache(monkeypatch):
    """faiss sizes its temporary GPU memory from what is free: the torch caching
    allocator's blocks are handed back first. Simulated with a stub faiss."""
    calls = []

    class StubIndex:
        def __init__(self, dim):
            pass

        def add(self, x):
            calls.append("add")

    class StubFaiss:
        IndexFlatIP = StubIndex

        def StandardGpuResources(self):
            calls.append("resources")

        def index_cpu_to_gpu(self, res, dev, index):
            calls.append(f"to_gpu:{dev}")
            return index

    monkeypatch.setattr(neighbors, "_faiss", lambda: StubFaiss())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    CosineIndex(torch.randn(5, 4), torch.device("cuda", 0), backend="faiss-gpu")
    assert calls == ["empty_cache", "resources", "to_gpu:0", "add"]
