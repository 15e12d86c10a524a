"""Cost per update of every method, measured side by side in one process.

Same model, same batches (real Multi30k sentences), methods interleaved in a
shuffled order every round so that machine drift cancels; the median over rounds
is reported. ARCH is timed on a refresh epoch and on a reuse epoch and amortised
over a Tc cycle. Next to each measurement: the ratio Table 1 predicts from the
measured cost of one forward and one backward. Also: the share of a reuse update
spent reading the cache and rebuilding from neighbours, the cache's bytes on disk
against p x tokens x d x bytes, and peak resident memory of whole fairseq-train
runs (none vs arch, separate processes).

Peak memory per update, side by side in the same run: the most bytes of tensor storage
alive at once during one ``task.train_step`` of each method on the same (largest) batch,
counted by :class:`LiveTensorBytes` (every storage an ATen op allocates, forward and
backward, until it is freed; CPU or GPU alike). Each update runs through the task's
train_step, as in fairseq-train, so arch/smart/r3f backpropagate the clean CE early
(fairseq_arch/early_backward.py); their peak with one joint backward (as before that
change) is measured in the same run for comparison.
"""

import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import weakref
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import common, cost_spread
from .quality import _progress

# (forwards, backwards) per update in the paper's Table 1 (ours: each method's own
# declaration, fairseq_arch/methods/). R-Drop is not in Table 1: its two dropout passes (one
# doubled batch in the authors' code) and one backward, counted as everywhere else.
PAPER_COUNTS = {
    "none": (1, 1),
    "r3f": (2, 1),
    "smart": lambda s: (1 + s, 1 + s),
    "freelb": lambda s: (1 + s, 1 + s),
    "arch-refresh": lambda s: (s + 1, s + 1),
    "arch-reuse": (2, 1),
    "rdrop": (2, 1),
    # issue 19's control and hybrid, not in Table 1 either: counted as the passes they share
    # with R3F (zero-delta) and with ARCH (arch-rdrop: R-Drop's step, plus ARCH's ascent on a refresh)
    "zero-delta": (2, 1),
    "arch-rdrop-refresh": lambda s: (s + 1, s + 1),
    "arch-rdrop-reuse": (2, 1),
}
# the rows timed besides the methods' own defaults: name -> criterion options (the quality v3
# variants' flags: zero-delta with the symmetric KL, arch-rdrop at R-Drop's alpha)
CONTROLS = {"zero-delta": {"adv_method": "zero-delta", "adv_kl": "symmetric"},
            "arch-rdrop": {"adv_method": "arch-rdrop", "adv_lambda": 5.0}}
# the rows with a refresh and a reuse update, amortised over a Tc cycle
CACHED = ("arch", "arch-rdrop")


def method_counts(name, steps):
    """(ours, the paper's) (forwards, backwards) of ``name`` (a method, or a cached method's
    ``-refresh`` / ``-reuse`` update) with S = ``steps``."""
    from fairseq_arch.methods import method_class

    method = name.rpartition("-")[0] if name.endswith(("-refresh", "-reuse")) else name
    ours = method_class(method).passes(steps, refresh=not name.endswith("-reuse"))
    paper = PAPER_COUNTS[name]
    return ours, paper(steps) if callable(paper) else paper


