"""Cost per update of every method, measured side by side in one process.

Same model, same batches (real Multi30k sentences), methods interleaved in a
shuffled order every round so that machine drift cancels; the median over rounds
is reported. ARCH is timed on a refresh epoch and on a reuse epoch and amortised
over a Tc cycle. Next to each measurement: the ratio Table 1 predicts from the
measured cost of one forward and one backward. Also: the share of a reuse update
spent reading the cache and rebuilding from neighbours, the cache's bytes on disk
against p x tokens x d x bytes, and peak resident memory of whole fairseq-train
runs (none vs arch, separate processes).
"""

import os
import random
import statistics
import subprocess
import sys
import time

import torch

from . import common
from .quality import _progress

# (forwards, backwards) per update: our literal count and the paper's Table 1 count
COUNTS = {
    "none": ((1, 1), (1, 1)),
    "r3f": ((2, 1), (2, 1)),
    "smart": (lambda s: (s + 2, s + 1), lambda s: (1 + s, 1 + s)),
    "freelb": (lambda s: (s + 1, s + 1), lambda s: (1 + s, 1 + s)),
    "arch-refresh": (lambda s: (s + 2, s + 1), lambda s: (s + 1, s + 1)),
    "arch-reuse": ((2, 1), (2, 1)),
    # R-Drop is not in Table 1: its two dropout passes (one doubled batch in the
    # authors' code) and one backward, counted as everywhere else
    "rdrop": ((2, 1), (2, 1)),
}


