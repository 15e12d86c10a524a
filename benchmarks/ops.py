"""Ops (CPU) or kernels (CUDA) the plugin launches per update (issue 22): torch.profiler
around one ARCH reuse update (both sides) and one refresh update (seeded init, S ascent
steps, fresh-row stores), counting only what runs inside the plugin's own calls, which
this benchmark wraps in ``record_function`` ranges (the plugin is not modified):

- ``arch.read``: the cache read of one side on a reuse epoch (rows to the device,
  neighbour rebuild of uncached sentences, projection onto the ball);
- ``arch.init``: the seeded start of both sides; ``arch.step``: one ascent step of both
  sides (``PerturbationSpace.step``: finiteness, normalised gradient, projection);
- ``arch.store``: one side's fresh rows into the cache (EMA, projection, to the host).

``ops``: top-level aten ops (an op an aten op calls is not counted again); ``kernels``
(CUDA only): device kernels launched. Also the whole update, none vs arch-reuse.
"""

import os
import shutil
from collections import Counter
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from . import common

RANGES = ("arch.read", "arch.init", "arch.step", "arch.store")


def _ranged(name: str, fn, calls: Counter):
    def run(*a, **k):
        calls[name] += 1
        with record_function(name):
            return fn(*a, **k)
    return run


def _aten_ancestor(e, stop) -> bool:
    p = e.cpu_parent
    while p is not None and p is not stop:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def count(prof) -> Dict[str, Dict[str, int]]:
    """Per range: top-level aten ops and device kernels of every event under it; and
    ``update``: the same over the whole profile."""
    out = {r: {"ops": 0, "kernels": 0} for r in RANGES + ("update",)}
    names = {r: Counter() for r in RANGES}  # which ops: the candidates for fusing
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        rng, p = None, e.cpu_parent
        while p is not None:
            if p.name in RANGES:
                rng = p
                break
            p = p.cpu_parent
        for key, stop in (("update", None), (rng.name if rng else None, rng)):
            if key is None:
                continue
            out[key]["kernels"] += len(e.kernels)
            if not _aten_ancestor(e, stop):
                out[key]["ops"] += 1
                if key in names:
                    names[key][e.name] += 1
    out["names"] = {r: dict(c.most_common()) for r, c in names.items()}
    return out


def _profiled(fn):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return count(prof)


def _per_call(counts: dict, calls: Counter, name: str) -> dict:
    n = max(calls[name], 1)
    return {k: v / n for k, v in counts[name].items()}


