"""python -m benchmarks host-threads: the end-of-refresh row means and sizes on one thread
against several (fairseq_arch/cache_math.py ``_each_chunk``), interleaved on the same rows.

The rows are synthetic float16 token rows in a memory-mapped file, as the cache keeps them
(``--refresh-scales``' first count of sentence pairs, p = 0.1, 27 tokens, ``--refresh-dim``).
A first untimed pass puts the file in the page cache; then each round times means + sizes
with 1 thread and with ``host_threads()`` threads, in a new random order every round.
The values are compared bit for bit.
"""

import os
import random
import shutil
import statistics
import tempfile
import time

import numpy as np

from . import common

TOKENS = 27  # WMT'16 En-De: mean tokens per side (refresh_scale.WMT_TOKENS)


def synthetic_rows(path: str, sentences: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(TOKENS // 2, TOKENS * 3 // 2 + 1, size=sentences)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(int(offsets[-1]), dim))
    for lo in range(0, len(rows), 65536):
        hi = min(lo + 65536, len(rows))
        rows[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32) * 0.01
    rows.flush()
    return np.load(path, mmap_mode="r"), offsets


def means_and_sizes(rows, offsets, threads):
    from fairseq_arch import cache_math

    t0 = time.perf_counter()
    out = cache_math.row_means(rows, offsets, threads=threads), cache_math.row_norms(rows, offsets, threads=threads)
    return time.perf_counter() - t0, out


def measure(pairs: int, dim: int, rounds: int, work: str) -> dict:
    from fairseq_arch.cache_math import host_threads

    cached = pairs // 10
    tmp = tempfile.mkdtemp(prefix="host-threads-", dir=work)
    try:
        rows, offsets = synthetic_rows(os.path.join(tmp, "rows.npy"), cached, dim)
        many = host_threads()
        _, reference = means_and_sizes(rows, offsets, 1)  # untimed: the page cache
        times, rng = {1: [], many: []}, random.Random(0)
        for _ in range(rounds):
            for threads in rng.sample([1, many], 2):
                dt, out = means_and_sizes(rows, offsets, threads)
                times[threads].append(dt)
                assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(out, reference))
        gib = rows.nbytes / 2 ** 30
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs": pairs, "cached": cached, "dim": dim, "rows_gib": gib, "rounds": rounds, "threads": many,
            "seconds": {str(k): v for k, v in med.items()}, "speedup": med[1] / med[many]}


def markdown(res: dict) -> str:
    s = res["seconds"]
    return (f"### End-of-refresh row means + sizes, 1 thread vs {res['threads']} ({res['cached']:,} cached sentences of "
            f"{res['pairs']:,} pairs, d={res['dim']}, {res['rows_gib']:.2f} GiB of float16 rows in the page cache; "
            f"median of {res['rounds']} interleaved rounds)\n\n"
            f"| threads | seconds | GiB / s |\n|---|---|---|\n"
            + "".join(f"| {k} | {v:.2f} | {res['rows_gib'] / v:.2f} |\n" for k, v in s.items())
            + f"\nSpeed-up {res['speedup']:.2f}x with {res['threads']} threads; the same bits (compared every round).")


def main(a) -> None:
    pairs = int(a.refresh_scales.split(",")[0])
    res = measure(pairs, a.refresh_dim, a.time_rounds or 3, a.work)
    common.write_report(a.out, "host_threads", res, markdown(res))