def _counts(name, steps):
    ours, paper = COUNTS[name]
    ours = ours(steps) if callable(ours) else ours
    paper = paper(steps) if callable(paper) else paper
    return ours, paper


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def measure(work: str, sentences: int, rounds: int, steps: int, tc: int) -> dict:
    from fairseq_arch.criterions.adversarial_label_smoothed_cross_entropy import (
        AdversarialLabelSmoothedCrossEntropyCriterion as Crit,
    )

    data = common.multi30k_bin(work, sentences)
    arch_flags = ["--adv-method", "arch", "--arch-refresh-interval", str(tc), "--adv-steps", str(steps)]
    _, task_ref, model, crit_ref = common.build(data, os.path.join(work, "cost-refresh"), arch_flags)
    _, task_use, _, crit_use = common.build(data, os.path.join(work, "cost-reuse"), arch_flags)
    batches = common.train_batches(task_ref)
    model.train()
    # the reuse task needs a filled cache: one refresh epoch, then epoch 2 (reuse)
    print(f"cost: filling the ARCH cache (one refresh epoch, {len(batches)} batches), then {rounds} "
          "interleaved rounds of every method", flush=True)
    t_start = time.perf_counter()
    task_use.begin_epoch(1, model)
    for b in batches:
        crit_use(model, b)
    t_fill = time.perf_counter()
    task_use.begin_epoch(2, model)
    finalize_s = time.perf_counter() - t_fill
    print(f"cost: cache filled in {_progress().fmt_duration(time.perf_counter() - t_start)}", flush=True)
    task_ref.begin_epoch(1, model)

    crits = {m: Crit(task_ref, False, 0.1, adv_method=m, adv_steps=steps) for m in ("none", "r3f", "smart", "freelb", "rdrop")}
    crits["arch-refresh"] = crit_ref
    crits["arch-reuse"] = crit_use

    read_time = {"s": 0.0}
    real_read = task_use.arch_cache.read

    def timed_read(*a, **k):
        dt, out = _timed(lambda: real_read(*a, **k))
        read_time["s"] += dt
        return out

    task_use.arch_cache.read = timed_read
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def update(crit, batch):
        opt.zero_grad()
        loss, _, _ = crit(model, batch)
        loss.backward()
        opt.step()

    times = {m: [] for m in crits}
    read_share = []
    fwd, bwd, optim = [], [], []
    rng = random.Random(0)
    live = _progress().Steps("cost round", rounds)  # (`steps` is S)
    for r in range(rounds):
        batch = batches[r % len(batches)]
        order = list(crits) + ["parts"]
        rng.shuffle(order)
        for m in order:
            if m == "parts":  # one forward and one backward, for the Table 1 prediction
                opt.zero_grad()
                tf, out = _timed(lambda: crits["none"].compute_loss(model, model(**batch["net_input"]), batch)[0])
                tb, _ = _timed(out.backward)
                to, _ = _timed(opt.step)
                fwd.append(tf), bwd.append(tb), optim.append(to)
                continue
            read_time["s"] = 0.0
            dt, _ = _timed(lambda: update(crits[m], batch))
            times[m].append(dt)
            if m == "arch-reuse":
                read_share.append(read_time["s"] / dt)
        live.done(f"{len(crits)} methods + one forward/backward, batch {r % len(batches) + 1}/{len(batches)}")

    med = {m: statistics.median(v) for m, v in times.items()}
    t_f, t_b, t_o = statistics.median(fwd), statistics.median(bwd), statistics.median(optim)
    base = t_f + t_b + t_o
    rows = {}
    for m in crits:
        (of, ob), (pf, pb) = _counts(m, steps)
        rows[m] = {
            "seconds": med[m], "vs_none": med[m] / med["none"], "vs_smart": med[m] / med["smart"],
            "fwd_bwd": [of, ob], "table1_fwd_bwd": [pf, pb],
            "predicted_vs_none": (of * t_f + ob * t_b + t_o) / base,
            "table1_predicted_vs_none": (pf * t_f + pb * t_b + t_o) / base,
        }
    amort = (med["arch-refresh"] + (tc - 1) * med["arch-reuse"]) / tc
    of_r, ob_r = rows["arch-refresh"]["fwd_bwd"]
    rows["arch (amortised)"] = {
        "seconds": amort, "vs_none": amort / med["none"], "vs_smart": amort / med["smart"],
        "fwd_bwd": [round((of_r + 2 * (tc - 1)) / tc, 3), round((ob_r + (tc - 1)) / tc, 3)],
        "table1_fwd_bwd": [round(2 + (steps - 1) / tc, 3), round(1 + steps / tc, 3)],
        "predicted_vs_none": ((of_r + 2 * (tc - 1)) / tc * t_f + (ob_r + tc - 1) / tc * t_b + t_o) / base,
        "table1_predicted_vs_none": ((2 + (steps - 1) / tc) * t_f + (1 + steps / tc) * t_b + t_o) / base,
    }
    store = task_use.arch_cache.store
    gen = os.path.join(store.dir, task_use.arch_cache.read_gen)
    disk = {s: os.path.getsize(os.path.join(gen, f"{s}.bin")) for s in store.sides}
    ds = task_use.dataset("train")
    formula = {s: 0.1 * float((ds.src_sizes if s == "source" else ds.tgt_sizes).sum()) * store.dims[s] * 2
               for s in store.sides}
    return {
        "config": {"sentences": sentences, "batches": len(batches), "rounds": rounds, "steps": steps, "tc": tc,
                   "model": "transformer_iwslt_de_en (GPU)" if common.on_gpu() else "transformer 3+3 layers, d=128, ffn 512",
                   "max_tokens": 4096},
        "methods": rows,
        "forward_s": t_f, "backward_s": t_b, "optimizer_s": t_o,
        "cache_read_rebuild_share_of_reuse_update": statistics.median(read_share),
        "cache_read_rebuild_share_of_amortised_update":
            statistics.median(read_share) * med["arch-reuse"] * (tc - 1) / tc / amort,
        "finalize_seconds": finalize_s,
        "disk_bytes": disk, "disk_bytes_formula_p_tokens_d_bytes": formula,
    }


def peak_rss(work: str, sentences: int) -> dict:
    """Peak RSS of whole fairseq-train runs (3 epochs, ARCH refreshes in 1 and 3), one
    process each, measured by a wrapper that waits for exactly one child."""
    data = common.multi30k_bin(work, sentences)
    out = {}
    live = _progress().Steps("cost peak-RSS run", 3)
    for method in ("none", "r3f", "arch"):
        cmd = ["fairseq-train", data, "--user-dir", common.USER_DIR, "--task", "arch_translation",
               "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
               "--adv-method", method, "--arch-refresh-interval", "2", *common.SMALL_MODEL, "--optimizer", "adam",
               "--lr", "1e-3", "--max-tokens", "4096", "--max-epoch", "3", "--cpu", "--no-save",
               "--save-dir", os.path.join(work, f"rss-{method}"), "--no-progress-bar", "--num-workers", "0"]
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
                   "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        res = subprocess.run([sys.executable, "-c", wrapper, *_progress().console_cmd(cmd)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore"))
        rc, kb = res.stdout.split()
        assert rc == "0", f"fairseq-train --adv-method {method} failed"
        out[method] = int(kb) / 1024.0
        live.done(f"fairseq-train --adv-method {method} (3 epochs): peak RSS {out[method]:.0f} MiB")
    out["ratio_arch_vs_none"] = out["arch"] / out["none"]
    out["ratio_arch_vs_r3f"] = out["arch"] / out["r3f"]
    return out