def measure(work: str, sentences: int = 300, steps: int = 3) -> dict:
    """Ops / kernels per reuse update, per refresh update and per ascent step (module
    docstring), on the benchmark's model and a Multi30k slice."""
    from fairseq_arch.in_process import criterion_with

    from .cost import _TorchOptimizer

    data = common.multi30k_bin(work, sentences)
    save = os.path.join(work, "ops")
    shutil.rmtree(save, ignore_errors=True)  # a fresh cache: epoch 1 is a refresh epoch
    cfg, task, model, crit = common.build(data, save, ["--adv-method", "arch", "--arch-refresh-interval", "15",
                                                       "--adv-steps", str(steps)])
    batches = common.train_batches(task)
    model.train()
    opt = _TorchOptimizer(model.parameters(), lr=1e-4)
    calls = Counter()
    crit.space.init = _ranged("arch.init", crit.space.init, calls)
    crit.space.step = _ranged("arch.step", crit.space.step, calls)

    def step(c, batch):
        opt.zero_grad()
        task.train_step(batch, model, c, opt, update_num=0)  # forward(s) + backward; no optimizer step

    task.begin_epoch(1, model)
    access = task.arch_cache.access
    access.store_fresh = _ranged("arch.store", access.store_fresh, calls)
    for b in batches[1:]:  # fill the cache (and warm up) on every batch but the profiled one
        step(crit, b)
    calls.clear()
    refresh = _profiled(lambda: step(crit, batches[0]))
    refresh_calls = Counter(calls)
    task.begin_epoch(2, model)  # finalises the refresh; epoch 2 reuses the cache
    access = task.arch_cache.access
    access.read = _ranged("arch.read", access.read, calls)
    step(crit, batches[1 % len(batches)])  # warm-up (lazy loads of the reuse epoch)
    calls.clear()
    reuse = _profiled(lambda: step(crit, batches[0]))
    reuse_calls = Counter(calls)
    plain = criterion_with(cfg, task, adv_method="none")
    step(plain, batches[0])  # warm-up
    none = _profiled(lambda: step(plain, batches[0]))
    batch = batches[0]
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu", "steps": steps,
        "batch": {"sentences": int(batch["nsentences"]), "tokens": int(batch["ntokens"])},
        "reuse_update": {"read_both_sides": reuse["arch.read"], "read_per_side": _per_call(reuse, reuse_calls, "arch.read"),
                         "whole_update": reuse["update"], "none_update": none["update"]},
        "op_names": {"reuse": reuse["names"], "refresh": refresh["names"]},
        "refresh_update": {"init_both_sides": refresh["arch.init"], "per_ascent_step": _per_call(refresh, refresh_calls, "arch.step"),
                           "ascent_steps": refresh_calls["arch.step"], "store_per_side": _per_call(refresh, refresh_calls, "arch.store"),
                           "whole_update": refresh["update"]},
    }


def summary(res: dict) -> str:
    """One line: the plugin's own ops (kernels on CUDA) per update."""
    key = "kernels" if res["device"] == "cuda" else "ops"
    ru, rf = res["reuse_update"], res["refresh_update"]
    return (f"{key} on {res['device']}: reuse update: cache reads {ru['read_both_sides'][key]} "
            f"({ru['read_per_side'][key]:.0f} per side), whole update {ru['whole_update'][key]} vs none "
            f"{ru['none_update'][key]}; refresh update: init {rf['init_both_sides'][key]}, "
            f"{rf['per_ascent_step'][key]:.0f} per ascent step (both sides, S={rf['ascent_steps']}), "
            f"store {rf['store_per_side'][key]:.0f} per side, whole update {rf['whole_update'][key]}")


def markdown(res: dict) -> str:
    lines = [f"### Ops per update of the plugin's own work ({res['device']}; batch of {res['batch']['sentences']} "
             f"sentences, {res['batch']['tokens']} tokens; S={res['steps']})", "",
             "| where | ops | kernels (CUDA) |", "|---|---|---|"]
    ru, rf = res["reuse_update"], res["refresh_update"]
    for label, c in (("reuse: cache read, both sides", ru["read_both_sides"]),
                     ("reuse: whole update (arch)", ru["whole_update"]), ("reuse: whole update (none)", ru["none_update"]),
                     ("refresh: seeded init, both sides", rf["init_both_sides"]),
                     ("refresh: one ascent step, both sides", rf["per_ascent_step"]),
                     ("refresh: store of fresh rows, one side", rf["store_per_side"]),
                     ("refresh: whole update (arch)", rf["whole_update"])):
        lines.append(f"| {label} | {c['ops']:.0f} | {c['kernels']:.0f} |")
    lines += ["", "Ops by name (whole update; reads: both sides):", ""]
    for label, names in (("cache read", res["op_names"]["reuse"]["arch.read"]),
                         ("seeded init", res["op_names"]["refresh"]["arch.init"]),
                         ("ascent steps (all S)", res["op_names"]["refresh"]["arch.step"]),
                         ("stores (both sides)", res["op_names"]["refresh"]["arch.store"])):
        lines.append(f"- {label}: " + ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in names.items()))
    return "\n".join(lines)


def main(args):
    res = measure(args.work, min(args.sentences or 300, 1000), args.steps)
    print(summary(res))
    common.write_report(args.out, "ops", res, markdown(res))
