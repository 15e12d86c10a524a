"""The benchmark figures and the reports' text (issue 21): one colour and marker per variant in
every figure, seed bands, the figures written from JSON alone, captions under every image in
the reports, and never a 'nan' in a report (a value that cannot be computed prints 'n/a' with
its reason). Synthetic JSON in tmp_path: no training, no subprocess, seconds."""

import glob
import json
import os
import types

import pytest

from . import utils

pytestmark = pytest.mark.fast

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

RESULTS = os.path.join(utils.REPO, "benchmarks", "results")
COST_ROWS = ["none", "r3f", "smart", "freelb", "rdrop", "arch-refresh", "arch-reuse", "arch (amortised)"]


def cost_result(**over):
    rows = {}
    for i, m in enumerate(COST_ROWS):
        rows[m] = {"seconds": 0.1 * (1 + i), "vs_none": 1.0 + i, "vs_smart": (1.0 + i) / 3, "fwd_bwd": [1, 1],
                   "table1_fwd_bwd": [1, 1], "predicted_vs_none": 1.0 + i / 2, "table1_predicted_vs_none": 1.0 + i / 3,
                   "hot_path_share": 0.01 * i, "peak_mib": 100.0 + i, "peak_vs_none": 1.0 + i / 100,
                   "peak_joint_mib": None, "peak_joint_vs_none": None}
    res = {"config": {"sentences": 100, "batches": 2, "rounds": 3, "steps": 2, "tc": 3, "model": "tiny", "max_tokens": 4096},
           "methods": rows, "peak_batch": [8, 12], "forward_s": 0.01, "backward_s": 0.02, "optimizer_s": 0.001,
           "cache_read_rebuild_share_of_reuse_update": 0.02, "cache_read_rebuild_share_of_amortised_update": 0.01,
           "finalize_seconds": 0.1, "disk_bytes": {"source": 1000}, "disk_bytes_formula_p_tokens_d_bytes": {"source": 1100},
           "peak_rss_mb": {"none": 1000.0, "r3f": 1100.0, "arch": 1050.0, "ratio_arch_vs_none": 1.05,
                           "ratio_arch_vs_r3f": 1050 / 1100},
           "machine": "test machine, 2 cores", "date": "2026-12-07 00:00"}
    res.update(over)
    return res


def run(variant, method, seed, flags, cfg, epochs=6, bleu=None):
    per_epoch = [{"epoch": e, "valid_bleu": (bleu or 20.0) * e / epochs + seed * 0.3, "updates": 10.0 * e,
                  "fwd_per_batch": 2.0 if method == "arch" else 1.0, "gnorm": 3.0 if e == 1 else 1.0 / e + 0.01 * seed}
                 for e in range(1, epochs + 1)]
    return {"variant": variant, "method": method, "seed": seed, "flags": flags, "config": cfg,
            "test_sacrebleu": (bleu or 20.0) + seed * 0.2, "test_sacrebleu_text": "", "signature": "nrefs:1|test",
            "best_valid_bleu": per_epoch[-1]["valid_bleu"], "best_epoch": epochs, "epochs_run": epochs,
            "updates": 10 * epochs, "train_seconds_measured": None, "per_epoch": per_epoch}


class RecordingPlt:
    """matplotlib.pyplot, keeping every figure a function closes (to look at its lines)."""

    def __init__(self):
        import matplotlib.pyplot as plt

        self.plt, self.closed = plt, []

    def __getattr__(self, name):
        return getattr(self.plt, name)

    def close(self, fig):
        self.closed.append(fig)


def line_styles(fig):
    """{axes index: {variant: (colour, marker)}} of a figure's labelled lines."""
    from matplotlib.colors import to_hex

    out = {}
    for i, ax in enumerate(fig.axes):
        for line in ax.get_lines():
            label = line.get_label()
            if not label.startswith("_"):
                out.setdefault(i, {})[label.split(" (")[0]] = (to_hex(line.get_color()), line.get_marker())
    return out


def test_every_variant_keeps_one_distinct_style():
    from benchmarks import quality, quality_plots

    names = list(dict.fromkeys(list(quality.VARIANTS) + COST_ROWS + ["my-variant", "another"]))
    styles = {v: quality_plots.variant_style(v, names) for v in names}
    assert len(set(styles.values())) == len(names), styles
    # the spare styles never repeat a fixed one: an unknown variant never looks like a known one
    assert not {c for c, _ in quality_plots.STYLES.values()} & set(quality_plots._SPARE_COLORS)
    # the same variant, the same style, whatever else the figure holds and in whatever order
    assert quality_plots.variant_style("arch-w2.5", names) == quality_plots.variant_style("arch-w2.5", names[::-1])
    for v in quality_plots.STYLES:
        assert quality_plots.variant_style(v, ["x"]) == quality_plots.variant_style(v, names) == quality_plots.STYLES[v]


