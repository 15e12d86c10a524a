"""The GPU check (issue 11): one command that exercises, on real data, every path of the
plugin that only a GPU runs, and prints one line per check. Run it whenever a GPU is
available and put its output in the README (section "Multi-GPU ...").

    bash scripts/gpu-check.sh                # on a CUDA machine: about 5 minutes on one H100/H200
    bash scripts/gpu-check.sh --smoke        # on a CPU: the same script, tiny, fp32 only (its test)

Checks (each line: ``[gpu-check] <check> ok|FAIL|skip <what was measured>``):
  device    torch, CUDA, the GPU(s), which faiss is installed and whether it has GPU support
  search    the neighbour search on the GPU (tiled torch matmul; faiss-gpu when installed) against
            the CPU search: same top-1 neighbours, and the similarity blocks within their budget
  train-*   fp32 / --fp16 / --amp (--bf16 on request: fairseq 0.12 ties it to TPUs): ARCH trains 2 epochs of Multi30k (a refresh epoch, the
            cache finalised with the GPU search, a reuse epoch) with transformer_iwslt_de_en; the
            ascent moves delta away from its random start (mean ||delta_S - delta_0|| / eps over
            the refresh batches), no batch skipped, finite losses
  resume    a run stopped in the middle of the reuse epoch and resumed ends where the
            uninterrupted fp32 run ended (valid loss, relative difference: GPU kernels are not
            bitwise deterministic, so a tolerance)
  ddp       2 GPUs with fairseq's default pytorch_ddp (skipped with one GPU)
  cost      the interleaved cost benchmark (python -m benchmarks cost) on this GPU
  refresh-wmt  the end of a refresh (RefreshFinalizer: merge, means, sizes, neighbour search on the
            GPU, checksums) at WMT'16 size, 4.5M synthetic pairs, p=0.1, search d=1024; the rows at
            --refresh-row-dim (disk) and their stages scaled to d=1024 (benchmarks/refresh_scale.py;
            several minutes)
  ops       kernels per update the plugin launches itself (benchmarks/ops.py: reuse reads, seeded
            init, ascent steps, stores), torch profiler
"""

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

FAILED = []


def line(check: str, status: str, detail: str) -> None:
    if status == "FAIL":
        FAILED.append(check)
    print(f"[gpu-check] {check:<10} {status:<4} {detail}", flush=True)


def guarded(check):
    """Run a check; an exception is that check's FAIL line, and the others still run."""
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            except (Exception, SystemExit) as e:  # reported, the run goes on
                line(check, "FAIL", f"{type(e).__name__}: {str(e)[:300]} ({time.perf_counter() - t0:.0f}s)")
                return None
        return run
    return wrap


# -- device -------------------------------------------------------------------------------

@guarded("device")
def check_device():
    from fairseq_arch import neighbors

    faiss_dists = neighbors.faiss_distributions()
    gpu_faiss = neighbors.faiss_has_gpu() if torch.cuda.is_available() else False
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        mem = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        what = f"{len(names)} x {names[0]} ({mem:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = "no CUDA device (smoke mode on the CPU)"
    line("device", "ok", f"torch {torch.__version__}; {what}; faiss: {', '.join(faiss_dists) or 'none'}"
         f"{' (GPU support)' if gpu_faiss else ' (no GPU support)'}")


# -- neighbour search -----------------------------------------------------------------------

