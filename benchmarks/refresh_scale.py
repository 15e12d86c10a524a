"""The end of a refresh at WMT scale (issue 22): the finalisation of one generation --
shard merge, row means, sizes, Eq. 4 sentence vectors, the neighbour search, checksums --
timed per stage through the plugin's own code (PerturbationCacheStore, NeighborSearch,
RefreshFinalizer.finalize) on a synthetic dataset, and extrapolated to WMT'16 En-De.

Assumptions: 4.5M pairs, ~27 BPE tokens per side on average (WMT'16 En-De with a 32k
joined BPE: ~120M source tokens / 4.5M); lengths uniform in 4..50 (mean 27), tokens
Zipf over 32k types; p = 0.1, K = 1, float16 rows, Transformer-big d = 1024. Every
cached row is written by "the refresh epoch" into rank 0's shard (as a training run
does), so the merge folds all of them. The rows' values do not change any stage's time.

Scaling model (fitted per unit of work, extrapolated from the largest scale measured):
merge, means, sizes, checksums grow with the cached rows' bytes (cached tokens x
row_dim); sentence vectors with all tokens x search_dim; the search with
N_uncached x M_cached x search_dim. ``row_dim`` and ``search_dim`` are separate so
that a run can keep the disk small (row_dim) and the search at full size (search_dim).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from . import common
from .scale import _Dict

WMT_PAIRS, WMT_TOKENS, WMT_DIM, FRACTION, VOCAB = 4_500_000, 27, 1024, 0.1, 32000
# the goal: a refresh's finalisation within 5 minutes on one GPU (< 1% of a WMT epoch)
GOAL_S = 300.0
STAGES = ("merge", "means", "sizes", "vectors", "search", "checksums")
# the unit of work each stage's time grows with (see the module docstring)
UNITS = {"merge": "row_bytes", "means": "row_bytes", "sizes": "row_bytes", "checksums": "row_bytes",
         "vectors": "token_dims", "search": "search_flops"}


class _Side:
    """One side's sentences as flat tokens + offsets (a list of 4.5M arrays would cost
    more memory and time than the cache code under test)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    def __getitem__(self, i):
        return self.flat[self.offsets[i]: self.offsets[i + 1]]