def write_quality(out, cfg=None):
    """quality.json (the report's JSON) with methods, ablations, n=3 and n=1 variants."""
    cfg = cfg or {"pairs": 100}
    runs = []
    for v, m, seeds, bleu in (("none", "none", (1, 2, 3), 20), ("arch", "arch", (1, 2, 3), 22), ("smart", "smart", (1, 2), 23),
                              ("rdrop", "rdrop", (1,), 21), ("arch-p1", "arch", (1, 2, 3), 22.5),
                              ("arch-first5", "arch", (1,), 21.5), ("arch-nsearch", "arch", (1,), 22.2),
                              ("arch-pretrained", "arch", (1, 2, 3), 22.1)):
        runs += [run(v, m, s, ["--adv-method", m], cfg, bleu=bleu) for s in seeds]
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump({"config": cfg, "runs": runs, "machine": "test machine, 2 cores", "date": "2026-12-07 00:00"}, f)
    return runs


def test_figures_are_written_from_the_json_with_one_style_per_variant_and_seed_bands(tmp_path):
    from benchmarks import plots

    out = str(tmp_path)
    with open(tmp_path / "cost.json", "w") as f:
        json.dump(cost_result(), f)
    runs = write_quality(out)
    rec = RecordingPlt()
    plots.cost_bars(out, rec)
    plots.quality_curves(out, rec)
    for png in ("cost.png", "bleu_vs_time.png", "gnorm.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    cost_fig, bleu_fig, gnorm_fig = rec.closed
    # cost.png: the machine in the title, a value on every bar, a legend of the bar kinds (not a colour)
    ax = cost_fig.axes[0]
    assert "test machine" in ax.get_title()
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 2 * len(COST_ROWS) and "1.00" in labels and "8.00" in labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["measured (colour: the method)", "Table 1 prediction"]
    assert any(p.get_hatch() for p in ax.get_legend().get_patches())
    # the quality figures: the methods' panel and the variants' panel; distinct styles within a
    # panel, one style per variant across panels and figures
    seen = {}
    n_seeds = {}
    for r in runs:
        n_seeds.setdefault(r["variant"], set()).add(r["seed"])
    for fig in (bleu_fig, gnorm_fig):
        panels = line_styles(fig)
        assert len(panels) == 2
        assert set(panels[0]) == {"none", "arch", "smart", "rdrop"}
        assert set(panels[1]) >= {"arch-p1", "arch-first5", "arch-nsearch", "arch-pretrained", "none", "arch"}
        for styles in panels.values():
            assert len(set(styles.values())) == len(styles), styles
            for v, st in styles.items():
                assert seen.setdefault(v, st) == st, (v, st, seen[v])
        # a shaded band per multi-seed variant of the methods' panel; none for n=1
        bands = [c for c in fig.axes[0].collections]
        assert len(bands) == sum(1 for v in panels[0] if len(n_seeds[v]) > 1)
    # gnorm.png starts at epoch 2 and says why
    assert min(min(line.get_xdata()) for line in gnorm_fig.axes[0].get_lines()) == plots.FIRST_GNORM_EPOCH
    assert "Epoch 1 left out" in gnorm_fig._suptitle.get_text()
    for fig in rec.closed:
        rec.plt.close(fig)


def test_plots_redraws_only_and_skips_missing_inputs(tmp_path, capsys):
    from benchmarks import plots

    plots.main(types.SimpleNamespace(out=str(tmp_path)))
    assert "missing, skipped" in capsys.readouterr().out
    assert not glob.glob(str(tmp_path / "*.png"))


def no_nan(text):
    assert "nan" not in text.lower().replace("nanos", ""), [l for l in text.splitlines() if "nan" in l.lower()]


@pytest.mark.parametrize("rss, why", [
    ({"skipped": "not measured: the run had --skip-rss"}, "--skip-rss"),
    ({"pending": "pending: the peak-RSS runs had not finished"}, "pending"),
    # cost.json files written before: zeros and NaN ratios
    ({"none": 0, "r3f": 0, "arch": 0, "ratio_arch_vs_none": float("nan"), "ratio_arch_vs_r3f": float("nan")}, "--skip-rss"),
    (None, "--skip-rss"),
])
def test_cost_report_prints_na_with_the_reason_never_nan(rss, why):
    from benchmarks import cost

    res = cost_result()
    del res["methods"]["freelb"]["hot_path_share"]  # a row recorded before the column existed
    md = cost.markdown(res, rss)
    no_nan(md)
    assert f"| peak RSS arch <= 1.1 x none | n/a (" in md and why in md
    assert "| freelb |" in md and "n/a (not recorded in this cost.json)" in md
    assert " 0 MiB" not in md


def test_cost_report_carries_the_figure_and_its_caption():
    from benchmarks import cost

    res = cost_result()
    lines = cost.markdown(res, res["peak_rss_mb"]).splitlines()
    no_nan("\n".join(lines))
    i = lines.index("![cost per update](cost.png)")
    assert lines[i + 2].startswith("*") and lines[i + 2].endswith("*") and "Table 1" in lines[i + 2]
    assert "| peak RSS arch <= 1.1 x none | 1.050 | yes |" in lines
    assert any("x0.955 r3f" in l for l in lines)


def test_quality_report_has_its_figures_with_captions_and_no_nan(tmp_path, monkeypatch):
    """The v2 report from finished runs' JSONs (quality --report-only's path): n=1 variants
    (no std), a method cost.json lacks (no wall-clock) print n/a; both figures under it."""
    from benchmarks import plots, quality

    monkeypatch.setattr(quality, "SUITE", "quality_v2")
    args = types.SimpleNamespace(out=str(tmp_path), train_pairs=100, valid_sentences=10, test_sentences=10, epochs=6,
                                 quality_tc=None, dropout=0.1, lr=1e-3, warmup=10, max_tokens=512, quality_model="v2",
                                 methods="none,arch,arch-p1,r3f", seeds="1,2", multi_seed_methods="none,arch")
    cfg = quality.config_of(args)
    plan = quality.plan_of(args)
    os.makedirs(tmp_path / "quality_v2")
    for name, seed in plan:
        method = quality.adv_method(quality.variant_flags(name, cfg, {}))
        quality.write_run(str(tmp_path), run(name, method, seed, quality.variant_flags(name, cfg, {}), cfg))
    res = cost_result()
    del res["methods"]["r3f"]  # r3f: no cost-derived wall-clock
    with open(tmp_path / "cost.json", "w") as f:
        json.dump(res, f)
    quality.report(args, plan, cfg, {})
    plots.main(args)
    md = open(tmp_path / "quality.md").read()
    no_nan(md)
    assert "n/a (no cost.json row)" in md and "| arch-p1 |" in md
    lines = md.splitlines()
    for png in ("bleu_vs_time.png", "gnorm.png"):
        i = next(i for i, l in enumerate(lines) if l.startswith("![") and l.endswith(f"({png})"))
        assert lines[i + 2].startswith("*") and lines[i + 2].endswith("*"), lines[i:i + 3]
        assert (tmp_path / png).stat().st_size > 5000
    assert (tmp_path / "cost.png").stat().st_size > 5000


def test_scale_report_prints_na_for_an_unrecorded_agreement():
    from benchmarks import scale

    with open(os.path.join(RESULTS, "scale.json")) as f:
        rows = json.load(f)["rows"]
    rows = [dict(r) for r in rows]
    rows[0].pop("faiss_vs_brute_top1_similarity_agreement", None)
    md = scale.markdown(rows, 512, 0.1)
    no_nan(md)
    assert "n/a (not recorded by this run)" in md


def test_the_committed_reports_have_no_nan():
    paths = glob.glob(os.path.join(RESULTS, "*.md")) + glob.glob(os.path.join(RESULTS, "*", "*.md"))
    assert paths
    for path in paths:
        with open(path) as f:
            text = f.read()
        assert not any(w in ("nan", "xnan", "nan%") for w in text.lower().replace("|", " ").split()), path
        assert "nan%" not in text and "xnan" not in text, path


def test_figure_lines_fill_their_caption():
    from benchmarks import captions

    lines = captions.figure_lines("cost.png", rounds=7, steps=2, tc=5)
    assert lines[0] == "![cost per update](cost.png)" and "median of 7" in lines[2] and "S=2, Tc=5" in lines[2]