@guarded("search")
def check_search(smoke: bool):
    from fairseq_arch import neighbors
    from fairseq_arch.neighbors import CosineIndex

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the case: a 32768-query chunk against 450k cached sentences (d=512 here)
    n_db, n_q, dim, n_cmp = (20_000, 4096, 64, 1000) if smoke else (450_000, 32_768, 512, 4096)
    g = torch.Generator().manual_seed(0)
    db = torch.randn(n_db, dim, generator=g)
    q = torch.randn(n_q, dim, generator=g)
    ref_backend = "faiss-cpu" if neighbors._faiss() is not None else "torch"
    t0 = time.perf_counter()
    _, ref = CosineIndex(db, "cpu", backend=ref_backend).search(q[:n_cmp], 1)
    cpu_s = time.perf_counter() - t0
    budget = (64 << 20) if not smoke else (1 << 20)  # small enough to tile this case
    details, ok = [], True
    for block in (neighbors.TORCH_BLOCK_BYTES, budget):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        index = CosineIndex(db, dev, backend="torch", block_bytes=block)
        t0 = time.perf_counter()
        _, got = index.search(q, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        agree = (got[:n_cmp] == ref).float().mean().item()
        peak = ""
        if dev.type == "cuda":
            extra = torch.cuda.max_memory_allocated() - base - db.numel() * 4
            peak = f", peak above the database {extra / 2 ** 20:.0f} MiB"
        within = index.stats["max_block_bytes"] <= block
        ok = ok and within and agree >= 0.999
        details.append(f"torch/{dev.type} block<= {block / 2 ** 20:.0f} MiB: top-1 = {ref_backend} on "
                       f"{agree:.2%} of {n_cmp}, largest block {index.stats['max_block_bytes'] / 2 ** 20:.0f} MiB"
                       f"{peak}, {n_q} queries in {dt:.2f}s")
        del index
    if dev.type == "cuda" and neighbors.faiss_has_gpu():
        t0 = time.perf_counter()
        _, got = CosineIndex(db, dev, backend="faiss-gpu").search(q, 1)
        agree = (got[:n_cmp] == ref).float().mean().item()
        ok = ok and agree >= 0.999
        details.append(f"faiss-gpu: top-1 = {ref_backend} on {agree:.2%}, {time.perf_counter() - t0:.2f}s")
    elif dev.type == "cuda":
        details.append("faiss-gpu: not installed here (skip)")
    line("search", "ok" if ok else "FAIL", f"{n_db} cached x {n_q} queries, d={dim}; {ref_backend} on the CPU "
         f"{cpu_s:.2f}s for {n_cmp}; " + "; ".join(details))


# -- training -------------------------------------------------------------------------------

class Recorder:
    """Per criterion call: the deltas its perturbed forwards saw (first = the random start
    of an ascent, last = what the regulariser used); summarised as the ascent's movement."""

    def __init__(self, eps: float):
        self.eps = eps
        self.moves = []
        self.calls = 0

    def install(self):
        from fairseq_arch.criterions.adversarial_label_smoothed_cross_entropy import (
            AdversarialLabelSmoothedCrossEntropyCriterion as Crit,
        )
        from fairseq_arch.perturbation import sentence_norms

        real_fwd, real_pert = Crit.forward, Crit.perturbed_forward
        rec = self
        seen = []

        def forward(crit, model, sample, *a, **k):
            seen.clear()
            out = real_fwd(crit, model, sample, *a, **k)
            if len(seen) >= 2 and "source" in seen[0][0]:
                (first, mask), (last, _) = seen[0], seen[-1]
                d = sentence_norms(last["source"] - first["source"], mask)
                rec.moves.append(float(d.mean()) / rec.eps)
            rec.calls += 1
            return out

        def perturbed(crit, model, net_input, delta):
            seen.append(({k: v.detach().float() for k, v in delta.items()},
                         net_input["src_tokens"].ne(crit.padding_idx)))
            return real_pert(crit, model, net_input, delta)

        Crit.forward, Crit.perturbed_forward = forward, perturbed
        return lambda: (setattr(Crit, "forward", real_fwd), setattr(Crit, "perturbed_forward", real_pert))


class LogCapture(logging.Handler):
    """fairseq's --log-format json lines (train / valid epoch summaries) and overflow notes."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.epochs, self.valid, self.overflows, self.lines = [], [], 0, []

    def emit(self, record):
        msg = record.getMessage()
        self.lines.append(msg)
        if "overflow" in msg.lower():
            self.overflows += 1
        if msg.startswith("{"):
            try:
                obj = json.loads(msg)
            except ValueError:
                return
            if "train_loss" in obj and "train_wall" in obj:
                self.epochs.append(obj)
            if "valid_loss" in obj:
                self.valid.append(obj)


def train_flags(data: str, save: str, smoke: bool, extra=()):
    model = common.SMALL_MODEL if smoke else common.IWSLT_MODEL
    return [
        data, "--save-dir", save, *common.ARCH_FLAGS, *model, *(["--cpu"] if smoke else []),
        "--adv-method", "arch", "--arch-refresh-interval", "2", "--arch-cache-dir", os.path.join(save, "arch_cache"),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "400", "--dropout", "0.3", "--weight-decay", "0.0001", "--clip-norm", "0",
        "--max-tokens", "4096", "--max-epoch", "2", "--seed", "1", "--num-workers", "0",
        "--log-format", "json", "--log-interval", "1000", "--no-epoch-checkpoints", "--no-progress-bar",
        *extra,
    ]


def fairseq_train(flags):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as train_cli

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, flags)
    train_cli.main(convert_namespace_to_omegaconf(args))


def train_run(data, save, smoke, extra=()):
    """fairseq-train in-process; (summary dict, recorder, log capture)."""
    rec, cap = Recorder(eps=0.1), LogCapture()
    root = logging.getLogger()
    root.addHandler(cap)
    root.setLevel(logging.INFO)
    restore = rec.install()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fairseq_train(train_flags(data, save, smoke, extra))
    finally:
        restore()
        root.removeHandler(cap)
    wall = time.perf_counter() - t0
    last = cap.epochs[-1] if cap.epochs else {}
    skipped = sum(int(float(e.get("train_adv_skipped", 0) or 0)) for e in cap.epochs)
    return {
        "wall": wall, "epochs": len(cap.epochs), "updates": int(float(last.get("train_num_updates", 0) or 0)),
        "train_loss": float(last.get("train_loss", "nan")), "valid_loss": float(cap.valid[-1]["valid_loss"]) if cap.valid else float("nan"),
        "skipped": skipped, "overflows": cap.overflows,
        "move": sum(rec.moves) / len(rec.moves) if rec.moves else 0.0, "ascent_batches": len(rec.moves),
        "reuse": any("ARCH epoch 2: reuse" in m for m in cap.lines),
        "search": next((m for m in cap.lines if m.startswith("neighbour search:")), ""),
    }, rec, cap


PRECISIONS = {"fp32": [], "fp16": ["--fp16"], "amp": ["--amp"], "bf16": ["--bf16"]}
# fairseq 0.12's --bf16 "implies --tpu": without torch_xla the plugin refuses it at start, naming
# --amp and --fp16 (fairseq_arch/validation.py); not in the default list (--precisions ...,bf16
# checks that refusal)
DEFAULT_PRECISIONS = "fp32,fp16,amp"


def check_train(data, work, mode, smoke):
    @guarded(f"train-{mode}")
    def run():
        save = os.path.join(work, f"train-{mode}")
        shutil.rmtree(save, ignore_errors=True)  # a fresh run, never a resumed one
        r, _, _ = train_run(data, save, smoke, PRECISIONS[mode])
        finite = math.isfinite(r["train_loss"]) and math.isfinite(r["valid_loss"])
        ok = finite and r["epochs"] == 2 and r["reuse"] and r["skipped"] == 0 and r["move"] > 0.05
        line(f"train-{mode}", "ok" if ok else "FAIL",
             f"{r['updates']} updates in {r['wall']:.0f}s, train loss {r['train_loss']:.3f}, valid loss "
             f"{r['valid_loss']:.3f}; ascent moved delta {r['move']:.3f} x eps (mean of {r['ascent_batches']} "
             f"refresh batches); skipped {r['skipped']}; fp16 overflow notes {r['overflows']}; reuse epoch "
             f"{'ran' if r['reuse'] else 'MISSING'}; {r['search'] or 'no search line'}")
        return r
    return run()


@guarded("resume")
def check_resume(data, work, smoke, reference):
    if reference is None:
        line("resume", "skip", "no fp32 reference run")
        return
    save = os.path.join(work, "resume")
    shutil.rmtree(save, ignore_errors=True)
    stop = max(2, reference["updates"] * 3 // 4)  # inside the reuse epoch
    train_run(data, save, smoke, ["--max-update", str(stop)])
    r, _, _ = train_run(data, save, smoke)
    rel = abs(r["valid_loss"] - reference["valid_loss"]) / reference["valid_loss"]
    ok = r["updates"] == reference["updates"] and rel < 0.02
    line("resume", "ok" if ok else "FAIL",
         f"stopped at update {stop} (reuse epoch), resumed to {r['updates']} (uninterrupted: "
         f"{reference['updates']}); valid loss {r['valid_loss']:.4f} vs {reference['valid_loss']:.4f} "
         f"(relative difference {rel:.2%}, tolerance 2%)")


@guarded("ddp")
def check_ddp(data, work, smoke):
    n = torch.cuda.device_count()
    if n < 2:
        line("ddp", "skip", f"{n} GPU here: pytorch_ddp needs 2 (tested on CPU with gloo: tests/test_distributed.py)")
        return
    save = os.path.join(work, "ddp")
    shutil.rmtree(save, ignore_errors=True)
    cmd = [sys.executable, "-m", "fairseq_cli.train", *train_flags(data, save, smoke, ["--distributed-world-size", "2"])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    ok = p.returncode == 0 and "ARCH epoch 2: reuse" in p.stdout + p.stderr
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] if not ok else []
    line("ddp", "ok" if ok else "FAIL", f"2 GPUs, pytorch_ddp, 2 epochs (refresh, reuse) in "
         f"{time.perf_counter() - t0:.0f}s{'; ' + tail[0][:200] if tail else ''}")


def check_cost(work, out, smoke, model_arch=None):
    """The cost benchmark (its model: transformer_iwslt_de_en on a GPU), or at ``model_arch``
    (``cost-big``: Transformer-big, the paper's WMT model, fewer rounds)."""
    rounds, sentences = ("3", "300") if smoke else ("5" if model_arch else "20", "4000")
    cmd = [sys.executable, "-m", "benchmarks", "cost", "--work", work, "--out", out, "--rounds", rounds,
           "--sentences", sentences, "--skip-rss"] + (["--model-arch", model_arch] if model_arch else [])
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError((p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() else "failed")
    with open(os.path.join(out, "cost.json")) as f:
        res = json.load(f)
    m = res["methods"]
    parts = [f"{k} {m[k]['vs_none']:.2f}" for k in ("r3f", "smart", "arch-refresh", "arch-reuse", "arch (amortised)") if k in m]
    smart = m.get("arch (amortised)", {}).get("vs_smart")
    peaks = ", ".join(f"{k} {m[k]['peak_vs_none']:.2f}" for k in ("r3f", "smart", "arch (amortised)")
                      if m.get(k, {}).get("peak_vs_none") is not None)
    own = ", ".join(f"{k} {100 * m[k]['hot_path_share']:.1f}%" for k in ("smart", "arch-refresh", "arch-reuse")
                    if m.get(k, {}).get("hot_path_share") is not None)
    line("cost-big" if model_arch else "cost", "ok", f"x none per update ({res['config']['model']}, {res['config']['rounds']} rounds): "
         + ", ".join(parts) + (f"; arch amortised / smart {smart:.2f}" if smart else "")
         + (f"; peak tensor memory x none: {peaks}" if peaks else "") + (f"; own work: {own}" if own else ""))


@guarded("refresh-wmt")
def check_refresh_wmt(work, smoke, row_dim):
    from benchmarks import refresh_scale as rs

    dev = "cpu" if smoke else "cuda"
    n, rdim, sdim = (20_000, 64, 64) if smoke else (rs.WMT_PAIRS, row_dim, rs.WMT_DIM)
    r = rs.run_scale(n, rdim, sdim, dev, work)
    st = r["stages_s"]
    stages = ", ".join(f"{s} {st[s]:.1f}s" for s in rs.STAGES)
    what = (f"{n:,} pairs ({r['cached']:,} cached), rows d={rdim} ({r['units']['row_bytes'] / 2 ** 30:.1f} GiB), "
            f"search d={sdim} on {r['backend']}/{dev}: {stages}; finalisation {r['finalize_s']:.0f}s")
    if not smoke:
        # the host stages grow with the rows' bytes: this run's, scaled to d=1024 rows
        full = rs.extrapolate(r)["total"]
        what += (f"; with d={rs.WMT_DIM} rows {full:.0f}s (goal <= {rs.GOAL_S:.0f}s: "
                 f"{'met' if full <= rs.GOAL_S else 'NOT met'})")
    line("refresh-wmt", "ok", what)


@guarded("ops")
def check_ops(work, smoke):
    from benchmarks import ops

    line("ops", "ok", ops.summary(ops.measure(work, 300 if smoke else 1000)))


@guarded("peak-chunks")
def check_peak_chunks(work, out, smoke):
    """Peak tensor memory of r3f and smart (an ARCH reuse and refresh update) x none at
    Transformer-big, with --adv-chunks 1, 2, 4 (benchmarks/peak_chunks.py)."""
    from benchmarks import peak_chunks

    model = "transformer_tiny" if smoke else "transformer_wmt_en_de_big"
    res = peak_chunks.measure(work, model, 600 if smoke else 4000, [1, 2, 4], [], rounds=1 if smoke else 10)
    common.write_report(out, "peak_chunks", res, peak_chunks.markdown(res))
    secs = next(iter(res["seconds_by_depth"].values()))
    line("peak-chunks", "ok", peak_chunks.summary(res) + "; r3f s / update x c1: "
         + ", ".join(f"c{k} {secs[f'r3f c{k}'] / secs['r3f c1']:.2f}" for k in res["chunks"]))


@guarded("data")
def prepare_data(work, smoke, pairs):
    t0 = time.perf_counter()
    pairs = 600 if smoke else pairs
    data = common.multi30k_bin(work, pairs, n_eval=100 if smoke else 1014)
    line("data", "ok", f"Multi30k De-En, {pairs} training pairs, binarised in {time.perf_counter() - t0:.0f}s ({data})")
    return data


def run_benchmark_checks(only, args, smoke):
    """The checks that run a benchmark: cost, cost-big, ops, peak-chunks, refresh-wmt."""
    if "cost" in only:
        guarded("cost")(check_cost)(args.work, args.out or os.path.join(args.work, "cost"), smoke)
    if "cost-big" in only:
        # Transformer-big (d=1024, 6+6 layers: the paper's WMT model) on Multi30k's vocabulary
        guarded("cost-big")(check_cost)(args.work, os.path.join(args.out or os.path.join(args.work, "cost"), "big"),
                                        smoke, "transformer_tiny" if smoke else "transformer_wmt_en_de_big")
    if "ops" in only:
        check_ops(args.work, smoke)
    if "peak-chunks" in only:
        check_peak_chunks(args.work, args.out or os.path.join(args.work, "cost"), smoke)
    if "refresh-wmt" in only:
        check_refresh_wmt(args.work, smoke, args.refresh_row_dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every check that a CPU can run")
    ap.add_argument("--work", default="/tmp/arch-gpu-check", help="scratch space")
    ap.add_argument("--out", default=None, help="where the cost benchmark's report goes (default: <work>/cost)")
    ap.add_argument("--only", default="device,search,train,resume,ddp,cost,ops,peak-chunks,refresh-wmt", help="comma list of checks "
                    "(also: cost-big, the cost benchmark at Transformer-big size)")
    ap.add_argument("--precisions", default=DEFAULT_PRECISIONS,
                    help="train: comma list of fp32,fp16,amp,bf16 (bf16: fairseq 0.12 implies --tpu)")
    ap.add_argument("--pairs", type=int, default=29_000, help="train: Multi30k training pairs (GPU runs)")
    ap.add_argument("--refresh-row-dim", type=int, default=64,
                    help="refresh-wmt: d of the cached rows (disk: 4.5M pairs at d=1024 need ~93 GiB with the shards)")
    args = ap.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    only = set(args.only.split(","))
    os.makedirs(args.work, exist_ok=True)
    # fairseq's own log goes to a file: the console shows the check lines only
    log_path = os.path.join(args.work, "gpu-check.log")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    print(f"[gpu-check] log: {log_path}", flush=True)
    t0 = time.perf_counter()
    if "device" in only:
        check_device()
    if "search" in only:
        check_search(smoke)
    data = None
    if only & {"train", "resume", "ddp"}:
        data = prepare_data(args.work, smoke, args.pairs)
        if data is None:
            only -= {"train", "resume", "ddp"}
    ref = None
    if "train" in only or "resume" in only:
        for mode in [m for m in args.precisions.split(",") if m]:
            if mode not in PRECISIONS:
                raise SystemExit(f"gpu-check: unknown precision {mode!r} (known: {', '.join(PRECISIONS)})")
            if smoke and mode != "fp32":
                line(f"train-{mode}", "skip", "needs CUDA")
                continue
            r = check_train(data, args.work, mode, smoke)
            if mode == "fp32":
                ref = r
    if "resume" in only:
        check_resume(data, args.work, smoke, ref)
    if "ddp" in only:
        check_ddp(data, args.work, smoke)
    run_benchmark_checks(only, args, smoke)
    line("all", "FAIL" if FAILED else "ok", f"{time.perf_counter() - t0:.0f}s"
         + (f"; failed: {', '.join(FAILED)}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
