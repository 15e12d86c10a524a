"""PNG figures from the benchmark JSON files in --out, redrawn from those files alone
(nothing is measured or trained here):

- ``cost.png`` (cost.json): time per update of every method relative to none, measured
  (solid bars) beside the ratio Table 1's forward/backward counts predict (hatched bars),
  each bar labelled with its value, the machine in the title;
- ``bleu_vs_time.png`` (quality.json): validation BLEU after every epoch against the
  cost-derived wall-clock (Fig. 1 style), mean over seeds with the min-max band of the seeds;
- ``gnorm.png`` (quality.json): the mean gradient norm of every epoch (Fig. 3 style), from
  epoch 2 (epoch 1's warm-up spike is printed in the figure's note), mean over seeds with the
  min-max band.

The quality figures have two panels: the methods (none, arch, r3f, smart, rdrop, ...) and the
ARCH variants (ablations, with none and arch repeated as references), so that no panel holds
ten overlapping lines. Every variant keeps one colour and one marker
(:func:`benchmarks.quality_plots.variant_style`) in every figure. Missing inputs are skipped
with a message. The captions are in :mod:`.captions`."""

import json
import os

from .quality_plots import variant_style

FIRST_GNORM_EPOCH = 2  # gnorm.png starts here: epoch 1 (warm-up from random weights) is 2-3x every later one


def _load(out, name):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"plots: {path} missing, skipped")
        return None
    with open(path) as f:
        return json.load(f)


def _machine(res) -> str:
    return res.get("machine") or "machine not recorded"


# -- captions (the reports' markdown) -------------------------------------------------------



# -- cost.png -----------------------------------------------------------------------------