class SyntheticPairs:
    """The slice of LanguagePairDataset the cache reads: src/tgt token arrays and sizes."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        sides = []
        for _ in range(2):
            lengths = rng.integers(WMT_TOKENS - 23, WMT_TOKENS + 24, size=n)  # mean 27, eos included
            flat = np.minimum(rng.zipf(1.2, size=int(lengths.sum())) + 3, VOCAB - 1).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            flat[offsets[1:] - 1] = 2  # eos
            sides.append((_Side(flat, offsets), lengths))
        (self.src, self.src_sizes), (self.tgt, self.tgt_sizes) = sides


def _timer(stages: dict, key: str, fn, sync: bool):
    """``fn`` with its seconds added to ``stages[key]`` (after a device sync on CUDA)."""
    def run(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        if sync:
            torch.cuda.synchronize()
        stages[key] = stages.get(key, 0.0) + time.perf_counter() - t0
        return out
    return run


def write_refresh_rows(store, name: str, batch: int = 2048) -> float:
    """Every cached row of both sides into this rank's shard (what the refresh epoch's
    batches do), from one random pool: seconds taken."""
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for side in store.sides:
        off, dim = store.offsets[side], store.dims[side]
        pool = (rng.standard_normal((int(np.diff(off).max()), dim)) * 1e-3).astype(store.dtype)
        for start in range(0, store.num_cached, batch):
            pos = range(start, min(start + batch, store.num_cached))
            store.write_rows(name, side, pos, [pool[: off[p + 1] - off[p]] for p in pos])
    store.flush(name)
    return time.perf_counter() - t0


def _instrument(store, search, sizer, stages: dict, sync: bool):
    """Per-stage timers on the instances (and cache_math.row_means, which finalize.py
    calls through its module): the finalizer itself runs unchanged."""
    from fairseq_arch import cache_math

    store.merge_shards = _timer(stages, "merge", store.merge_shards, sync)
    store.mark_complete = _timer(stages, "checksums", store.mark_complete, sync)
    sizer.sizes_of = _timer(stages, "sizes", sizer.sizes_of, sync)
    search.sentence_vectors = _timer(stages, "vectors", search.sentence_vectors, sync)
    search.compute_neighbors = _timer(stages, "neighbors", search.compute_neighbors, sync)
    real_means = cache_math.row_means
    cache_math.row_means = _timer(stages, "means", real_means, sync)
    return lambda: setattr(cache_math, "row_means", real_means)


def one_scale(n: int, row_dim: int, search_dim: int, device: str = "cpu", work: str = None) -> dict:
    """Build a cache of ``n`` synthetic pairs, write every cached row through the shards,
    and time RefreshFinalizer.finalize per stage; the cache dir is removed after."""
    from fairseq_arch.cache import PerturbationCacheStore
    from fairseq_arch.cache.finalize import RefreshFinalizer
    from fairseq_arch.cache.search import NeighborSearch
    from fairseq_arch.cache.sizes import RebuildSizer

    t0 = time.perf_counter()
    pairs = SyntheticPairs(n)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(VOCAB, search_dim, generator=g).to(device)  # shared embeddings (as Transformer-big)
    data_s = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="arch-refresh-", dir=work)
    try:
        store = PerturbationCacheStore(tmp, pairs.src_sizes, pairs.tgt_sizes, {"source": row_dim, "target": row_dim},
                                       FRACTION, 1, "float16", 1)
        search = NeighborSearch(store, pairs, {"source": _Dict(), "target": _Dict()}, num_neighbors=1,
                                neighbor_embeddings="fixed", fixed_embeddings={"source": w, "target": w}, seed=1)
        sizer = RebuildSizer("paper", (0.1, "l2", "sentence"))
        name = store.gen_name(1)
        t0 = time.perf_counter()
        store.create_or_check()
        store.open_layout()
        store.create_generation(name, None)
        create_s = time.perf_counter() - t0
        write_s = write_refresh_rows(store, name)
        row_bytes = sum(store.expected_bytes(s) for s in store.sides)
        disk = sum(os.path.getsize(os.path.join(tmp, name, f)) for f in os.listdir(os.path.join(tmp, name)))
        stages = {}
        restore = _instrument(store, search, sizer, stages, sync=torch.device(device).type == "cuda")
        t0 = time.perf_counter()
        try:
            RefreshFinalizer(store, search, sizer).finalize({"name": name, "epoch": 1}, model=None)
        finally:
            restore()
        total = time.perf_counter() - t0
        stages["search"] = stages.pop("neighbors") - stages["vectors"]
        stages["other"] = total - sum(stages[s] for s in STAGES)
        m, n_unc = int(store.num_cached), int(n - store.num_cached)
        return {
            "sentences": n, "cached": m, "row_dim": row_dim, "search_dim": search_dim, "device": device,
            "backend": search.last_backend, "tokens": int(pairs.src_sizes.sum() + pairs.tgt_sizes.sum()),
            "units": {"row_bytes": row_bytes,
                      "token_dims": int(pairs.src_sizes.sum() + pairs.tgt_sizes.sum()) * search_dim,
                      "search_flops": 2 * 2 * n_unc * m * search_dim},  # 2 sides, multiply-add
            "data_s": data_s, "create_s": create_s, "refresh_writes_s": write_s, "disk_peak_bytes": disk,
            "stages_s": stages, "finalize_s": total, "peak_rss_mb": common.peak_rss_mb(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wmt_units(row_dim: int = WMT_DIM, search_dim: int = WMT_DIM) -> dict:
    """The units of work of WMT'16 (module docstring's assumptions)."""
    m = int(round(WMT_PAIRS * FRACTION))
    tokens = 2 * WMT_PAIRS * WMT_TOKENS
    return {"row_bytes": 2 * m * WMT_TOKENS * row_dim * 2, "token_dims": tokens * search_dim,
            "search_flops": 2 * 2 * (WMT_PAIRS - m) * m * search_dim}


def extrapolate(row: dict, target: dict = None) -> dict:
    """Each stage's seconds scaled by its unit of work from ``row`` to ``target``
    (default WMT'16)."""
    target = target or wmt_units()
    out = {s: row["stages_s"][s] * target[UNITS[s]] / row["units"][UNITS[s]] for s in STAGES}
    out["total"] = sum(out.values())
    return out


def _gpu_estimate(tflops: float = 40.0) -> float:
    """The search's seconds on one H100/H200 in fp32 (no TF32: torch's default for
    matmul) at ``tflops`` sustained: an assumption until a GPU run measures it."""
    return wmt_units()["search_flops"] / (tflops * 1e12)


def markdown(rows) -> str:
    lines = ["### End of a refresh at WMT scale (synthetic rows, p=0.1, K=1, float16 rows, both sides)", "",
             "| sentences | cached | row d / search d | rows on disk (+ shards) | " + " | ".join(STAGES)
             + " | other | finalisation | peak RSS |", "|---" * (len(STAGES) + 7) + "|"]
    for r in rows:
        st = r["stages_s"]
        lines.append(f"| {r['sentences']:,} | {r['cached']:,} | {r['row_dim']} / {r['search_dim']} | "
                     f"{r['units']['row_bytes'] / 2**30:.2f} GiB ({r['disk_peak_bytes'] / 2**30:.2f}) | "
                     + " | ".join(f"{st[s]:.2f} s" for s in STAGES)
                     + f" | {st['other']:.2f} s | {r['finalize_s']:.1f} s | {r['peak_rss_mb']:.0f} MiB |")
    big = max(rows, key=lambda r: r["units"]["search_flops"])
    per = {s: [r["stages_s"][s] / r["units"][UNITS[s]] for r in rows] for s in STAGES}
    wmt = extrapolate(big)
    u = wmt_units()
    gpu_search = _gpu_estimate()
    rest = wmt["total"] - wmt["search"]
    lines += ["", "Per unit of work at each scale (s per GiB of rows; vectors: ns per token x d; search: "
              "s per TFLOP), a check of the scaling model:", ""]
    for s in STAGES:
        scale_of = {"row_bytes": 2**30, "token_dims": 1e9, "search_flops": 1e12}[UNITS[s]]
        lines.append(f"- {s}: " + ", ".join(f"{v * scale_of:.3g}" for v in per[s]))
    lines += ["", f"Extrapolation to WMT'16 En-De ({WMT_PAIRS / 1e6:.1f}M pairs, {WMT_TOKENS} tokens per side, "
              f"d={WMT_DIM}, p={FRACTION}: {int(WMT_PAIRS * FRACTION):,} cached sentences, "
              f"{u['row_bytes'] / 2**30:.1f} GiB of rows, {u['search_flops'] / 1e15:.2f} PFLOP of search) from the "
              f"{big['sentences']:,}-sentence run:", "",
              "| stage | this CPU | one GPU (search on the device) |", "|---|---|---|"]
    for s in STAGES:
        gpu = {"search": f"{gpu_search:.0f} s (assumed 40 TFLOPS fp32)",
               "vectors": "at most this (tokens gathered on the host, embedding_bag on the device)"}.get(
                   s, "same (host work)")
        lines.append(f"| {s} | {wmt[s]:.0f} s | {gpu} |")
    gpu_total = rest + gpu_search
    lines += [f"| total | {wmt['total'] / 3600:.1f} h | {gpu_total:.0f} s ({gpu_total / 60:.1f} min) |", "",
              f"Goal (issue 22): <= {GOAL_S / 60:.0f} min on one GPU: "
              + ("met" if gpu_total <= GOAL_S else "NOT met") + f" by this estimate; the host stages alone take "
              f"{rest:.0f} s here (single-threaded numpy over the float16 rows: means + sizes "
              f"{wmt['means'] + wmt['sizes']:.0f} s). `python scripts/gpu_check.py --only refresh-wmt` measures it "
              "at full size on a GPU."]
    return "\n".join(lines)


def run_scale(n: int, row_dim: int, search_dim: int, device: str = "cpu", work: str = None) -> dict:
    """:func:`one_scale` in a subprocess (that scale's peak RSS alone)."""
    cmd = [sys.executable, "-c", "import json, warnings, logging; warnings.filterwarnings('ignore'); "
           "logging.disable(logging.WARNING); from benchmarks import refresh_scale as r; "
           f"print('RESULT', json.dumps(r.one_scale({n}, {row_dim}, {search_dim}, {device!r}, {work!r})))"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"refresh-scale {n} failed:\n{res.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main(args):
    rows = common.earlier_rows(args.out, "refresh_scale")  # re-measured scales are replaced
    for n in [int(s) for s in args.refresh_scales.split(",")]:
        print(f"refresh-scale: {n} pairs, d={args.refresh_dim} (one subprocess)", flush=True)
        row = run_scale(n, args.refresh_dim, args.refresh_dim, work=args.work)
        rows = [r for r in rows if (r["sentences"], r["row_dim"]) != (n, row["row_dim"])] + [row]
        print(f"refresh-scale: {n}: finalisation {row['finalize_s']:.1f} s", flush=True)
    rows.sort(key=lambda r: r["units"]["search_flops"])
    big = max(rows, key=lambda r: r["units"]["search_flops"])
    common.write_report(args.out, "refresh_scale", {"rows": rows, "wmt_units": wmt_units(),
                                                   "wmt_extrapolated_cpu_s": extrapolate(big),
                                                   "wmt_gpu_search_estimate_s": _gpu_estimate()},
                        markdown(rows))
