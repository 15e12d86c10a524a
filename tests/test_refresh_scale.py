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
    real = C._chunk_bounds
    monkeypatch.setattr(C, "CHUNK_BYTES", 4 * dim * 40)  # ~40 rows: many chunks

    def spy(*a):
        bounds = real(*a)
        blocks.extend(4 * dim * int(offsets[end] - offsets[start]) for start, end in bounds)
        return bounds

    monkeypatch.setattr(C, "_chunk_bounds", spy)
    for threads in (1, 4, None):  # chunks run on threads: the same bits whatever their count
        got = C.row_means(rows, offsets, threads=threads), C.row_norms(rows, offsets, threads=threads)
        for g, w in zip(got, one_chunk):
            assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), threads
    # whole sentences per chunk: at most one sentence (8 rows) over the budget
    assert len(blocks) > 30 and max(blocks) <= 4 * dim * (40 + 8)


@pytest.mark.fast
def test_an_error_in_a_chunk_on_a_thread_reaches_the_caller():
    offsets = np.arange(0, 41, 4)
    rows = np.ones((40, 3), dtype=np.float16)
    rows_that_fail = type("Rows", (), {"shape": rows.shape, "__getitem__": lambda self, k: 1 / 0})()
    with pytest.raises(ZeroDivisionError):
        C.row_means(rows_that_fail, offsets, chunk_rows=8, threads=4)
    assert C.row_means(rows, offsets, chunk_rows=8, threads=4).sum() == 30


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


def test_host_threads_benchmark_compares_thread_counts_on_the_same_rows(tmp_path):
    from benchmarks import host_threads as H

    res = H.measure(3000, 16, 1, str(tmp_path))
    assert res["cached"] == 300 and res["rows_gib"] > 0 and res["threads"] >= 1
    assert set(res["seconds"]) == {"1", str(res["threads"])} and res["speedup"] > 0
    assert "Speed-up" in H.markdown(res) and list(tmp_path.iterdir()) == []