class LiveTensorBytes(TorchDispatchMode):
    """Within the context: ``now`` = bytes of tensor storages created inside it and still
    alive, ``peak`` = the most at once. Every ATen op is seen (the autograd engine carries
    the mode into backward), so activations, saved tensors, gradients and temporaries all
    count, on any device. An output that aliases one of its op's inputs (a view, an
    in-place op, ``.t()`` of a weight) allocates nothing and is not counted; a storage is
    counted from its first op to its release (a weakref finalizer). Not seen: memory an op
    frees before it returns (kernel workspaces) and allocator caching/fragmentation."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._live = {}
        self._lock = threading.Lock()  # finalizers may run on the autograd engine's threads

    def _free(self, key):
        with self._lock:
            self.now -= self._live.pop(key, 0)

    @staticmethod
    def _key(t):
        s = t.untyped_storage()
        return s, (s.device.type, s.device.index, s.data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves
        inputs = {self._key(t)[1] for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage, key = self._key(t)
            n = storage.nbytes()
            with self._lock:
                if n == 0 or key in inputs or key in self._live:
                    continue
                self._live[key] = n
                self.now += n
                self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)
        return out


class _TorchOptimizer:
    """The part of fairseq's optimizer interface a task's train_step uses (``backward``),
    around torch's Adam."""

    def __init__(self, params, lr):
        self.torch = torch.optim.Adam(params, lr=lr)

    def backward(self, loss):
        loss.backward()

    def zero_grad(self):
        self.torch.zero_grad(set_to_none=True)

    def step(self):
        self.torch.step()


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def measure(work: str, sentences: int, rounds: int, steps: int, tc: int, model_arch: str = None) -> dict:
    bench = _setup(work, sentences, steps, tc, model_arch)
    meters = _install_meters(bench)
    timings = _interleaved_rounds(bench, rounds, meters)
    peak = peak_memory(bench.crits, bench.task_of, bench.train_step, bench.opt, bench.batches)
    t_f, t_b, t_o = (statistics.median(timings.parts[k]) for k in ("fwd", "bwd", "optim"))
    rows = _method_rows(bench.crits, timings, (t_f, t_b, t_o), peak, steps)
    for method in CACHED:
        rows[f"{method} (amortised)"] = amortised(rows, method, tc, steps, (t_f, t_b, t_o), peak["early"]["none"])
    read_share = statistics.median(timings.read_share)
    return {
        "config": {"sentences": sentences, "batches": len(bench.batches), "rounds": rounds, "steps": steps,
                   "tc": tc, "model": model_arch or ("transformer_iwslt_de_en (GPU)" if common.on_gpu()
                                                     else "transformer 3+3 layers, d=128, ffn 512"),
                   "max_tokens": 4096},
        "methods": rows,
        "peak_batch": peak["batch"],
        "forward_s": t_f, "backward_s": t_b, "optimizer_s": t_o,
        "cache_read_rebuild_share_of_reuse_update": read_share,
        # the read in all, the part a prefetch hid included (= the share above without one)
        "cache_read_rebuild_total_share_of_reuse_update": statistics.median(timings.read_total_share),
        "cache_read_rebuild_share_of_amortised_update":
            read_share * rows["arch-reuse"]["seconds"] * (tc - 1) / tc / rows["arch (amortised)"]["seconds"],
        "finalize_seconds": bench.finalize_s,
        **_cache_bytes(bench.task_use),
    }


def _setup(work, sentences, steps, tc, model_arch) -> SimpleNamespace:
    """One model, its batches, and a criterion per timed row: ``-refresh`` rows on a task in its
    first (refresh) epoch, ``-reuse`` rows on a task whose cache one refresh epoch has filled."""
    from fairseq_arch.in_process import criterion_with

    data = common.multi30k_bin(work, sentences)
    arch_flags = ["--adv-method", "arch", "--arch-refresh-interval", str(tc), "--adv-steps", str(steps)]
    for scratch in ("cost-refresh", "cost-reuse"):
        # a fresh cache each run: a previous run's would be "ahead of the checkpoint" (epoch 1 again)
        shutil.rmtree(os.path.join(work, scratch), ignore_errors=True)
    cfg_ref, task_ref, model, crit_ref = common.build(data, os.path.join(work, "cost-refresh"), arch_flags, model_arch)
    _, task_use, _, crit_use = common.build(data, os.path.join(work, "cost-reuse"), arch_flags, model_arch)
    batches = common.train_batches(task_ref)
    model.train()
    print(f"cost: filling the ARCH cache (one refresh epoch, {len(batches)} batches), then the "
          "interleaved rounds of every method", flush=True)
    t_start = time.perf_counter()
    task_use.begin_epoch(1, model)
    for b in batches:
        crit_use(model, b)
    t_fill = time.perf_counter()
    task_use.begin_epoch(2, model)  # epoch 2 reuses what epoch 1 stored
    finalize_s = time.perf_counter() - t_fill
    print(f"cost: cache filled in {_progress().fmt_duration(time.perf_counter() - t_start)}", flush=True)
    task_ref.begin_epoch(1, model)

    crits = {m: criterion_with(cfg_ref, task_ref, adv_method=m) for m in ("none", "r3f", "smart", "freelb", "rdrop")}
    crits["arch-refresh"], crits["arch-reuse"] = crit_ref, crit_use
    crits["zero-delta"] = criterion_with(cfg_ref, task_ref, **CONTROLS["zero-delta"])
    crits["arch-rdrop-refresh"] = criterion_with(cfg_ref, task_ref, **CONTROLS["arch-rdrop"])
    crits["arch-rdrop-reuse"] = criterion_with(cfg_ref, task_use, **CONTROLS["arch-rdrop"])
    opt = _TorchOptimizer(model.parameters(), lr=1e-4)
    task_of = {m: task_use if m.endswith("-reuse") else task_ref for m in crits}

    def train_step(m, batch):
        # as fairseq-train: the task's train_step runs the criterion and the backward(s)
        return task_of[m].train_step(batch, model, crits[m], opt, update_num=0)

    return SimpleNamespace(model=model, batches=batches, crits=crits, opt=opt, task_of=task_of,
                           task_ref=task_ref, task_use=task_use, train_step=train_step, finalize_s=finalize_s)


