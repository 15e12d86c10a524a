"""PNG figures from the benchmark JSON files in --out: cost bars with the Table 1
prediction (cost.json), BLEU vs wall-clock per method (Fig. 1 style) and the
gradient norm over updates (Fig. 3 style) (quality.json). Missing inputs are
skipped with a message."""

import json
import os

COLORS = {"none": "tab:gray", "r3f": "tab:orange", "smart": "tab:red", "freelb": "tab:purple",
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
    res = _load(out, "quality")
    if not res:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for r in res["runs"]:
        pts = [(e["wall"] / 60, e.get("valid_bleu")) for e in r["per_epoch"] if e.get("valid_bleu") is not None]
        if not pts:
            continue
        label = r["method"] if r["method"] not in seen else None
        seen.add(r["method"])
        ax.plot(*zip(*pts), marker="o", ms=3, color=COLORS.get(r["method"], "k"), label=label, alpha=0.8)
    ax.set_xlabel("wall-clock (min, 2 CPU cores)")
    ax.set_ylabel("valid BLEU (greedy)")
    ax.set_title("BLEU vs wall-clock (Multi30k De-En)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bleu_vs_time.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    shown = set()
    for r in res["runs"]:
        if r["method"] in shown or not r["gnorm_per_update"]:
            continue
        shown.add(r["method"])
        ax.plot(r["gnorm_per_update"], lw=0.8, color=COLORS.get(r["method"], "k"), label=f"{r['method']} (seed {r['seed']})")
    ax.set_xlabel("update")
    ax.set_ylabel("global gradient norm")
    ax.set_title("Gradient norm over updates (Fig. 3 style)")
    ax.legend()
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
