"""The cache's pure math: Tc schedule, EMA (Eq. 2), rebuild (Eq. 3), sentence
vectors and nearest neighbours (Eq. 4), against hand computations / brute force."""

import numpy as np
import pytest
import torch

from fairseq_arch import cache_math as C
from fairseq_arch.neighbors import CosineIndex, brute_force_knn

pytestmark = pytest.mark.fast  # pure functions, no fairseq training


def test_refresh_schedule():
    assert [e for e in range(1, 40) if C.is_refresh_epoch(e, 15)] == [1, 16, 31]
    assert [e for e in range(1, 6) if C.is_refresh_epoch(e, 1)] == [1, 2, 3, 4, 5]
    assert [e for e in range(1, 50) if C.is_refresh_epoch(e, 0)] == [1]  # Tc = inf
    assert C.last_refresh_epoch(15, 15) == 1 and C.last_refresh_epoch(16, 15) == 16
    assert C.last_refresh_epoch(30, 15) == 16 and C.last_refresh_epoch(99, 0) == 1


def test_ema_rule():
    fresh = torch.tensor([[1.0, 2.0]])
    assert torch.equal(C.ema_update(None, fresh, 0.01), fresh)  # first refresh: fresh as is
    cached = torch.tensor([[3.0, -1.0]])
    got = C.ema_update(cached, fresh, 0.25)
    assert torch.allclose(got, torch.tensor([[0.25 * 3 + 0.75 * 1, 0.25 * -1 + 0.75 * 2]]))
    assert torch.equal(C.ema_update(cached, fresh, 0.0), fresh)  # --arch-ema 0: no EMA
    with pytest.raises(AssertionError):
        C.ema_update(cached, fresh, 1.0)


def test_row_means_over_ragged_rows_and_chunks():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 4, 2, 5])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = rng.standard_normal((offsets[-1], 6)).astype(np.float16)
    want = np.stack([flat[offsets[i]:offsets[i + 1]].astype(np.float32).mean(0) for i in range(5)])
    for chunk in (1, 3, 7, 1 << 20):  # chunks smaller than a sentence still work
        assert np.allclose(C.row_means(flat, offsets, chunk_rows=chunk), want, atol=1e-6)


def test_rebuild_from_neighbors_matches_eq3_by_hand():
    # sample 0 has neighbours with word-averaged perturbations a, b; sample 1 has c
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])
    means = torch.stack([torch.stack([a, b]), torch.stack([c, c])])  # B x K x C
    rows = C.rebuild_from_neighbors(means, [3, 1])
    assert rows[0].shape == (3, 2) and rows[1].shape == (1, 2)
    assert torch.equal(rows[0], torch.tensor([[0.5, 1.0]] * 3))  # same vector on every token
    assert torch.equal(rows[1], c[None])


def test_sentence_vectors_are_mean_word_embeddings_without_specials():
    w = torch.arange(20, dtype=torch.float32).view(10, 2)  # token t -> [2t, 2t+1]
    flat = np.array([4, 5, 2, 7, 2, 2], dtype=np.int64)  # 2 = eos, left out
    offsets = np.array([0, 3, 5, 6])
    v = C.sentence_vectors(flat, offsets, w, ignore=(1, 2))
    assert torch.allclose(v[0], (w[4] + w[5]) / 2)
    assert torch.allclose(v[1], w[7])
    assert torch.equal(v[2], torch.zeros(2))  # no word: zero vector


@pytest.mark.parametrize("k", [1, 5])
def test_faiss_knn_agrees_with_brute_force(k):
    g = torch.Generator().manual_seed(0)
    db = torch.randn(300, 16, generator=g)
    q = torch.randn(500, 16, generator=g)
    _, ref = brute_force_knn(q, db, k)
    index = CosineIndex(db, "cpu")
    assert index.backend == "faiss-cpu"
    _, got = index.search(q, k)
    assert torch.equal(got, ref)
    # cosine, not inner product: scaling a query or a database row changes nothing
    _, got_scaled = CosineIndex(db * torch.rand(300, 1, generator=g) * 10, "cpu").search(q * 7, k)
    assert torch.equal(got_scaled, ref)
    _, got_torch = CosineIndex(db, "cpu", backend="torch").search(q, k)
    assert torch.equal(got_torch, ref)


def test_knn_rejects_more_neighbours_than_cached():
    with pytest.raises(AssertionError, match="neighbours"):
        CosineIndex(torch.randn(3, 4), "cpu").search(torch.randn(2, 4), 4)


@pytest.mark.fast
@pytest.mark.parametrize("seed", range(5))
def test_row_sources_index_the_cached_rows_then_one_vector_per_rebuilt_sentence(seed):
    """table[row_sources(lengths, cached)] equals the per-token rows of the batch: cached
    sentences' own rows, rebuilt sentences' vector on every token."""
    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, 9))
    lengths = rng.integers(0, 6, size=b)
    cached = rng.random(b) < 0.4
    rows = [torch.randn(int(n), 3) for n in lengths]  # what a cached sentence's rows are
    vecs = [torch.randn(3) for _ in range(b)]  # what a rebuilt sentence's vector is
    table = torch.cat([rows[i] for i in range(b) if cached[i]] + [vecs[i].view(1, 3) for i in range(b) if not cached[i]]
                      + [torch.zeros(0, 3)])
    want = torch.cat([rows[i] if cached[i] else vecs[i].expand(int(lengths[i]), 3) for i in range(b)] + [torch.zeros(0, 3)])
    idx = C.row_sources(lengths, cached)
    assert idx.dtype == np.int64 and idx.shape == (int(lengths.sum()),)
    assert torch.equal(table[torch.from_numpy(idx)], want)


@pytest.mark.fast
def test_rebuilt_vectors_are_the_rows_of_rebuild_from_neighbors():
    means = torch.randn(3, 2, 4)
    lengths = [2, 1, 3]
    for target in (None, torch.tensor([0.1, 0.2, 0.3])):
        vec = C.rebuilt_vectors(means, lengths, target)
        rows = C.rebuild_from_neighbors(means, lengths, target)
        assert all(torch.equal(r, vec[i].expand(lengths[i], 4)) for i, r in enumerate(rows))