def _install_meters(bench) -> dict:
    """Seconds spent in the hot path's own work (seeded init, cache reads with the neighbour
    rebuild, fresh-row stores), whatever the method, and in the reads alone; reset per update."""
    meters = {"read": 0.0, "hot": 0.0}

    def timed(fn, *names):
        def run(*a, **k):
            dt, out = _timed(lambda: fn(*a, **k))
            for name in names:
                meters[name] += dt
            return out
        return run

    access = bench.task_use.arch_cache.access
    access.read = timed(access.read, "read", "hot")
    for c in bench.crits.values():
        c.space.init = timed(c.space.init, "hot")
    bench.task_ref.arch_cache.access.store_fresh = timed(bench.task_ref.arch_cache.access.store_fresh, "hot")
    return meters


def _interleaved_rounds(bench, rounds: int, meters: dict) -> SimpleNamespace:
    """Every row's update, and one bare forward/backward/step ("parts", for the Table 1
    prediction), in a shuffled order each round, on the round's batch."""
    out = SimpleNamespace(times={m: [] for m in bench.crits}, hot_share={m: [] for m in bench.crits},
                          read_share=[], read_total_share=[], parts={"fwd": [], "bwd": [], "optim": []})
    # reads prepared ahead: each reuse update's batch is prefetched when the previous reuse
    # update starts, as fairseq-train's batch iterator does; the timed read is then what the
    # step waits for, and the reader's stats give the host reads' own time
    reader = bench.task_use.arch_cache.access
    stats = reader.ahead.stats if reader.ahead is not None else None
    batches, opt = bench.batches, bench.opt
    reader.prefetch(batches[0]["id"].cpu().numpy())
    rng = random.Random(0)
    live = _progress().Steps("cost round", rounds)
    for r in range(rounds):
        batch = batches[r % len(batches)]
        order = list(bench.crits) + ["parts"]
        rng.shuffle(order)
        for m in order:
            if m == "parts":
                opt.zero_grad()
                none = bench.crits["none"]
                tf, loss = _timed(lambda: none.compute_loss(bench.model, bench.model(**batch["net_input"]), batch)[0])
                for key, dt in (("fwd", tf), ("bwd", _timed(loss.backward)[0]), ("optim", _timed(opt.step)[0])):
                    out.parts[key].append(dt)
                continue
            meters["read"] = meters["hot"] = 0.0
            if m == "arch-reuse":  # (arch-rdrop-reuse reads the same rows: its reads are not prepared ahead)
                reader.prefetch(batches[(r + 1) % len(batches)]["id"].cpu().numpy())
                hidden = -(stats.host_s - stats.wait_s) if stats else 0.0
            dt, _ = _timed(lambda: (opt.zero_grad(), bench.train_step(m, batch), opt.step()))
            out.times[m].append(dt)
            out.hot_share[m].append(meters["hot"] / dt)
            if m == "arch-reuse":
                out.read_share.append(meters["read"] / dt)
                hidden += (stats.host_s - stats.wait_s) if stats else 0.0
                out.read_total_share.append((meters["read"] + hidden) / dt)
        live.done(f"{len(bench.crits)} methods + one forward/backward, batch {r % len(batches) + 1}/{len(batches)}")
    return out


