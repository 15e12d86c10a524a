"""Quality benchmark v2: Multi30k De-En (real data) -> test_2016_flickr, a small transformer
trained into its overfitting regime, every method for the same epochs on the same batches.

One run = one (variant, seed): a real fairseq-train (best checkpoint chosen by validation BLEU,
greedy, on the first ``--valid-sentences`` sentences of Multi30k val) then fairseq-generate
(beam 5) on test_2016_flickr and sacreBLEU. A variant is a name and a list of flags
(:data:`VARIANTS`, or ``--variant NAME='flags'``). Runs with the same seed share the
initialisation and the batch order, so differences between variants are paired by seed.

Resumable at two levels: a finished run is a small JSON under ``<out>/<suite>/`` (``--suite``: quality_v2, quality_v3)
(committed with the results: the benchmark reuses it even when the scratch ``--work`` folder is
gone); an interrupted run continues from its ``checkpoint_last.pt`` (and its ARCH cache) in
``--work``. The report (``quality.md|json``) is rewritten after every run.
"""

import hashlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess

from . import common, goals_v3, lenpen_choice, quality_jobs, quality_plots, significance, weight_choice

MODEL = [
    "--arch", "transformer", "--share-all-embeddings",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
    "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]
MODEL_TEXT = "transformer 2+2 layers, d=128, ffn 256, 4 heads, shared embeddings"
# --quality-model: name -> (flags, the text a run's configuration records); v2's text is the one
# its runs were keyed by, so it must not change
MODELS = {
    "v2": (MODEL, MODEL_TEXT),
    # twice the width and four times the ffn: more capacity to memorise a small corpus, so that
    # validation BLEU has an overfitting regime (v3's calibration)
    "wide": (MODEL[:MODEL.index("--encoder-embed-dim")] + [
        "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
        "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
        "transformer 2+2 layers, d=256, ffn 1024, 4 heads, shared embeddings"),
}
MODEL_FLAGS = {text: flags for flags, text in MODELS.values()}

# R-Drop's IWSLT'14 De-En setting (Liang et al. 2021, their fairseq example): alpha = 5; not tuned here
RDROP_ALPHA = 5.0

# placeholder for the same seed's `none` run's checkpoint_best.pt (a scratch path: the flags and
# the result JSON keep the placeholder, the run gets the path)
NONE_BEST = "{none_best}"

# name -> flags; "{tc}" is replaced by --tc. "arch" is the plugin's defaults at the time it runs.
VARIANTS = {
    "none": ["--adv-method", "none"],
    "arch": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}"],
    "arch-paper": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}", "--arch-rebuild-norm", "paper"],
    # rebuilt sentences rescaled to their neighbours' cached size (the probe's choice): the candidate
    # default, so it gets every seed too
    "arch-neighbor": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}", "--arch-rebuild-norm", "neighbor"],
    # issue 10's "better neighbours" (c): searched again at the start of every reuse epoch
    "arch-nsearch": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}", "--arch-neighbor-search", "epoch"],
    # issue 10's later first refresh: epochs 1-4 plain CE, refreshes at 5, 5 + Tc, ...
    "arch-first5": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}", "--arch-first-refresh-epoch", "5"],
    # issue 10's "better neighbours" (b): W from a trained model, as the paper's Sec. 3.3 (its code
    # searches once with a trained checkpoint): the best checkpoint of the same seed's `none` run
    # ("{none_best}", resolved when the run starts); that baseline's training is not in its cost
    "arch-pretrained": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}",
                        "--arch-neighbor-embeddings", NONE_BEST],
    # every sentence cached (Algorithm 1, no neighbours, 10x the cache): the probe at epoch 30 finds
    # Eq. 3's rebuilt rows at the random floor, the cached rows at 0.3 x fresh; is the rebuild what
    # limits BLEU?
    "arch-p1": ["--adv-method", "arch", "--arch-refresh-interval", "{tc}", "--arch-cache-fraction", "1"],
    "r3f": ["--adv-method", "r3f"],
    "smart": ["--adv-method", "smart"],
    "rdrop": ["--adv-method", "rdrop", "--adv-lambda", str(RDROP_ALPHA)],
    # issue 19's controls and hybrid (v3)
    "zero-delta": ["--adv-method", "zero-delta", "--adv-kl", "symmetric"],
    # the official code's computation (--arch-recipe code: its eps 0.3, S 2, inner step 1e-4,
    # symmetric KL, refreshes in epochs 1, Tc, 2Tc)
    "arch-code": ["--adv-method", "arch", "--arch-recipe", "code", "--arch-cache-dtype", "float32",
                  "--arch-refresh-interval", "{tc}"],
    "arch-rdrop": ["--adv-method", "arch-rdrop", "--arch-refresh-interval", "{tc}", "--adv-lambda", str(RDROP_ALPHA)],
}
# issue 19's weight grid, chosen on validation BLEU with 2 seeds per point: {1, 2.5, 5} for
# arch (lambda; 1 is `arch`), rdrop and arch-rdrop (alpha; 5 is `rdrop`, `arch-rdrop`)
WEIGHT_GRID = (1.0, 2.5, 5.0)
for _base, _default in (("arch", 1.0), ("rdrop", RDROP_ALPHA), ("arch-rdrop", RDROP_ALPHA)):
    for _w in WEIGHT_GRID:
        if _w != _default:
            VARIANTS[f"{_base}-w{_w:g}"] = [f for f in VARIANTS[_base] if f not in ("--adv-lambda", str(RDROP_ALPHA))] \
                + ["--adv-lambda", str(_w)]
GOAL_ARCH = "arch"  # the variant the goals are about
# the results folder under --out (and the scratch folder under --work): one per benchmark
# version, so that a new version never overwrites the runs another one reports
SUITE = "quality_v2"
# hypotheses at most 1.2 x source + 10 tokens (fairseq's WMT examples; default 200): bounds the
# decoding time of a model that has not learnt to stop yet (first epochs, the test's tiny runs)
MAX_LEN = (1.2, 10)
VALID_GEN = {"beam": 1, "max_len_a": MAX_LEN[0], "max_len_b": MAX_LEN[1]}  # valid BLEU: greedy


