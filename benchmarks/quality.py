"""Quality at equal epochs: Multi30k train -> test_2016_flickr (real data), a small
transformer, methods x seeds, each a real fairseq-train + fairseq-generate run.

Per run: validation BLEU and wall-clock after every epoch (for BLEU vs wall-clock),
the gradient norm of every update and its per-epoch variance (Fig. 3), and the test
sacreBLEU of the best checkpoint (beam 5). Runs are resumable: a finished run's
result.json is reused, so the benchmark can be stopped and continued.
"""

import json
import os
import statistics
import subprocess
import sys

from . import common


def _progress():
    return common.progress()

MODEL = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
    "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--dropout", "0.2",
]


def _json_lines(path):
    with open(path) as f:
        for line in f:
            i = line.find("{")
            if i >= 0 and ("| train |" in line or "| valid |" in line or "| train_inner |" in line):
                kind = "train_inner" if "train_inner" in line else ("valid" if "| valid |" in line else "train")
                try:
                    yield kind, json.loads(line[i:])
                except json.JSONDecodeError:
                    pass


def parse_log(log):
    """Per-epoch wall-clock, gnorm statistics and valid BLEU, and every update's gnorm.
    fairseq logs an epoch's validation before its training summary."""
    rows, gnorms, bleu = {}, [], {}
    for kind, rec in _json_lines(log):
        if kind == "train_inner" and "gnorm" in rec:
            gnorms.append(float(rec["gnorm"]))
        elif kind == "train":
            rows[int(rec["epoch"])] = {"epoch": int(rec["epoch"]), "wall": float(rec["train_wall"]),
                                       "gnorm": float(rec.get("train_gnorm", "nan")),
                                       "gnorm_var": float(rec.get("train_gnorm_var", "nan"))}
        elif kind == "valid":
            bleu[int(rec["epoch"])] = float(rec.get("valid_bleu", "nan"))
    for e, r in rows.items():
        if e in bleu:
            r["valid_bleu"] = bleu[e]
    return [rows[e] for e in sorted(rows)], gnorms