def _method_rows(crits, timings, parts, peak, steps) -> dict:
    """Each timed row: median seconds, its ratios, its pass counts and the Table 1 prediction
    from the measured forward, backward and step, its hot-path share and its peaks."""
    t_f, t_b, t_o = parts
    base = t_f + t_b + t_o
    med = {m: statistics.median(v) for m, v in timings.times.items()}
    early, joint = peak["early"], peak["joint"]
    rows = {}
    for m in crits:
        (of, ob), (pf, pb) = method_counts(m, steps)
        rows[m] = {
            "seconds": med[m], "vs_none": med[m] / med["none"], "vs_smart": med[m] / med["smart"],
            "fwd_bwd": [of, ob], "table1_fwd_bwd": [pf, pb],
            "predicted_vs_none": (of * t_f + ob * t_b + t_o) / base,
            "table1_predicted_vs_none": (pf * t_f + pb * t_b + t_o) / base,
            "hot_path_share": statistics.median(timings.hot_share[m]),
            "peak_mib": early[m], "peak_vs_none": early[m] / early["none"],
            "peak_joint_mib": joint.get(m), "peak_joint_vs_none": joint[m] / early["none"] if m in joint else None,
        }
    return rows


def _cache_bytes(task) -> dict:
    """The cache's bytes on disk per side, and p x tokens x d x 2 bytes for comparison."""
    store = task.arch_cache.store
    gen = os.path.join(store.dir, task.arch_cache.access.generation)
    ds = task.dataset("train")
    return {
        "disk_bytes": {s: os.path.getsize(os.path.join(gen, f"{s}.bin")) for s in store.sides},
        "disk_bytes_formula_p_tokens_d_bytes": {
            s: 0.1 * float((ds.src_sizes if s == "source" else ds.tgt_sizes).sum()) * store.dims[s] * 2
            for s in store.sides},
    }


def amortised(rows: dict, method: str, tc: int, steps: int, parts, peak_none: float) -> dict:
    """The row of ``method`` over a Tc cycle: one refresh update and Tc - 1 reuse updates
    (seconds, counts, predictions, own work); its run's peak is its larger update's."""
    ref, use = rows[f"{method}-refresh"], rows[f"{method}-reuse"]
    t_f, t_b, t_o = parts
    base = t_f + t_b + t_o
    sec = (ref["seconds"] + (tc - 1) * use["seconds"]) / tc
    smart = rows["smart"]["seconds"]
    (of_r, ob_r), (of_u, ob_u) = ref["fwd_bwd"], use["fwd_bwd"]
    f, b = (of_r + (tc - 1) * of_u) / tc, (ob_r + (tc - 1) * ob_u) / tc
    out = {"seconds": sec, "vs_none": sec / rows["none"]["seconds"], "vs_smart": sec / smart,
           "fwd_bwd": [round(f, 3), round(b, 3)],
           "table1_fwd_bwd": [round(2 + (steps - 1) / tc, 3), round(1 + steps / tc, 3)],
           "predicted_vs_none": (f * t_f + b * t_b + t_o) / base,
           "table1_predicted_vs_none": ((2 + (steps - 1) / tc) * t_f + (1 + steps / tc) * t_b + t_o) / base,
           "hot_path_share": (ref["hot_path_share"] * ref["seconds"]
                              + (tc - 1) * use["hot_path_share"] * use["seconds"]) / tc / sec}
    for key in ("peak", "peak_joint"):
        mib = [r[f"{key}_mib"] for r in (ref, use) if r[f"{key}_mib"] is not None]
        out[f"{key}_mib"] = max(mib) if mib else None
        out[f"{key}_vs_none"] = max(mib) / peak_none if mib else None
    return out


