"""python -m benchmarks peak-chunks: peak tensor memory of one update with ``--adv-chunks``.

Measures, side by side on one model and its largest batch, the most tensor bytes alive at
once in one train_step (the cost benchmark's LiveTensorBytes) of ``none``, of ``r3f``
(the shape of an ARCH reuse update: clean forward, early clean backward, one perturbed
forward; on the H200 their peaks differ by 0.3%) and of ``smart`` (the shape of an ARCH
refresh update), each with every ``--chunks`` count.

On a CPU a Transformer-big update takes minutes, so ``--layers 1,2`` measures the model
with 1 and 2 encoder and decoder layers and extrapolates each peak linearly to the
model's own depth: every layer adds the same activations and gradients, while the
embeddings and the output layer are there at any depth. The extrapolation is checked
against the H200's measured peaks of the full model when that file is given.
"""

import json
import os
import random
import statistics

from . import common
from .cost import LiveTensorBytes, _timed, _TorchOptimizer

GOAL = 1.15  # issue 22: peak tensor memory at most 1.15 x none, at Transformer-big too
FULL_DEPTH = {"transformer_tiny": 2, "transformer_wmt_en_de_big": 6, "transformer_iwslt_de_en": 6, "transformer": 6}


def one_peak(task, model, crit, batch, opt) -> float:
    """MiB: the most tensor bytes alive at once in the task's train_step on ``batch``."""
    opt.zero_grad()  # gradients are allocated inside the update, as after fairseq's zero_grad
    mem = LiveTensorBytes()
    with mem:
        loss, _, _ = task.train_step(batch, model, crit, opt, update_num=0)
        del loss
    opt.zero_grad()
    return mem.peak / 2**20


def update_seconds(task, model, crits: dict, batch, opt, rounds: int) -> dict:
    """Median seconds of one update (zero_grad, the task's train_step, Adam) per criterion,
    the criteria in a new random order every round."""
    rng, times = random.Random(0), {k: [] for k in crits}
    for _ in range(rounds):
        for key in rng.sample(list(crits), len(crits)):
            opt.zero_grad()
            dt, _ = _timed(lambda: (task.train_step(batch, model, crits[key], opt, update_num=0), opt.step()))
            times[key].append(dt)
    opt.zero_grad()
    return {k: statistics.median(v) for k, v in times.items()}


def peaks_at_depth(data: str, work: str, model_arch: str, layers, chunks, rounds: int = 0) -> dict:
    """{"peaks": {"none": MiB, "r3f c1": MiB, ...}, "batch": shape, "seconds": {"none": s,
    "r3f c1": s, ...} when ``rounds``}, for ``layers`` encoder and decoder layers (None: the
    model's own). The timing is of r3f (an ARCH reuse update's shape) at S's own default."""
    from fairseq_arch.in_process import criterion_with

    depth = [] if layers is None else ["--encoder-layers", str(layers), "--decoder-layers", str(layers)]
    cfg, task, model, _ = common.build(data, os.path.join(work, "peak-chunks"), ["--adv-method", "r3f", *depth],
                                       model_arch)
    batches = common.train_batches(task)
    batch = max(batches, key=lambda b: b["net_input"]["prev_output_tokens"].numel())
    model.train()
    opt = _TorchOptimizer(model.parameters(), lr=1e-4)
    crits = {"none": criterion_with(cfg, task, adv_method="none")}
    out = {"none": one_peak(task, model, crits["none"], batch, opt)}
    for method in ("r3f", "smart"):
        for k in chunks:
            # S = 1: each ascent step's graph is freed before the next, so S does not move the peak
            crits[f"{method} c{k}"] = criterion_with(cfg, task, adv_method=method, adv_chunks=k, adv_steps=1)
            out[f"{method} c{k}"] = one_peak(task, model, crits[f"{method} c{k}"], batch, opt)
            print(f"peak-chunks: {model_arch}, {layers or 'all'} layers, {method} --adv-chunks {k}: "
                  f"{out[f'{method} c{k}']:.1f} MiB (none {out['none']:.1f})", flush=True)
    res = {"peaks": out, "batch": list(batch["net_input"]["prev_output_tokens"].shape)}
    if rounds:
        timed = {k: c for k, c in crits.items() if not k.startswith("smart")}
        res["seconds"] = update_seconds(task, model, timed, batch, opt, rounds)
    return res


def extrapolate(by_depth: dict, depth: int) -> dict:
    """Each key's peak at ``depth`` layers from a line through the two measured depths."""
    (l1, p1), (l2, p2) = sorted(by_depth.items())[:2]
    return {k: p1[k] + (p2[k] - p1[k]) / (l2 - l1) * (depth - l1) for k in p1}