def cost_bars(out, plt):
    res = _load(out, "cost")
    if not res:
        return
    from matplotlib.patches import Patch

    names = list(res["methods"])
    meas = [res["methods"][n]["vs_none"] for n in names]
    pred = [res["methods"][n]["table1_predicted_vs_none"] for n in names]
    colours = [variant_style(n, names)[0] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.6))
    x = list(range(len(names)))
    w = 0.4
    bars_m = ax.bar([i - w / 2 for i in x], meas, w, color=colours, edgecolor="k", lw=0.6)
    bars_p = ax.bar([i + w / 2 for i in x], pred, w, color=colours, alpha=0.35, edgecolor="k", lw=0.6, hatch="//")
    ax.bar_label(bars_m, fmt="%.2f", fontsize=7, padding=1)
    ax.bar_label(bars_p, fmt="%.2f", fontsize=7, padding=1, color="0.3")
    ax.axhline(1.0, color="k", lw=0.7, ls="--")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("time per update / none's")
    ax.set_ylim(0, max(meas + pred) * 1.12)
    c = res["config"]
    ax.set_title(f"Cost per update relative to none (S={c['steps']}, Tc={c['tc']}, median of {c['rounds']} rounds)\n"
                 f"{c.get('model', '')}; {_machine(res)}, {res.get('date', 'date not recorded')}", fontsize=9)
    # the legend says what the bar kinds are; the colours are the methods' (as in every figure)
    ax.legend(handles=[Patch(facecolor="0.55", edgecolor="k", label="measured (colour: the method)"),
                       Patch(facecolor="0.85", edgecolor="k", hatch="//", label="Table 1 prediction")],
              fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cost.png"), dpi=110)
    plt.close(fig)


# -- quality figures ----------------------------------------------------------------------

def _panels(by: dict) -> list:
    """[(title, [variants])]: the methods (variant == its method), then the other variants
    with none and their base methods as references; one panel when there are no others."""
    methods = [v for v, rs in by.items() if v == rs[0]["method"]]
    others = [v for v in by if v not in methods]
    if not others:
        return [("methods", methods)]
    refs = [v for v in ["none"] + sorted({by[v][0]["method"] for v in others}) if v in by]
    return [("methods", methods), (f"variants ({', '.join(refs)}: references, dashed)", refs + others)]


def _band_plot(ax, xs, lo, mean, hi, v, names, n, ref=False):
    colour, marker = variant_style(v, names)
    # a reference (a line repeated from the methods' panel): wide, dashed, pale, under the others
    ax.plot(xs, mean, color=colour, marker=marker, ms=4, markevery=max(1, len(xs) // 8), lw=2.4 if ref else 1.3,
            ls="--" if ref else "-", alpha=0.55 if ref else 1.0, zorder=1 if ref else 3,
            label=f"{v} (n={n})" + (", reference" if ref else ""))
    if n > 1 and not ref:
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.1, lw=0, zorder=2)


def _stats(rows: list, keys: list):
    """Per key: (min, mean, max) over rows (dicts key -> value)."""
    lo = [min(r[k] for r in rows) for k in keys]
    hi = [max(r[k] for r in rows) for k in keys]
    mean = [sum(r[k] for r in rows) / len(rows) for k in keys]
    return lo, mean, hi


def _two_panel(plt, panels, by, draw, xlabel, ylabel, title, path, note=None):
    names = list(by)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), sharey=True, squeeze=False)
    for ax, (sub, vs) in zip(axes[0], panels):
        for v in vs:
            draw(ax, v, names, ref=sub != "methods" and v in panels[0][1])
        ax.set_title(sub, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def quality_curves(out, plt):
    """bleu_vs_time.png: validation BLEU after every epoch against the cost-derived wall-clock
    (cost.json s/update x updates, as in quality.md), mean over seeds and min-max band, one
    line per variant; gnorm.png: per-epoch mean gradient norm from epoch 2, mean over seeds and
    min-max band (Fig. 3 style)."""
    res = _load(out, "quality")
    if not res:
        return
    from . import quality

    cost = quality.load_cost(out)
    by = {}
    for r in res["runs"]:
        by.setdefault(r["variant"], []).append(r)
    machine = _machine(res)
    _bleu_vs_time(out, plt, by, cost, machine)
    _gnorm(out, plt, by, machine)


def _bleu_vs_time(out, plt, by, cost, machine):
    from . import quality

    curves = {}  # variant -> [{epoch: (seconds, bleu)}] per seed, epochs every seed has
    for v, rs in by.items():
        per_seed = []
        for r in rs:
            secs = quality.derived_seconds(r["method"], r["per_epoch"], cost) if cost else [None] * len(r["per_epoch"])
            per_seed.append({e["epoch"]: (t, e.get("valid_bleu")) for e, t in zip(r["per_epoch"], secs)
                             if t is not None and e.get("valid_bleu") is not None})
        epochs = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        if epochs:
            curves[v] = (per_seed, epochs)
        else:
            print(f"plots: {v}: no cost-derived wall-clock (cost.json lacks its method), not in bleu_vs_time.png")

    def draw_bleu(ax, v, names, ref=False):
        if v not in curves:
            return
        per_seed, epochs = curves[v]
        xs = [sum(c[e][0] for c in per_seed) / len(per_seed) / 60 for e in epochs]
        lo, mean, hi = _stats([{e: c[e][1] for e in epochs} for c in per_seed], epochs)
        _band_plot(ax, xs, lo, mean, hi, v, names, len(per_seed), ref)

    kept = {v: rs for v, rs in by.items() if v in curves}
    if kept:
        _two_panel(plt, _panels(kept), kept, draw_bleu,
                   "wall-clock, min (cost-derived: cost.json s/update x updates)",
                   "valid BLEU (greedy); line: mean, band: min-max over seeds",
                   f"Validation BLEU vs wall-clock, Multi30k De-En, every epoch ({machine})",
                   os.path.join(out, "bleu_vs_time.png"))
    else:
        print("plots: no variant has a cost-derived wall-clock: bleu_vs_time.png not drawn")


def _gnorm(out, plt, by, machine):
    gn = {}
    first = {}
    for v, rs in by.items():
        rows = [{e["epoch"]: e["gnorm"] for e in r["per_epoch"] if e.get("gnorm") is not None} for r in rs]
        epochs = sorted(set.intersection(*(set(x) for x in rows))) if rows else []
        if epochs and epochs[0] < FIRST_GNORM_EPOCH:
            first[v] = sum(x[epochs[0]] for x in rows) / len(rows)
        epochs = [e for e in epochs if e >= FIRST_GNORM_EPOCH]
        if epochs:
            gn[v] = (rows, epochs)

    def draw_gnorm(ax, v, names, ref=False):
        if v in gn:
            rows, epochs = gn[v]
            _band_plot(ax, epochs, *_stats(rows, epochs), v, names, len(rows), ref)

    kept = {v: rs for v, rs in by.items() if v in gn}
    if kept:
        note = None
        if first:
            later = [x[e] for rows, epochs in gn.values() for x in rows for e in epochs]
            note = (f"Epoch 1 left out: its mean gradient norm ({min(first.values()):.2f}-{max(first.values()):.2f} "
                    f"over the variants; the first steps from random weights) would squash the later epochs' "
                    f"({min(later):.2f}-{max(later):.2f}).")
        _two_panel(plt, _panels(kept), kept, draw_gnorm, "epoch",
                   "mean global gradient norm of the epoch",
                   f"Gradient norm per epoch (Fig. 3 style), from epoch {FIRST_GNORM_EPOCH} ({machine})",
                   os.path.join(out, "gnorm.png"), note)


def main(args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib missing (pip install -e .[bench]); no figures")
        return
    cost_bars(args.out, plt)
    quality_curves(args.out, plt)