def peak_memory(crits, task_of, train_step, opt, batches) -> dict:
    """Peak tensor bytes (MiB) of one train_step of every method on the same batch, the
    largest (sentences x target length): "early" as fairseq-train runs them, "joint" for
    the methods whose clean CE is backpropagated early, with that switched off (one
    backward of CE + KL, as before), side by side on the same model."""
    batch = max(batches, key=lambda b: b["net_input"]["prev_output_tokens"].numel())
    out = {"early": {}, "joint": {}, "batch": list(batch["net_input"]["prev_output_tokens"].shape)}
    tasks = set(task_of.values())
    for m in crits:
        for kind in ("early", "joint"):
            if kind == "joint" and m not in ("r3f", "smart", "arch-refresh", "arch-reuse", "zero-delta"):
                continue
            for t in tasks:
                t.early_clean_backward = kind == "early"
            opt.zero_grad()  # gradients are allocated inside the update, as after fairseq's zero_grad
            mem = LiveTensorBytes()
            with mem:
                loss, _, _ = train_step(m, batch)
                del loss
            out[kind][m] = mem.peak / 2**20
    for t in tasks:
        t.early_clean_backward = True
    opt.zero_grad()
    return out


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
        # a fresh save dir: --no-save keeps no checkpoint, but a previous run's ARCH cache
        # would be "ahead of the checkpoint" at epoch 1
        shutil.rmtree(os.path.join(work, f"rss-{method}"), ignore_errors=True)
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                   "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                   "sys.stderr.write((r.stdout + r.stderr)[-3000:] if r.returncode else '')")
        res = subprocess.run([sys.executable, "-c", wrapper, *_progress().console_cmd(cmd)], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONWARNINGS="ignore"))
        rc, kb = res.stdout.split()
        assert rc == "0", f"fairseq-train --adv-method {method} failed:\n{res.stderr}"
        out[method] = int(kb) / 1024.0
        live.done(f"fairseq-train --adv-method {method} (3 epochs): peak RSS {out[method]:.0f} MiB")
    out["ratio_arch_vs_none"] = out["arch"] / out["none"]
    out["ratio_arch_vs_r3f"] = out["arch"] / out["r3f"]
    return out


def _rss_missing(rss) -> str:
    """Why the peak-RSS numbers are absent ('' when they were measured): ``rss`` None, or a dict
    saying "skipped"/"pending", or (files written before) zeros and NaN ratios."""
    if not rss:
        return "not measured: the run had --skip-rss"
    if rss.get("skipped") or rss.get("pending"):
        return rss.get("skipped") or rss.get("pending")
    ratio = rss.get("ratio_arch_vs_none")
    if not rss.get("none") or ratio is None or ratio != ratio:  # 0 MiB or NaN: never measured
        return "not measured: the run had --skip-rss"
    return ""


def _pct(share, why="not recorded in this cost.json") -> str:
    return f"{100 * share:.2f}" if share is not None and share == share else f"n/a ({why})"