def markdown(res: dict) -> str:
    peaks, depth = res["peaks_full_depth"], res["full_depth"]
    how = "measured" if not res["extrapolated"] else f"extrapolated from {res['layers']} layers"
    lines = [f"### Peak tensor memory with --adv-chunks ({res['model']}, {depth}+{depth} layers {how}; batch "
             f"{res['batch'][0]} sentences x {res['batch'][1]} target positions)", "",
             "| method | --adv-chunks | peak MiB | x none | H200 measured MiB (chunks 1) |", "|---|---|---|---|---|"]
    h200 = res.get("h200_measured") or {}
    for key, mib in peaks.items():
        method, _, k = key.partition(" c")
        ref = h200.get(method) if k in ("", "1") else None
        lines.append(f"| {method} | {k or '-'} | {mib:.0f} | {mib / peaks['none']:.2f} | "
                     f"{f'{ref:.0f}' if ref else '-'} |")
    lines += ["", "r3f has the shape of an ARCH reuse update, smart that of a refresh update (their H200 peaks: "
              f"r3f 4073.5, arch-reuse 4059.6, smart and arch-refresh 4059.6 MiB). Goal: at most {GOAL} x none."]
    for depth_, secs in res.get("seconds_by_depth", {}).items():
        lines += ["", f"Seconds per update at {depth_} layers (median of {res['rounds']} interleaved rounds, r3f at its "
                  "default S): " + ", ".join(f"{k} {v:.3f} ({v / secs['r3f c1']:.2f} x c1)" if k != "none" else
                                             f"none {v:.3f}" for k, v in secs.items())]
    if res["extrapolated"]:
        lines += ["", "Per-depth measurements (MiB): " + "; ".join(
            f"{l} layers: " + ", ".join(f"{k} {v:.0f}" for k, v in p.items()) for l, p in res["by_depth"].items())]
    return "\n".join(lines)


def h200_peaks(path: str, model_arch: str) -> dict:
    """The peaks a GPU cost run measured for the same model ({} for another model or none)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        res = json.load(f)
    if res.get("config", {}).get("model") != model_arch:
        return {}
    return {m: res["methods"][m]["peak_mib"] for m in ("none", "r3f", "smart") if m in res["methods"]}


def measure(work: str, model_arch: str, sentences: int, chunks, layers, h200_json: str = "", rounds: int = 0) -> dict:
    """The peaks of none, r3f and smart with each ``chunks`` count at ``model_arch``'s own
    depth: measured, or extrapolated from the two depths in ``layers``."""
    if layers and len(layers) != 2:
        raise SystemExit("peak-chunks: --layers takes two depths to extrapolate from (or none: the full model)")
    data = common.multi30k_bin(work, sentences)
    full = FULL_DEPTH.get(model_arch, 6)
    by_depth = {l: peaks_at_depth(data, work, model_arch, l, chunks, rounds) for l in layers} or \
        {full: peaks_at_depth(data, work, model_arch, None, chunks, rounds)}
    peaks = {l: r["peaks"] for l, r in by_depth.items()}
    return {"model": model_arch, "full_depth": full, "layers": list(layers), "extrapolated": bool(layers),
            "chunks": list(chunks), "batch": next(iter(by_depth.values()))["batch"], "by_depth": peaks,
            "peaks_full_depth": extrapolate(peaks, full) if layers else peaks[full],
            "h200_measured": h200_peaks(h200_json, model_arch),
            "seconds_by_depth": {l: r["seconds"] for l, r in by_depth.items() if "seconds" in r}, "rounds": rounds}


def summary(res: dict) -> str:
    """One line: each method's peak x none per chunk count, and the fewest chunks meeting 1.15."""
    p = res["peaks_full_depth"]
    parts = []
    for method in ("r3f", "smart"):
        ratios = {k: p[f"{method} c{k}"] / p["none"] for k in res["chunks"]}
        met = [k for k, r in ratios.items() if r <= GOAL]
        parts.append(f"{method} " + ", ".join(f"c{k} {r:.2f}" for k, r in ratios.items())
                     + f" (<= {GOAL}: {'from --adv-chunks ' + str(min(met)) if met else 'NOT met'})")
    how = f"extrapolated from {res['layers']} layers" if res["extrapolated"] else "measured"
    return f"peak tensor memory x none at {res['model']} ({how}): " + "; ".join(parts)


def main(a) -> None:
    res = measure(a.work, a.model_arch or "transformer_wmt_en_de_big", a.sentences or 4000,
                  [int(k) for k in a.chunks.split(",")], [int(l) for l in a.layers.split(",")] if a.layers else [],
                  a.h200_cost_json, a.time_rounds)
    common.write_report(a.out, "peak_chunks", res, markdown(res) + "\n\n" + summary(res))
