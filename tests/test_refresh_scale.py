"""Issue 22: the end of a refresh at scale. The row means and sizes of the finalisation
read the rows in chunks bounded in bytes (whatever d) with the same bits as in one
chunk, and benchmarks/refresh_scale.py times RefreshFinalizer.finalize per stage on a
synthetic dataset (tiny here) and extrapolates each stage by its unit of work."""

import numpy as np
import pytest

from fairseq_arch import cache_math as C


@pytest.mark.fast
@pytest.mark.parametrize("dim", [3, 1024])
def test_default_chunks_are_bounded_in_bytes_and_change_no_bit(dim, monkeypatch):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = rng.standard_normal((int(offsets[-1]), dim)).astype(np.float16)
    one_chunk = C.row_means(rows, offsets, chunk_rows=len(rows)), C.row_norms(rows, offsets, chunk_rows=len(rows))
    blocks = []
    real = C._sentence_chunks
    monkeypatch.setattr(C, "CHUNK_BYTES", 4 * dim * 40)  # ~40 rows: many chunks
    monkeypatch.setattr(C, "_sentence_chunks", lambda *a: (blocks.append(b[2].nbytes) or b for b in real(*a)))
    got = C.row_means(rows, offsets), C.row_norms(rows, offsets)
    for g, w in zip(got, one_chunk):
        assert np.array_equal(g.view(np.uint32), w.view(np.uint32))
    # whole sentences per chunk: at most one sentence (8 rows) over the budget
    assert len(blocks) > 10 and max(blocks) <= 4 * dim * (40 + 8)


def test_benchmark_times_every_stage_through_the_finalizer(tmp_path):
    from benchmarks import refresh_scale as R

    row = R.one_scale(3000, 16, 8, "cpu", str(tmp_path))
    assert row["cached"] == 300 and row["backend"] in ("faiss-cpu", "torch")
    assert set(row["stages_s"]) == set(R.STAGES) | {"other"}
    assert all(v >= 0 for v in row["stages_s"].values()) and row["finalize_s"] > 0
    assert row["units"]["search_flops"] == 2 * 2 * 2700 * 300 * 8
    assert list(tmp_path.iterdir()) == []  # the cache dir is removed
    wmt = R.extrapolate(row)
    # scaled by the unit of work: 4.05M x 450k x 1024 against 2700 x 300 x 8
    assert wmt["search"] == pytest.approx(row["stages_s"]["search"] * 4_050_000 * 450_000 * 1024 / (2700 * 300 * 8))
    assert "Extrapolation to WMT'16" in R.markdown([row])