def markdown(res: dict, rss: dict) -> str:
    c = res["config"]
    lines = [
        f"### Cost per update ({c['sentences']} Multi30k pairs, {c['model']}, max-tokens {c['max_tokens']}, "
        f"S={c['steps']}, Tc={c['tc']}, median of {c['rounds']} interleaved rounds)",
        "",
        "| method | s / update | x none | x smart | fwd/bwd (ours) | predicted x none (ours) | fwd/bwd (Table 1) | "
        "predicted x none (Table 1) | own work % | peak MiB | peak x none | peak x none, joint backward |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["methods"].items():
        joint = f"{r['peak_joint_vs_none']:.2f}" if r.get("peak_joint_vs_none") is not None else "-"
        lines.append(
            f"| {m} | {r['seconds']:.3f} | {r['vs_none']:.2f} | {r['vs_smart']:.2f} | {r['fwd_bwd'][0]}/{r['fwd_bwd'][1]} | "
            f"{r['predicted_vs_none']:.2f} | {r['table1_fwd_bwd'][0]}/{r['table1_fwd_bwd'][1]} | "
            f"{r['table1_predicted_vs_none']:.2f} | {_pct(r.get('hot_path_share'))} | {r['peak_mib']:.1f} | {r['peak_vs_none']:.2f} | {joint} |")
    m = res["methods"]
    share = res["cache_read_rebuild_share_of_reuse_update"]
    disk = sum(res["disk_bytes"].values())
    formula = sum(res["disk_bytes_formula_p_tokens_d_bytes"].values())
    goals = [
        ("ARCH reuse update <= 1.05 x r3f", m["arch-reuse"]["seconds"] / m["r3f"]["seconds"], 1.05),
        ("ARCH amortised <= 0.5 x smart", m["arch (amortised)"]["vs_smart"], 0.5),
        ("cache read + rebuild <= 3% of a reuse update", share, 0.03),
        ("peak memory per update, arch <= 1.15 x none", m["arch (amortised)"]["peak_vs_none"], 1.15),
        ("peak RSS arch <= 1.1 x none", None if _rss_missing(rss) else rss["ratio_arch_vs_none"], 1.1),
    ]
    rss_why = _rss_missing(rss)
    if rss_why:
        rss_text = f"Peak RSS of a 3-epoch fairseq-train run: n/a ({rss_why})."
    else:
        vs_r3f = rss.get("ratio_arch_vs_r3f")
        rss_text = (f"Peak RSS of a 3-epoch fairseq-train run: none {rss['none']:.0f} MiB, r3f "
                    + (f"{rss['r3f']:.0f} MiB" if rss.get("r3f") else "n/a (not measured)")
                    + f", arch {rss['arch']:.0f} MiB (x{rss['ratio_arch_vs_none']:.3f} none, "
                    + (f"x{vs_r3f:.3f} r3f" if vs_r3f is not None and vs_r3f == vs_r3f else "r3f ratio n/a: r3f not measured")
                    + "): the whole process's resident memory, the allocator's cached free memory included; the "
                    "disk-backed cache adds its page cache only.")
    lines += ["", f"Peak memory: the most tensor bytes alive at once in one train_step on the largest batch "
              f"({res['peak_batch'][0]} sentences x {res['peak_batch'][1]} target positions), every method on the same "
              "batch and model; 'joint backward' = the clean CE and the KL backpropagated together (before the early "
              "clean backward); arch (amortised) = the larger of its refresh and reuse updates."]
    lines += ["", "Own work: the plugin's per-batch work outside the model's forwards and backwards (seeded "
              "initial perturbation, cache reads with the neighbour rebuild, fresh-row stores) as a share of the "
              "update, median over rounds (the hot path of issue 11, item 9)."]
    lines += ["", f"One forward {res['forward_s'] * 1000:.0f} ms, one backward {res['backward_s'] * 1000:.0f} ms, "
              f"Adam step {res['optimizer_s'] * 1000:.0f} ms. End-of-refresh finalisation (means + neighbours): "
              f"{res['finalize_seconds']:.2f} s.",
              f"Cache on disk: {disk / 2**20:.2f} MiB; p x tokens x d x bytes = {formula / 2**20:.2f} MiB "
              f"(ratio {disk / formula:.3f}; p sampled at random). Cache read + neighbour rebuild: "
              f"{share * 100:.2f}% of a reuse update, "
              f"{res['cache_read_rebuild_share_of_amortised_update'] * 100:.2f}% amortised (what the step waits "
              f"for; the read in all, prepared ahead while the previous batch trains: "
              f"{_pct(res.get('cache_read_rebuild_total_share_of_reuse_update'))}% of a reuse update).",
              rss_text, "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | n/a ({rss_why}) | not measured |" if v is None else
              f"| {g} | {v:.3f} | {'yes' if v <= lim else 'NO'} |" for g, v, lim in goals]
    from .captions import figure_lines

    lines += [""] + figure_lines("cost.png", rounds=c["rounds"], steps=c["steps"], tc=c["tc"])
    return "\n".join(lines).rstrip("\n")


def main(args):
    path = os.path.join(args.out, "cost.json")
    if args.rss_only and os.path.exists(path):
        import json

        with open(path) as f:
            res = json.load(f)
    else:
        res = measure(args.work, args.sentences, args.rounds, args.steps, args.tc, getattr(args, "model_arch", None))
        cost_spread.archive(args.out, res)  # kept beside the earlier runs' timings (benchmarks cost-spread)
        if not args.skip_rss:
            # the timings first (the RSS runs take minutes): a failed RSS run keeps them, and
            # `--rss-only` measures RSS again from this file
            pending = {"pending": "pending: the peak-RSS fairseq-train runs had not finished when this was written"}
            common.write_report(args.out, "cost", dict(res, peak_rss_mb=pending), markdown(res, pending))
    rss = peak_rss(args.work, res["config"]["sentences"]) if not args.skip_rss else {
        "skipped": "not measured: the run had --skip-rss"}
    res["peak_rss_mb"] = rss
    res.pop("machine", None), res.pop("date", None)
    common.write_report(args.out, "cost", res, markdown(res, rss))
    return res
