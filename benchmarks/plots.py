"""PNG figures from the benchmark JSON files in --out: cost bars with the Table 1
prediction (cost.json), BLEU vs wall-clock per method (Fig. 1 style) and the
gradient norm per epoch (Fig. 3 style) (quality.json). Missing inputs are
skipped with a message."""

import json
import os

COLORS = {"none": "tab:gray", "rdrop": "tab:green", "arch-paper": "tab:brown", "arch-neighbor": "tab:cyan", "r3f": "tab:orange", "smart": "tab:red", "freelb": "tab:purple",
          "arch": "tab:blue", "arch-refresh": "tab:cyan", "arch-reuse": "tab:blue", "arch (amortised)": "navy"}


def _load(out, name):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"plots: {path} missing, skipped")
        return None
    with open(path) as f:
        return json.load(f)


def cost_bars(out, plt):
    res = _load(out, "cost")
    if not res:
        return
    names = list(res["methods"])
    meas = [res["methods"][n]["vs_none"] for n in names]
    pred = [res["methods"][n]["table1_predicted_vs_none"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], meas, 0.4, label="measured", color=[COLORS.get(n, "k") for n in names])
    ax.bar([i + 0.2 for i in x], pred, 0.4, label="Table 1 prediction", color="white", edgecolor="k", hatch="//")
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("time per update / none")
    ax.set_title(f"Cost per update (S={res['config']['steps']}, Tc={res['config']['tc']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cost.png"), dpi=110)
    plt.close(fig)


def quality_curves(out, plt):
    """bleu_vs_time.png: validation BLEU after every epoch against the cost-derived wall-clock
    (cost.json s/update x updates, as in quality.md), mean over seeds, one line per variant;
    gnorm.png: per-epoch mean gradient norm, mean over seeds (Fig. 3 style)."""
    res = _load(out, "quality")
    if not res:
        return
    from . import quality

    cost = quality.load_cost(out)
    by = {}
    for r in res["runs"]:
        by.setdefault(r["variant"], []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    for v, rs in by.items():
        curves = []
        for r in rs:
            secs = quality.derived_seconds(r["method"], r["per_epoch"], cost)
            curves.append({e["epoch"]: (t, e.get("valid_bleu")) for e, t in zip(r["per_epoch"], secs)
                           if t is not None and e.get("valid_bleu") is not None})
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not epochs:
            print(f"plots: {v}: no cost-derived wall-clock (cost.json lacks its method), not plotted")
            continue
        pts = [(sum(c[e][0] for c in curves) / len(curves) / 60, sum(c[e][1] for c in curves) / len(curves))
               for e in epochs]
        ax.plot(*zip(*pts), marker="o", ms=2.5, lw=1.2, color=COLORS.get(v, COLORS.get(rs[0]["method"], None)),
                ls="--" if v not in COLORS else "-", label=f"{v} (n={len(rs)})")
    ax.set_xlabel("wall-clock, min (cost.json s/update x updates; its interleaved rounds, its machine)")
    ax.set_ylabel("valid BLEU (greedy), mean over seeds")
    ax.set_title("BLEU vs wall-clock (Multi30k De-En)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bleu_vs_time.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for v, rs in by.items():
        rows = [{e["epoch"]: e.get("gnorm") for e in r["per_epoch"] if e.get("gnorm") is not None} for r in rs]
        epochs = sorted(set.intersection(*(set(x) for x in rows))) if rows else []
        if epochs:
            ax.plot(epochs, [sum(x[e] for x in rows) / len(rows) for e in epochs], lw=1,
                    color=COLORS.get(v, COLORS.get(rs[0]["method"], None)), ls="--" if v not in COLORS else "-",
                    label=v)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean global gradient norm of the epoch")
    ax.set_title("Gradient norm per epoch (Fig. 3 style), mean over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gnorm.png"), dpi=110)
    plt.close(fig)


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
