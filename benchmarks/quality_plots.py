"""The quality report's two figures, from its summary (quality.summarize's JSON):

- ``<suite>_forest.png``: each variant's paired difference from ``none`` (mean over seeds,
  95% t interval), one row per variant: what the goals are judged on;
- ``<suite>_bleu_cost.png``: mean test BLEU (error bars: the std over seeds) against the
  cost-derived wall-clock of a run: what a user trades.

Every variant keeps one colour and one marker (:func:`variant_style`) in every figure.
"""

import os
from typing import Dict, Tuple

# fixed styles for the variants the reports name; other variants get the next free pair,
# in sorted order, so a figure's legend never depends on the order runs finished in
STYLES = {
    "none": ("tab:gray", "o"), "rdrop": ("tab:green", "s"), "arch": ("tab:blue", "D"),
    "arch-code": ("tab:purple", "^"), "arch-rdrop": ("tab:olive", "v"), "zero-delta": ("tab:pink", "P"),
    "smart": ("tab:red", "X"), "r3f": ("tab:orange", "<"), "freelb": ("tab:brown", ">"),
    "arch-first5": ("tab:cyan", "h"), "arch-p1": ("navy", "*"), "arch-neighbor": ("teal", "p"),
    "arch-pretrained": ("goldenrod", "d"), "arch-nsearch": ("mediumvioletred", "H"),
    # cost.json's rows: ARCH's refresh and reuse updates and their Tc-cycle average (in blues)
    "arch-refresh": ("cornflowerblue", "8"), "arch-reuse": ("deepskyblue", "P"), "arch (amortised)": ("tab:blue", "d"),
}
_SPARE_COLORS = ["black", "gold", "darkgreen", "crimson", "slateblue", "sienna", "magenta", "darkorange"]
_SPARE_MARKERS = ["d", "8", "H", "1", "2", "3", "4", "+", "x"]


def variant_style(name: str, others=()) -> Tuple[str, str]:
    """(colour, marker) of a variant; ``others``: every variant of the figure, so that the
    spare styles go to the unknown ones in a stable order."""
    if name in STYLES:
        return STYLES[name]
    unknown = sorted(set(o for o in others if o not in STYLES) | {name})
    i = unknown.index(name)
    return _SPARE_COLORS[i % len(_SPARE_COLORS)], _SPARE_MARKERS[i % len(_SPARE_MARKERS)]


def forest(plt, paired: Dict[str, dict], path: str, machine: str) -> bool:
    """Differences ``<variant> - none`` with their 95% CI (a point without bars: one seed)."""
    rows = [(k[:-len(" - none")], p) for k, p in paired.items() if k.endswith(" - none") and p.get("n")]
    if not rows:
        return False
    names = [v for v, _ in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    for i, (v, p) in enumerate(rows):
        colour, marker = variant_style(v, names)
        lo, hi = p["ci"] if p.get("ci") else (p["mean"], p["mean"])
        ax.errorbar(p["mean"], i, xerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt=marker, color=colour, capsize=3)
        ax.annotate(f"{p['mean']:+.2f} (n={p['n']})", (hi, i), xytext=(6, -3), textcoords="offset points", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.margins(x=0.25)  # room for the value labels right of each interval
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("test sacreBLEU - none (paired by seed; bars: 95% t interval)")
    ax.set_title(f"Difference from none ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def bleu_cost(plt, summary: Dict[str, dict], path: str, machine: str) -> bool:
    """Mean test BLEU (std over seeds) against the cost-derived minutes of one run."""
    pts = {v: s for v, s in summary.items() if s.get("derived_seconds") is not None}
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v, s in pts.items():
        colour, marker = variant_style(v, list(pts))
        x = s["derived_seconds"] / 60
        ax.errorbar(x, s["mean"], yerr=s["std"] or 0, fmt=marker, color=colour, capsize=3, ms=7,
                    label=f"{v} (n={s['n']})")
        ax.annotate(f"{s['mean']:.2f}", (x, s["mean"]), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel("cost-derived wall-clock of one run, min (cost.json s/update x updates)")
    ax.set_ylabel("test sacreBLEU, mean over seeds (bars: std)")
    ax.set_title(f"Quality vs cost ({machine})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out_dir: str, suite: str, info: dict, machine: str) -> list:
    """Both figures of a suite under ``out_dir``; returns the markdown lines (image + caption)
    of those written. No matplotlib: no figures, said once."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(figures skipped: matplotlib missing; pip install -e .[bench])", ""]
    lines = []
    forest_png, cost_png = f"{suite}_forest.png", f"{suite}_bleu_cost.png"
    if forest(plt, info.get("paired", {}), os.path.join(out_dir, forest_png), machine):
        lines += [f"![difference from none]({forest_png})", "",
                  "*Each variant's test sacreBLEU minus none's on the same seed, mean and 95% t interval over "
                  "the seeds both ran; a point without bars has one seed.*", ""]
    if bleu_cost(plt, info.get("summary", {}), os.path.join(out_dir, cost_png), machine):
        lines += [f"![BLEU vs cost]({cost_png})", "",
                  "*Mean test sacreBLEU (bars: std over seeds) against the cost-derived wall-clock of one run "
                  "at the same epochs.*", ""]
    return lines