def _progress():
    return common.progress()


# -- data -------------------------------------------------------------------------------

def data_bin(work: str, pairs: int, n_valid: int, n_test: int = 1000, threshold: int = 3) -> str:
    """common.multi30k_bin (first ``pairs`` training pairs, joined dictionary from them, rare
    words -> <unk>), with valid = the first ``n_valid`` sentences of Multi30k val and test = the
    first ``n_test`` of test_2016_flickr (all 1000 by default), binarised with that dictionary:
    validation BLEU after every epoch is the expensive part of a small run."""
    base = common.multi30k_bin(work, pairs, n_eval=1000, threshold=threshold)
    out = base.rstrip("/") + f"-valid{n_valid}-test{n_test}"
    if os.path.exists(os.path.join(out, "test.de-en.en.idx")):
        return out
    raw = os.path.join(os.path.dirname(base), f"raw-valid{n_valid}-test{n_test}")
    os.makedirs(raw, exist_ok=True)
    for split, src, n in (("valid", "val", n_valid), ("test", "test_2016_flickr", n_test)):
        for lang in ("de", "en"):
            with open(os.path.join(common.MULTI30K, f"{src}.lc.norm.tok.{lang}")) as f:
                lines = [l for _, l in zip(range(n), f)]
            with open(os.path.join(raw, f"{split}.{lang}"), "w") as f:
                f.writelines(lines)
    tmp = out + ".tmp"
    if os.path.isdir(tmp):
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
    subprocess.run(_progress().console_cmd(
        ["fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--validpref", f"{raw}/valid", "--testpref", f"{raw}/test",
         "--srcdict", f"{base}/dict.de.txt", "--tgtdict", f"{base}/dict.en.txt", "--destdir", tmp,
         "--workers", "1"]), check=True, capture_output=True)
    for name in os.listdir(base):
        if name.startswith("train."):
            os.symlink(os.path.abspath(os.path.join(base, name)), os.path.join(tmp, name))
    os.replace(tmp, out)
    return out


# -- configuration ----------------------------------------------------------------------

def config_of(args) -> dict:
    """Everything a run's result depends on besides its variant and seed."""
    tc = getattr(args, "quality_tc", None)
    tc = max(1, round(args.epochs / 3)) if tc is None else tc
    return {"pairs": args.train_pairs, "valid_sentences": args.valid_sentences,
            "test_sentences": getattr(args, "test_sentences", 1000), "epochs": args.epochs,
            "tc": tc, "dropout": args.dropout, "lr": args.lr, "warmup": args.warmup,
            "max_tokens": args.max_tokens, "model": MODELS[getattr(args, "quality_model", "v2")][1], "threshold": 3}


def variant_flags(name: str, cfg: dict, extra: dict) -> list:
    if name in extra:
        flags = extra[name]
    elif name in VARIANTS:
        flags = VARIANTS[name]
    else:
        raise SystemExit(f"quality: unknown variant {name!r} (known: {', '.join(VARIANTS)}; "
                         f"or define it with --variant {name}='--adv-method ...')")
    return [f.replace("{tc}", str(cfg["tc"])) for f in flags]


def save_dir(work: str, name: str, seed: int, cfg: dict, flags: list) -> str:
    """A run's scratch folder, keyed by configuration and flags: an interrupted run resumes only
    into the same run."""
    return os.path.join(work, SUITE, config_key(cfg), f"{name}-s{seed}-{config_key({'flags': flags})}")


def resolve_flags(flags: list, work: str, seed: int, cfg: dict) -> list:
    """The flags a run trains with: NONE_BEST -> the same seed's `none` run's best checkpoint,
    which must exist (run `none` for that seed first: the plan puts it first when both are
    multi-seed methods)."""
    if NONE_BEST not in flags:
        return list(flags)
    ckpt = os.path.join(save_dir(work, "none", seed, cfg, VARIANTS["none"]), "checkpoint_best.pt")
    if not os.path.isfile(ckpt):
        raise SystemExit(f"quality: {NONE_BEST} needs the none run of seed {seed} ({ckpt} does not exist): "
                         f"run --methods none --seeds {seed} with the same configuration and --work first")
    return [ckpt if f == NONE_BEST else f for f in flags]


def adv_method(flags) -> str:
    m = "arch"  # the criterion's default
    for i, f in enumerate(flags[:-1]):
        if f == "--adv-method":
            m = flags[i + 1]
    return m


def train_cmd(data: str, save: str, flags, seed: int, cfg: dict, patience: int = 0, device_flags=("--cpu",)) -> list:
    return ["fairseq-train", data, "--user-dir", common.USER_DIR, "--task", "arch_translation",
            "--criterion", "adversarial_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            *MODEL_FLAGS[cfg["model"]], "--dropout", str(cfg["dropout"]),
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(cfg["lr"]),
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(cfg["warmup"]),
            "--max-tokens", str(cfg["max_tokens"]), "--max-epoch", str(cfg["epochs"]), "--seed", str(seed),
            "--eval-bleu", "--eval-bleu-args", json.dumps(VALID_GEN), "--eval-bleu-detok", "space",
            "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
            *(["--patience", str(patience)] if patience else []),
            "--save-dir", save, "--no-epoch-checkpoints", *device_flags, "--num-workers", "0",
            "--log-format", "json", "--log-interval", "10", "--no-progress-bar", *flags]