def markdown(res: dict, rss: dict) -> str:
    c = res["config"]
    lines = [
        f"### Cost per update ({c['sentences']} Multi30k pairs, {c['model']}, max-tokens {c['max_tokens']}, "
        f"S={c['steps']}, Tc={c['tc']}, median of {c['rounds']} interleaved rounds)",
        "",
        "| method | s / update | x none | x smart | fwd/bwd (ours) | predicted x none (ours) | fwd/bwd (Table 1) | predicted x none (Table 1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["methods"].items():
        lines.append(
            f"| {m} | {r['seconds']:.3f} | {r['vs_none']:.2f} | {r['vs_smart']:.2f} | {r['fwd_bwd'][0]}/{r['fwd_bwd'][1]} | "
            f"{r['predicted_vs_none']:.2f} | {r['table1_fwd_bwd'][0]}/{r['table1_fwd_bwd'][1]} | "
            f"{r['table1_predicted_vs_none']:.2f} |")
    m = res["methods"]
    share = res["cache_read_rebuild_share_of_reuse_update"]
    disk = sum(res["disk_bytes"].values())
    formula = sum(res["disk_bytes_formula_p_tokens_d_bytes"].values())
    goals = [
        ("ARCH reuse update <= 1.05 x r3f", m["arch-reuse"]["seconds"] / m["r3f"]["seconds"], 1.05),
        ("ARCH amortised <= 0.5 x smart", m["arch (amortised)"]["vs_smart"], 0.5),
        ("cache read + rebuild <= 3% of a reuse update", share, 0.03),
        ("peak RSS arch <= 1.1 x none", rss["ratio_arch_vs_none"], 1.1),
    ]
    lines += ["", f"One forward {res['forward_s'] * 1000:.0f} ms, one backward {res['backward_s'] * 1000:.0f} ms, "
              f"Adam step {res['optimizer_s'] * 1000:.0f} ms. End-of-refresh finalisation (means + neighbours): "
              f"{res['finalize_seconds']:.2f} s.",
              f"Cache on disk: {disk / 2**20:.2f} MiB; p x tokens x d x bytes = {formula / 2**20:.2f} MiB "
              f"(ratio {disk / formula:.3f}; p sampled at random). Cache read + neighbour rebuild: "
              f"{share * 100:.2f}% of a reuse update, "
              f"{res['cache_read_rebuild_share_of_amortised_update'] * 100:.2f}% amortised.",
              f"Peak RSS of a 3-epoch fairseq-train run: none {rss['none']:.0f} MiB, r3f {rss.get('r3f', 0):.0f} MiB, "
              f"arch {rss['arch']:.0f} MiB (x{rss['ratio_arch_vs_none']:.3f} none, "
              f"x{rss.get('ratio_arch_vs_r3f', float('nan')):.3f} r3f): the second forward's activations, "
              "kept for the joint backward, are the difference; the disk-backed cache adds its page cache only.", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {v:.3f} | {'yes' if v <= lim else 'NO'} |" for g, v, lim in goals]
    return "\n".join(lines)


def main(args):
    path = os.path.join(args.out, "cost.json")
    if args.rss_only and os.path.exists(path):
        import json

        with open(path) as f:
            res = json.load(f)
    else:
        res = measure(args.work, args.sentences, args.rounds, args.steps, args.tc)
    rss = peak_rss(args.work, res["config"]["sentences"]) if not args.skip_rss else {
        "none": 0, "r3f": 0, "arch": 0, "ratio_arch_vs_none": float("nan"), "ratio_arch_vs_r3f": float("nan")}
    res["peak_rss_mb"] = rss
    res.pop("machine", None), res.pop("date", None)
    common.write_report(args.out, "cost", res, markdown(res, rss))
    return res