def run_one(data_bin: str, work: str, method: str, seed: int, epochs: int, tc: int, pairs: int) -> dict:
    save = os.path.join(work, "quality", f"p{pairs}-e{epochs}-tc{tc}", f"{method}-s{seed}")
    result_path = os.path.join(save, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(save, exist_ok=True)
    log = os.path.join(save, "train.log")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    train = ["fairseq-train", data_bin, "--user-dir", common.USER_DIR, "--task", "arch_translation",
             "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
             "--adv-method", method, "--arch-refresh-interval", str(tc), *MODEL,
             "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", "100", "--max-tokens", "2048", "--max-epoch", str(epochs), "--seed", str(seed),
             "--eval-bleu", "--eval-bleu-args", '{"beam": 1}', "--eval-bleu-detok", "space",
             "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
             "--save-dir", save, "--no-epoch-checkpoints", "--cpu", "--num-workers", "0",
             "--log-format", "json", "--log-interval", "1", "--no-progress-bar"]
    # fairseq's output -> train.log; one line per epoch (kind, losses, seconds, time left) as it ends
    print(f"quality {method} seed {seed}: fairseq-train, {epochs} epochs -> {log}", flush=True)
    rc = _progress().run(train, log, env=env, what=f"fairseq-train ({method}, seed {seed})")
    if rc != 0:
        raise subprocess.CalledProcessError(rc, train)
    gen = subprocess.run(_progress().console_cmd(
        ["fairseq-generate", data_bin, "--user-dir", common.USER_DIR, "--task", "arch_translation",
         "--path", os.path.join(save, "checkpoint_best.pt"), "--gen-subset", "test", "--beam", "5",
         "--batch-size", "128", "--required-batch-size-multiple", "1", "--cpu"]),
        capture_output=True, text=True, env=env, check=True)
    hyps = {}
    for line in gen.stdout.splitlines():
        if line.startswith("D-"):
            head, _, text = (line.split("\t") + ["", ""])[:3]
            hyps[int(head[2:])] = text
    with open(os.path.join(common.MULTI30K, "test_2016_flickr.lc.norm.tok.en")) as f:
        refs = [l.rstrip("\n") for l in f]
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU(force=True)
    test_bleu = bleu.corpus_score([hyps[i] for i in range(len(refs))], [refs]).score
    epochs_rows, gnorms = parse_log(log)
    result = {"method": method, "seed": seed, "epochs": epochs, "tc": tc, "pairs": pairs, "test_sacrebleu": test_bleu,
              "signature": str(bleu.get_signature()), "wall_s": epochs_rows[-1]["wall"] if epochs_rows else None,
              "per_epoch": epochs_rows, "gnorm_per_update": gnorms}
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


def summarize(results, pairs):
    by = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    lines = [f"### Quality at equal epochs (Multi30k De-En, {pairs} training pairs -> test_2016_flickr, "
             f"word level, words seen < 3 times -> <unk>; 2+2-layer transformer d=128; {results[0]['epochs']} epochs, "
             f"ARCH Tc={results[0]['tc']}; beam 5)", "",
             "| method | seeds | test sacreBLEU mean | std | min / max | wall-clock / run | mean per-epoch var(gnorm) |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for m, rs in by.items():
        b = [r["test_sacrebleu"] for r in rs]
        var = [e["gnorm_var"] for r in rs for e in r["per_epoch"] if e.get("gnorm_var") == e.get("gnorm_var")]
        summary[m] = {"mean": statistics.mean(b), "std": statistics.pstdev(b), "n": len(b),
                      "wall": statistics.mean(r["wall_s"] for r in rs), "gnorm_var": statistics.mean(var) if var else float("nan")}
        s = summary[m]
        lines.append(f"| {m} | {s['n']} | {s['mean']:.2f} | {s['std']:.2f} | {min(b):.2f} / {max(b):.2f} | "
                     f"{s['wall'] / 60:.1f} min | {s['gnorm_var']:.4f} |")
    if "arch" in summary and "none" in summary:
        d = summary["arch"]["mean"] - summary["none"]["mean"]
        lines += ["", f"Goal: ARCH >= none + 0.5 sacreBLEU: measured {d:+.2f} "
                  f"({'met' if d >= 0.5 else 'NOT met'}; seeds: {summary['arch']['n']}, spread (std) "
                  f"arch {summary['arch']['std']:.2f}, none {summary['none']['std']:.2f})."]
    lines.append(f"sacreBLEU signature: {results[0]['signature']} (tokenised, lowercased references: the Multi30k tok/ files)")
    return "\n".join(lines), summary


def _finished(work, pairs, epochs, tc):
    """Every finished run of this configuration (also from earlier invocations)."""
    root = os.path.join(work, "quality", f"p{pairs}-e{epochs}-tc{tc}")
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            log = os.path.join(root, name, "train.log")
            if os.path.exists(log):  # re-read: reports follow the parser, not an old result file
                r["per_epoch"], r["gnorm_per_update"] = parse_log(log)
            out.append(r)
    order = {"none": 0, "r3f": 1, "smart": 2, "freelb": 3, "arch": 4}
    return sorted(out, key=lambda r: (order.get(r["method"], 9), r["seed"]))


def main(args):
    pairs = args.train_pairs or 29000
    data = common.multi30k_bin(args.work, pairs, threshold=3)  # rare words -> <unk>: a smaller softmax
    runs = [(seed, method) for seed in [int(s) for s in args.seeds.split(",")]
            for method in args.methods.split(",")]  # seed-major: every method gets each seed early
    # runs left are priced by the mean of the finished runs of the same method (smart costs more than none)
    steps = _progress().Steps("quality run", len(runs), kinds=[m for _, m in runs])
    for seed, method in runs:
        reused = os.path.exists(os.path.join(args.work, "quality", f"p{pairs}-e{args.epochs}-tc{args.tc}",
                                             f"{method}-s{seed}", "result.json"))
        r = run_one(data, args.work, method, seed, args.epochs, args.tc, pairs)
        detail = f"{method} seed {seed}: test sacreBLEU {r['test_sacrebleu']:.2f}, {r['wall_s']:.0f} s training"
        if reused:
            steps.skip()
            print(f"quality run {steps.i}/{steps.total}: {detail} (finished earlier)", flush=True)
        else:
            steps.done(detail)
            # the report is rewritten after every run: a stopped benchmark still reports
            results = _finished(args.work, pairs, args.epochs, args.tc)
            md, summary = summarize(results, pairs)
            common.write_report(args.out, "quality", {"runs": results, "summary": summary}, md)