def config_key(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


# -- logs -------------------------------------------------------------------------------

def _json_lines(path):
    with open(path, errors="replace") as f:
        for line in f:
            i = line.find("{")
            if i < 0:
                continue
            kind = "valid" if "| valid |" in line else ("train" if "| train |" in line else None)
            if kind:
                try:
                    yield kind, json.loads(line[i:])
                except json.JSONDecodeError:
                    pass


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def parse_log(log: str) -> list:
    """One row per epoch: valid BLEU / loss, train loss, cumulative train seconds, updates, the
    criterion's per-epoch counters. A resumed run's log repeats nothing it finished (fairseq starts
    after the last saved epoch); if it does, the later line wins."""
    rows = {}
    for kind, rec in _json_lines(log):
        e = int(rec["epoch"])
        r = rows.setdefault(e, {"epoch": e})
        if kind == "valid":
            r["valid_bleu"] = _num(rec.get("valid_bleu"))
            r["valid_loss"] = _num(rec.get("valid_loss"))
        else:
            for key, name in (("train_loss", "train_loss"), ("train_wall", "train_wall"),
                              ("train_num_updates", "updates"), ("train_adv_fwd_per_batch", "fwd_per_batch"),
                              ("train_gnorm", "gnorm"), ("train_gnorm_var", "gnorm_var"),
                              ("train_arch_fresh", "arch_fresh")):
                if key in rec:
                    r[name] = _num(rec[key])
    return [rows[e] for e in sorted(rows) if "updates" in rows[e]]


# -- cost-derived wall-clock --------------------------------------------------------------

def load_cost(out: str):
    path = os.path.join(out, "cost.json")
    if not os.path.exists(path):
        path = os.path.join(common.REPO, "benchmarks", "results", "cost.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cost_row(method: str, fwd_per_batch) -> str:
    """The cost.json row an epoch of ``method`` is priced at. ARCH epochs by what they did
    (logged forwards per batch): a refresh (> 2), a reuse epoch (2), or plain CE before the
    first refresh epoch (1)."""
    if method not in ("arch", "arch-rdrop"):
        return method
    if fwd_per_batch is None or fwd_per_batch > 2.5:
        return f"{method}-refresh"
    return f"{method}-reuse" if fwd_per_batch > 1.5 else "none"


# Rows that a cost.json from before they were measured (2026-11-26) lacks, priced from measured
# rows with the same passes; the report says which rows were priced this way: zero-delta is
# r3f's step without the seeded noise (an upper bound); arch-rdrop's reuse epochs are R-Drop's
# step plus the cache read (under 1% of a step on CPU: cost.json's own-work column), its
# refresh epochs R-Drop's step plus ARCH's ascent (arch-refresh - arch-reuse)
PRICED_AS = {"zero-delta": (("r3f", 1),), "arch-rdrop-reuse": (("rdrop", 1),),
             "arch-rdrop-refresh": (("rdrop", 1), ("arch-refresh", 1), ("arch-reuse", -1))}


def row_seconds(rows: dict, name: str):
    """Seconds per update of cost.json row ``name``, else of its pricing (PRICED_AS); None
    when a row it needs is missing."""
    parts = ((name, 1),) if name in rows else PRICED_AS.get(name, ((name, 1),))
    if any(p not in rows for p, _ in parts):
        return None
    return sum(k * rows[p]["seconds"] for p, k in parts)


def priced_rows(cost) -> list:
    """The PRICED_AS rows this cost.json lacks (priced, not measured)."""
    rows = cost["methods"] if cost else {}
    return [name for name in PRICED_AS if name not in rows]


def derived_seconds(method: str, per_epoch: list, cost) -> list:
    """Cumulative seconds after each epoch: the epoch's updates x cost.json's s/update of the
    row it is priced at; None from the first epoch whose row cost.json lacks."""
    if not cost:
        return [None] * len(per_epoch)
    rows, out, total, prev = cost["methods"], [], 0.0, 0
    for e in per_epoch:
        n = (e.get("updates") or 0) - prev
        prev = e.get("updates") or prev
        sec = row_seconds(rows, cost_row(method, e.get("fwd_per_batch")))
        if sec is None or total is None:
            total = None
        else:
            total += n * sec
        out.append(total)
    return out


# -- statistics ---------------------------------------------------------------------------

# two-sided 95%: t_{0.975, df} for df = 1..30 (standard tables)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion around the normal quantile (error < 1e-3 there)."""
    if df < 1:
        raise ValueError("t quantile needs df >= 1")
    if df <= 30:
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired(a: dict, b: dict) -> dict:
    """a - b over the seeds both have ({seed: value}): mean, sample std, n, 95% t interval
    (None when n < 2)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return {"n": 0, "seeds": [], "diffs": [], "mean": None, "sd": None, "ci": None}
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"n": 1, "seeds": seeds, "diffs": d, "mean": mean, "sd": None, "ci": None}
    sd = statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return {"n": len(d), "seeds": seeds, "diffs": d, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


# -- one run ------------------------------------------------------------------------------

def run_one(data: str, work: str, out: str, name: str, flags: list, seed: int, cfg: dict,
            where: quality_jobs.Placement = quality_jobs.Placement()) -> dict:
    """Train + test one (variant, seed) on ``where``; the result JSON in <out>/<SUITE> is the record."""
    save = save_dir(work, name, seed, cfg, flags)
    train = train_cmd(data, save, resolve_flags(flags, work, seed, cfg), seed, cfg, device_flags=where.flags)
    os.makedirs(save, exist_ok=True)
    log = os.path.join(save, "train.log")
    env = where.env(os.environ)
    resumed = os.path.exists(os.path.join(save, "checkpoint_last.pt"))
    print(f"quality {name} seed {seed}: fairseq-train, {cfg['epochs']} epochs"
          + (" (continuing from checkpoint_last.pt)" if resumed else "") + f" -> {log}", flush=True)
    # a resumed run appends: the log keeps every epoch, fairseq starts after the last saved one
    rc = _progress().run(train, log, env=env, append=resumed, what=f"fairseq-train ({name}, seed {seed})")
    if rc != 0:
        raise subprocess.CalledProcessError(rc, train)
    ckpt = os.path.join(save, "checkpoint_best.pt")
    bleu = _scorer()
    # the length penalty this run's validation prefers (reported beside lenpen 1)
    valid_refs = references("val", cfg["valid_sentences"])
    valid_bleu = {lp: bleu.corpus_score(decode(data, ckpt, "valid", lp, env, len(valid_refs), where.flags), [valid_refs]).score
                  for lp in lenpen_choice.LENPENS}
    chosen = lenpen_choice.choose(valid_bleu)
    refs = references("test_2016_flickr", cfg["test_sentences"])
    test = {lp: decode(data, ckpt, "test", lp, env, len(refs), where.flags) for lp in sorted({1.0, chosen})}
    score = bleu.corpus_score(test[1.0], [refs])
    chosen_score = bleu.corpus_score(test[chosen], [refs])
    os.makedirs(os.path.join(out, SUITE), exist_ok=True)
    with open(run_path(out, name, seed)[:-len(".json")] + ".test.hyp", "w") as f:  # for sacreBLEU --paired-bs
        f.writelines(h + "\n" for h in test[1.0])
    per_epoch = parse_log(log)
    valid = [(e["valid_bleu"], e["epoch"]) for e in per_epoch if e.get("valid_bleu") is not None]
    best = max(valid, key=lambda x: (x[0], -x[1])) if valid else (None, None)
    result = {"variant": name, "method": adv_method(flags), "seed": seed, "flags": flags, "config": cfg,
              "test_sacrebleu": score.score, "test_sacrebleu_text": str(score), "signature": str(bleu.get_signature()),
              "test_bp": score.bp, "test_ratio": score.ratio, "device": where.name(), "machine": common.machine(),
              "valid_bleu_by_lenpen": {str(lp): v for lp, v in valid_bleu.items()}, "lenpen_chosen": chosen,
              "test_sacrebleu_lenpen": chosen_score.score, "test_sacrebleu_lenpen_text": str(chosen_score),
              "best_valid_bleu": best[0], "best_epoch": best[1], "epochs_run": per_epoch[-1]["epoch"] if per_epoch else 0,
              "updates": per_epoch[-1]["updates"] if per_epoch else 0,
              "train_seconds_measured": per_epoch[-1].get("train_wall") if per_epoch else None,
              "per_epoch": per_epoch}
    write_run(out, result)
    return result


def fill_lenpens(args, plan, cfg, extra, where) -> None:
    """Decodes validation at the lenpens a finished run lacks (``lenpen_choice.LENPENS`` grew
    after it ran) from its checkpoint_best.pt under --work, and rewrites its JSON; a run
    whose checkpoint is gone is named and kept as it is."""
    data = data_bin(args.work, cfg["pairs"], cfg["valid_sentences"], cfg["test_sentences"])
    bleu, env = _scorer(), where.env(os.environ)
    for name, seed in plan:
        flags = variant_flags(name, cfg, extra)
        r = load_run(args.out, name, seed, cfg, flags)
        if not r or not lenpen_choice.missing(r):
            continue
        ckpt = os.path.join(save_dir(args.work, name, seed, cfg, flags), "checkpoint_best.pt")
        if not os.path.exists(ckpt):
            print(f"quality {name} seed {seed}: no {ckpt}: lenpens {lenpen_choice.missing(r)} not decoded", flush=True)
            continue

        def score(subset, split, n, lp):
            refs = references(split, n)
            return bleu.corpus_score(decode(data, ckpt, subset, lp, env, len(refs), where.flags), [refs])

        lenpen_choice.fill(r, lambda lp: score("valid", "val", cfg["valid_sentences"], lp).score,
                           lambda lp: score("test", "test_2016_flickr", cfg["test_sentences"], lp))
        write_run(args.out, r)
        print(f"quality {name} seed {seed}: valid BLEU by lenpen {r['valid_bleu_by_lenpen']}, chosen "
              f"{r['lenpen_chosen']}: test {r['test_sacrebleu_lenpen']:.2f}", flush=True)


def _scorer():
    import sacrebleu

    return sacrebleu.metrics.BLEU(force=True)


def references(split: str, n: int) -> list:
    with open(os.path.join(common.MULTI30K, f"{split}.lc.norm.tok.en")) as f:
        return [line.rstrip("\n") for _, line in zip(range(n), f)]


def decode(data: str, ckpt: str, subset: str, lenpen: float, env, n: int, device_flags=("--cpu",)) -> list:
    """fairseq-generate's hypotheses of the ``n`` sentences of ``subset``, in order (beam 5)."""
    gen = subprocess.run(_progress().console_cmd(
        ["fairseq-generate", data, "--user-dir", common.USER_DIR, "--task", "arch_translation",
         "--path", ckpt, "--gen-subset", subset, "--beam", "5", "--lenpen", str(lenpen),
         "--max-len-a", str(MAX_LEN[0]), "--max-len-b", str(MAX_LEN[1]),
         "--batch-size", "128", "--required-batch-size-multiple", "1", *device_flags]),
        capture_output=True, text=True, env=env, check=True)
    hyps = {}
    for line in gen.stdout.splitlines():
        if line.startswith("D-"):
            head, _, text = (line.split("\t") + ["", ""])[:3]
            hyps[int(head[2:])] = text
    return [hyps.get(i, "") for i in range(n)]


def run_path(out: str, name: str, seed: int, suite: str = None) -> str:
    return os.path.join(out, suite or SUITE, f"{name}-s{seed}.json")


def write_run(out: str, result: dict) -> None:
    path = run_path(out, result["variant"], result["seed"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=0, separators=(",", ":"))
    os.replace(path + ".tmp", path)


def load_run(out: str, name: str, seed: int, cfg: dict, flags: list):
    """The finished run's JSON when it is this configuration (flags included), else None."""
    path = run_path(out, name, seed)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        r = json.load(f)
    if r.get("config") != cfg or r.get("flags") != flags:
        print(f"quality: {path} is another configuration ({r.get('config')}, {r.get('flags')}): rerun", flush=True)
        return None
    return r


# -- report -------------------------------------------------------------------------------

def _f(x, nd=2, sign=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _diff_text(p: dict) -> str:
    if p["n"] == 0:
        return "no paired seeds yet"
    if p["ci"] is None:
        return f"{p['mean']:+.2f} (n=1, seed {p['seeds'][0]}: no confidence interval)"
    return (f"{p['mean']:+.2f}, 95% CI [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] "
            f"(t, n={p['n']}, seeds {','.join(map(str, p['seeds']))}; per seed {', '.join(f'{d:+.2f}' for d in p['diffs'])})")


def _bp_ratio(run: dict):
    """(BP, hyp/ref length ratio) of a run's test BLEU: recorded, or read from sacreBLEU's line."""
    if "test_bp" in run:
        return run["test_bp"], run["test_ratio"]
    m = re.search(r"BP = ([0-9.]+) ratio = ([0-9.]+)", run.get("test_sacrebleu_text", ""))
    return (float(m.group(1)), float(m.group(2))) if m else None


def length_columns(runs: dict) -> dict:
    """BP and length ratio of the test BLEU (mean over seeds), and the BLEU at each run's
    validation-chosen length penalty; 'n/a' for runs recorded before they were kept."""
    rs = [runs[s] for s in sorted(runs)]
    out = {"bp_ratio_text": "n/a", "lenpen_text": "n/a"}
    bp_ratio = [_bp_ratio(r) for r in rs]
    if all(x is not None for x in bp_ratio):
        out["bp"], out["ratio"] = (statistics.mean(x[i] for x in bp_ratio) for i in (0, 1))
        out["bp_ratio_text"] = f"{out['bp']:.3f} / {out['ratio']:.3f}"
    if all("test_sacrebleu_lenpen" in r for r in rs):
        out["lenpen_mean"] = statistics.mean(r["test_sacrebleu_lenpen"] for r in rs)
        edge = any(lenpen_choice.on_edge(r["lenpen_chosen"], lenpen_choice.known(r)) for r in rs)
        out["lenpen_text"] = (f"{out['lenpen_mean']:.2f} ({', '.join('%g' % r['lenpen_chosen'] for r in rs)}"
                              + ("; on the grid's edge" if edge else "") + ")")
    return out


def summarize(results: list, plan: list, cfg: dict, cost, calibration=None):
    """Markdown + JSON summary of the finished runs (``results``) of the ``plan`` [(variant, seed)]."""
    order = []
    for name, _ in plan:
        if name not in order:
            order.append(name)
    for r in results:
        if r["variant"] not in order:
            order.append(r["variant"])
    by = {v: {r["seed"]: r for r in results if r["variant"] == v} for v in order}
    test = {v: {s: r["test_sacrebleu"] for s, r in rs.items()} for v, rs in by.items()}

    lines = header_lines(cfg) + ([calibration_text(calibration), ""] if calibration else [])
    lines += ["| variant | flags | seeds | test sacreBLEU mean | std | per seed | BP / length ratio (mean) "
              "| at each run's valid-chosen lenpen: mean (lenpens) | best valid BLEU (mean) | best epoch per seed "
              "| cost-derived wall-clock / run | measured training s / run (shared CPU, not comparable) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for v in order:
        if by[v]:
            summary[v], row = variant_summary(v, by[v], cost)
            lines.append(row)
    lines += cost_notes(summary, cost) + overfitting_lines(results)
    paired_text, diffs = paired_lines(order, test)
    goal_text, goals = issue10_goal_lines(diffs, summary)
    lines += paired_text + goal_text

    done = {(r["variant"], r["seed"]) for r in results}
    missing = [f"{v}-s{s}" for v, s in plan if (v, s) not in done]
    lines += ["", "Missing runs: " + (", ".join(missing) if missing else "none (every planned run finished)") + "."]
    if results:
        lines.append(f"sacreBLEU signature: {results[0]['signature']} (tokenised, lowercased references: the Multi30k "
                     f"tok/ files)")
    return "\n".join(lines), {"summary": summary, "paired": diffs, "goals": goals, "missing": missing}


def header_lines(cfg: dict) -> list:
    return [f"### Quality at equal epochs {SUITE.rpartition('_')[2]} (Multi30k De-En, first {cfg['pairs']} training pairs, words seen < 3 "
            f"times -> <unk>; {cfg.get('model', MODEL_TEXT)}, dropout {cfg['dropout']}; Adam lr {cfg['lr']}, inverse_sqrt, warmup "
            f"{cfg['warmup']}, max-tokens {cfg['max_tokens']}; {cfg['epochs']} epochs for every method, same batches "
            f"per seed; ARCH Tc={cfg['tc']})", "",
            f"Best checkpoint = best validation BLEU (greedy, fairseq --eval-bleu, first {cfg['valid_sentences']} "
            f"sentences of Multi30k val); test = test_2016_flickr ({cfg['test_sentences']} sentences), beam 5, "
            f"sacreBLEU; hypotheses at most {MAX_LEN[0]} x source + {MAX_LEN[1]} tokens. Each run is also scored at "
            f"the length penalty its own validation BLEU prefers among {', '.join('%g' % lp for lp in lenpen_choice.LENPENS)} "
            "(beam 5; runs decoded before the grid had 0 and 0.3 say so in their JSON's valid_bleu_by_lenpen).", ""]


def variant_summary(v: str, rs: dict, cost) -> tuple:
    """(the summary of variant ``v``'s finished runs {seed: run}, its table row)."""
    b = [rs[s]["test_sacrebleu"] for s in sorted(rs)]
    derived = [derived_seconds(r["method"], r["per_epoch"], cost)[-1] if r["per_epoch"] else None for r in rs.values()]
    derived = None if any(d is None for d in derived) else statistics.mean(derived)
    measured = [r["train_seconds_measured"] for r in rs.values() if r.get("train_seconds_measured") is not None]
    s = {"n": len(b), "seeds": sorted(rs), "mean": statistics.mean(b), "std": statistics.stdev(b) if len(b) > 1 else None,
         "best_valid_bleu": statistics.mean(r["best_valid_bleu"] for r in rs.values()),
         "best_epoch": {s_: rs[s_]["best_epoch"] for s_ in sorted(rs)},
         "derived_seconds": derived, "measured_seconds": statistics.mean(measured) if measured else None,
         "flags": next(iter(rs.values()))["flags"]}
    s.update(length_columns(rs))
    row = (f"| {v} | `{' '.join(s['flags'])}` | {s['n']} | {s['mean']:.2f} | {_f(s['std'])} | "
           f"{', '.join('%.2f' % rs[x]['test_sacrebleu'] for x in sorted(rs))} | {s['bp_ratio_text']} | "
           f"{s['lenpen_text']} | {s['best_valid_bleu']:.2f} | "
           f"{', '.join(f's{x}: {e}' for x, e in s['best_epoch'].items())} | "
           f"{'n/a (no cost.json row)' if derived is None else f'{derived / 60:.1f} min'} | "
           f"{_f(s['measured_seconds'], 0)} |")
    return s, row


def cost_notes(summary: dict, cost) -> list:
    lines = ["", "Cost-derived wall-clock: every epoch's updates x the s/update that benchmarks/results/cost.json measured "
             "for the method (its date and machine are in that file), in interleaved rounds, so that every method saw "
             "the same load (ARCH epochs priced as refresh or reuse updates by the forwards per batch they logged). "
             "cost.json times a 3+3-layer d=128 model on 3000 pairs: absolute minutes are for that model and that "
             "load, the ratios between methods are what carries over. The measured training seconds "
             "come from a machine shared with other jobs and are not comparable between runs.", ""]
    unmeasured = {n.rpartition("-")[0] if n.endswith(("-refresh", "-reuse")) else n for n in priced_rows(cost)}
    estimated = [v for v in summary if adv_method(summary[v]["flags"]) in unmeasured]
    if estimated:
        lines += [f"{', '.join(estimated)}: cost.json has no row of their own; priced from measured rows with the same "
                  "passes, not measured: zero-delta as r3f (its step without the seeded noise), arch-rdrop's reuse "
                  "epochs as rdrop (plus a cache read, under 1% of a step on CPU), its refresh epochs as rdrop + "
                  "arch-refresh - arch-reuse (R-Drop's step plus ARCH's ascent).", ""]
    pretrained = [v for v in summary if NONE_BEST in summary[v]["flags"]]
    if pretrained:
        lines += [f"{', '.join(pretrained)}: `{NONE_BEST}` = the best checkpoint of the same seed's `none` run (its "
                  "embeddings give the neighbours, as the paper's pre-trained W); that run's training is not in the "
                  "variant's wall-clock (add none's).", ""]
    return lines


def paired_lines(order: list, test: dict) -> tuple:
    """Every variant minus none, and the goal variant minus every other: (lines, {"a - b": paired})."""
    pairs_ = [(v, "none") for v in order if v != "none"]
    pairs_ += [(GOAL_ARCH, v) for v in order if v not in ("none", GOAL_ARCH)]
    diffs = {}
    lines = ["Paired differences of test sacreBLEU (same seed = same initialisation and batch order; mean of the "
             "per-seed differences, 95% CI from the t distribution with n-1 degrees of freedom; n=1: no CI):", ""]
    for a, b in pairs_:
        p = paired(test.get(a, {}), test.get(b, {}))
        diffs[f"{a} - {b}"] = p
        lines.append(f"- {a} - {b}: {_diff_text(p)}")
    return lines + [""], diffs


def issue10_goal_lines(diffs: dict, summary: dict) -> tuple:
    """Issue 10's goals for ``arch`` (the v2 table): (lines, goals)."""
    lines, goals = [], []

    def goal(text, value, ok, note=""):
        goals.append({"goal": text, "measured": value, "met": ok})
        state = "not measured" if ok is None else ("met" if ok else "NOT met")
        lines.append(f"| {text} | {value} | {state}{note} |")

    if SUITE != "quality_v2":  # v2's report stays as published; later suites add issue 19's goals below
        lines += ["Issue 10's goals, judged on `arch` (the plugin's defaults) as in v2:", ""]
    lines += ["| goal | measured | met |", "|---|---|---|"]
    p = diffs.get(f"{GOAL_ARCH} - none")
    if p and p["n"]:
        ok = p["mean"] >= 1.0 and p["ci"] is not None and p["ci"][0] > 0
        goal("ARCH - none >= +1.0 sacreBLEU, 95% CI above 0", _diff_text(p), ok,
             "" if p["ci"] is not None else " (n=1: no CI)")
    else:
        goal("ARCH - none >= +1.0 sacreBLEU, 95% CI above 0", "n/a", None)
    for other, thr, text in (("r3f", 0.0, "ARCH >= R3F"), ("smart", -0.3, "ARCH >= SMART - 0.3")):
        p = diffs.get(f"{GOAL_ARCH} - {other}")
        if p and p["n"]:
            # judged on the mean, as the goal is worded; say so when the interval holds the threshold
            open_ = p["ci"] is not None and p["ci"][0] < thr < p["ci"][1]
            goal(text, _diff_text(p), p["mean"] >= thr,
                 f" (on the mean; the 95% CI contains {thr:+.1f}: established neither way)" if open_ else "")
        else:
            goal(text, "n/a", None)
    p = diffs.get(f"{GOAL_ARCH} - rdrop")
    goals.append({"goal": "ARCH vs R-Drop (reported)", "measured": _diff_text(p) if p else "n/a", "met": None})
    lines.append(f"| ARCH vs R-Drop (reported, alpha {RDROP_ALPHA:g}) | {_diff_text(p) if p and p['n'] else 'n/a'} | (no goal) |")
    a, s = summary.get(GOAL_ARCH, {}).get("derived_seconds"), summary.get("smart", {}).get("derived_seconds")
    if a is not None and s is not None:
        goal("ARCH wall-clock <= 0.5 x SMART at the same epochs (cost-derived)", f"{a / s:.3f}", a / s <= 0.5)
    else:
        goal("ARCH wall-clock <= 0.5 x SMART at the same epochs (cost-derived)", "n/a", None)
    return lines, goals


def overfitting_lines(results: list, share: float = 0.75) -> list:
    """The overfitting-regime rule of issue 19, judged on the finished runs: none's best
    validation epoch at or before ``share`` of the epochs, and no run's best in its last epoch."""
    nones = [r for r in results if r["variant"] == "none"]
    if not nones:
        return []
    marks = []
    for r in nones:
        limit = int(share * r["epochs_run"])
        marks.append(f"s{r['seed']}: best epoch {r['best_epoch']} of {r['epochs_run']} "
                     f"({'met' if r['best_epoch'] <= limit else f'NOT met, after {limit}'})")
    last = [f"{r['variant']} s{r['seed']}" for r in results if r["best_epoch"] == r["epochs_run"]]
    return [f"Overfitting regime check (none's best validation epoch at or before {share:.0%} of the epochs): "
            + "; ".join(marks) + ". Runs whose best validation epoch is their last: "
            + (", ".join(last) if last else "none") + ".", ""]


def calibration_text(c: dict) -> str:
    curve = ", ".join(f"{e}: {b:.2f}" for e, b in c["valid_bleu"])
    lmin = c.get("valid_loss_min")
    return (f"Calibration ({c['what']}): none, seed 1, valid BLEU per epoch: {curve}. "
            f"Best {c['best'][1]:.2f} at epoch {c['best'][0]}"
            + (f"; valid loss lowest at epoch {lmin[0]} ({lmin[1]:.3f}), higher after" if lmin else "")
            + f". {c['decision']}")


def calibration_path(out: str, cfg: dict) -> str:
    """One calibration per configuration: calibrations of several candidate configurations
    sit side by side."""
    return os.path.join(out, SUITE, f"calibration-{config_key(cfg)}.json")


def load_calibration(out: str, cfg: dict):
    """The calibration of this configuration, else the suite's first one (calibration.json)."""
    for path in (calibration_path(out, cfg), os.path.join(out, SUITE, "calibration.json")):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return None


# -- main ---------------------------------------------------------------------------------

def plan_of(args) -> list:
    """[(variant, seed)], most informative first: the paired variants seed by seed (none s1,
    arch s1, none s2, ...), then the others with the first seed. A variant runs the seeds
    ``--seeds-for`` gives it, else every seed when it is a multi-seed variant."""
    names = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    multi = set(m for m in args.multi_seed_methods.split(",") if m)
    own = seeds_for(getattr(args, "seeds_for", None), names)
    paired = {m: own.get(m, seeds) for m in names if m in multi or m in own}
    order = sorted(set(seeds).union(*paired.values()), key=lambda s: (s not in seeds, s))
    plan = [(m, s) for s in order for m in names if s in paired.get(m, ())]
    return plan + [(m, seeds[0]) for m in names if m not in paired]


def seeds_for(specs, names) -> dict:
    """``--seeds-for VARIANT=1,2`` (repeatable) -> {variant: [1, 2]}; a variant not in
    --methods is an error, not a run silently left out."""
    out = {}
    for spec in specs or []:
        name, eq, seeds = spec.partition("=")
        name = name.strip()
        if not eq or not name or name not in names:
            raise SystemExit(f"quality: --seeds-for wants VARIANT=SEEDS with VARIANT in --methods, got {spec!r}")
        try:
            out[name] = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"quality: --seeds-for {spec!r}: seeds are integers") from None
        if not out[name]:
            raise SystemExit(f"quality: --seeds-for {spec!r} names no seed")
    return out


def extra_variants(specs) -> dict:
    out = {}
    for spec in specs or []:
        name, eq, flags = spec.partition("=")
        if not eq or not name:
            raise SystemExit(f"quality: --variant wants NAME='--flag value ...', got {spec!r}")
        out[name.strip()] = shlex.split(flags)
    return out


def report(args, plan, cfg, extra):
    results = []
    for name, seed in plan:
        r = load_run(args.out, name, seed, cfg, variant_flags(name, cfg, extra))
        if r:
            results.append(r)
    cost = load_cost(args.out)
    md, info = summarize(results, plan, cfg, cost, load_calibration(args.out, cfg))
    name = "quality" if SUITE == "quality_v2" else SUITE
    if SUITE != "quality_v2":  # v2's runs kept no test hypotheses and its report stays as published
        info["choices"] = weight_choice.choose(results)
        test = {v: {s: r["test_sacrebleu"] for s, r in runs.items()} for v, runs in _by_variant(results).items()}
        seconds = {v: row.get("derived_seconds") for v, row in info["summary"].items()}
        rdrop = info["choices"].get("rdrop alpha", {}).get("variant") or "rdrop"
        test_lenpen = {v: {s: r["test_sacrebleu_lenpen"] for s, r in runs.items() if "test_sacrebleu_lenpen" in r}
                       for v, runs in _by_variant(results).items()}
        goal_lines, info["goals_v3"] = goals_v3.lines(results, test, seconds, paired, _diff_text, rdrop, test_lenpen)
        md = "\n".join([md, ""] + weight_choice.markdown(info["choices"]) + goal_lines
                        + significance_lines(args.out, results, info, cfg)
                       + quality_plots.write(args.out, name, info, common.machine()))
    else:  # the figures benchmarks/plots.py draws from this report's JSON (quality.json), with captions
        from .captions import figure_lines

        md = "\n".join([md, ""] + figure_lines("bleu_vs_time.png") + figure_lines("gnorm.png")).rstrip("\n")
    # v2's JSON stays as published; later suites leave each run's per-epoch log in the run's own
    # JSON (suite_runs puts it back), so that the report's JSON does not grow with every epoch
    left_out = set() if SUITE == "quality_v2" else {"per_epoch"}
    common.write_report(args.out, name, {"config": cfg, "plan": [f"{v}-s{s}" for v, s in plan],
                                         "runs": [{k: v for k, v in r.items() if k not in left_out} for r in results],
                                         "cost_json": bool(cost), **info}, md)


def suite_runs(out: str, suite: str) -> list:
    """The runs of the report ``<out>/<suite>.json``, each with its per-epoch log (read from the
    run's own JSON, ``<out>/<suite>/<variant>-s<seed>.json``, where the report left it out)."""
    with open(os.path.join(out, f"{suite}.json")) as f:
        runs = json.load(f)["runs"]
    for r in runs:
        if "per_epoch" not in r:
            with open(run_path(out, r["variant"], r["seed"], suite)) as f:
                r["per_epoch"] = json.load(f)["per_epoch"]
    return runs


def _by_variant(results: list) -> dict:
    out = {}
    for r in results:
        out.setdefault(r["variant"], {})[r["seed"]] = r
    return out


def significance_lines(out: str, results: list, info: dict, cfg: dict) -> list:
    """sacreBLEU's paired bootstrap per seed for every pair the report differences (added to
    ``info`` as "paired_bs")."""
    pairs_ = [tuple(k.split(" - ")) for k in info.get("paired", {})]
    seeds = sorted({r["seed"] for r in results})
    table = significance.seed_table(os.path.join(out, SUITE), pairs_, seeds,
                                    references("test_2016_flickr", cfg["test_sentences"]))
    info["paired_bs"] = {k: {str(s): r for s, r in row.items()} for k, row in table.items()}
    return significance.markdown(table)


def calibration_record(per_epoch: list, what: str, cfg: dict) -> dict:
    curve = [(e["epoch"], e["valid_bleu"]) for e in per_epoch if e.get("valid_bleu") is not None]
    loss = [(e["epoch"], e["valid_loss"]) for e in per_epoch if e.get("valid_loss") is not None]
    best = max(curve, key=lambda x: (x[1], -x[0]))
    last = curve[-1][0]
    if best[0] < last:
        decision = (f"none's best valid BLEU is at epoch {best[0]} of {last}: no improvement in the last {last - best[0]} "
                    f"epochs; inverse_sqrt does not depend on --max-epoch, so a shorter run follows this curve to its end.")
    else:
        decision = f"none still improves at the last epoch ({last}): NOT yet overfitting, train longer or on fewer pairs."
    return {"what": what, "config": cfg, "valid_bleu": curve, "best": list(best), "epochs_run": last,
            "valid_loss": loss, "valid_loss_min": list(min(loss, key=lambda x: x[1])) if loss else None,
            "decision": decision}


def calibrate(args, cfg, data):
    """none, first seed, up to --epochs with --patience (--calibrate-patience, 0 = none): where
    validation BLEU peaks."""
    patience = getattr(args, "calibrate_patience", 8)
    seed = int(args.seeds.split(",")[0])
    save = os.path.join(args.work, SUITE, "calibration-" + config_key(cfg), f"none-s{seed}")
    os.makedirs(save, exist_ok=True)
    log = os.path.join(save, "train.log")
    resumed = os.path.exists(os.path.join(save, "checkpoint_last.pt"))
    cmd = train_cmd(data, save, ["--adv-method", "none"], seed, cfg, patience=patience)
    rc = _progress().run(cmd, log, env=dict(os.environ, PYTHONWARNINGS="ignore"), append=resumed,
                         what="fairseq-train (calibration)")
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)
    rec = calibration_record(parse_log(log), f"python -m benchmarks quality --calibrate, seed {seed}, "
                                             f"up to {cfg['epochs']} epochs"
                                             + (f", --patience {patience}" if patience else ", every epoch"), cfg)
    path = calibration_path(args.out, cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    print(calibration_text(rec), flush=True)


def main(args):
    global SUITE
    where = quality_jobs.placement_of(args)
    SUITE = quality_jobs.suite_for(getattr(args, "suite", None) or SUITE, where.device)
    cfg = config_of(args)
    extra = extra_variants(getattr(args, "variant", None))
    plan = plan_of(args)
    if getattr(args, "calibrate", False):
        return calibrate(args, cfg, data_bin(args.work, cfg["pairs"], cfg["valid_sentences"], cfg["test_sentences"]))
    for name, _ in plan:
        variant_flags(name, cfg, extra)  # unknown names fail before anything runs
    if getattr(args, "fill_lenpens", False):
        fill_lenpens(args, plan, cfg, extra, where)
    if getattr(args, "report_only", False) or getattr(args, "fill_lenpens", False):
        return report(args, plan, cfg, extra)  # from the finished runs' JSONs, nothing trained
    print(f"quality: runs on {where.name()}, {getattr(args, 'jobs', 1)} at a time, results in "
          f"{os.path.join(args.out, SUITE)}", flush=True)  # (a missing GPU is refused here, before any run)
    data = data_bin(args.work, cfg["pairs"], cfg["valid_sentences"], cfg["test_sentences"])
    steps = _progress().Steps("quality run", len(plan), kinds=[m for m, _ in plan])
    pending = []
    for name, seed in plan:
        r = load_run(args.out, name, seed, cfg, variant_flags(name, cfg, extra))
        if r:
            steps.skip()
            print(f"quality run {steps.i}/{steps.total}: {name} seed {seed}: test sacreBLEU "
                  f"{r['test_sacrebleu']:.2f} (finished earlier: {run_path(args.out, name, seed)})", flush=True)
        else:
            pending.append((name, seed))

    def start(name, seed):
        return run_one(data, args.work, args.out, name, variant_flags(name, cfg, extra), seed, cfg, where)

    def finished(name, seed, r):
        steps.done(f"{name} seed {seed}: test sacreBLEU {r['test_sacrebleu']:.2f}, best valid BLEU "
                   f"{r['best_valid_bleu']:.2f} at epoch {r['best_epoch']}")
        report(args, plan, cfg, extra)  # a stopped benchmark still reports

    def after(run):  # the pretrained-neighbour variant reads the same seed's none checkpoint
        return ("none", run[1]) if NONE_BEST in variant_flags(run[0], cfg, extra) else None

    quality_jobs.run_all(pending, getattr(args, "jobs", 1), start, finished, after)
    if not pending:
        report(args, plan, cfg, extra)  # everything reused: the report from the JSONs (and today's cost.json)
