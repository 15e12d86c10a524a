#!/usr/bin/env python3
"""Evaluate a trained recipe: fairseq-generate on the test set with the paper's Table 7 beam size and
length penalty, on the best checkpoint; prints fairseq's tokenised BLEU ("BLEU4 = ...", the paper's
metric) and detokenised sacreBLEU (sacremoses detokenizer) against the untokenised references kept by
the prepare step, with its signature.

    python scripts/recipes/evaluate.py DATASET [--direction SRC-TGT] [--data DIR]
        [--checkpoint-dir DIR | --path CHECKPOINT] [--subset test] [--out DIR] [-- EXTRA generate ARGS]

Defaults follow scripts/recipes/train.py (data/DATASET, checkpoints/DATASET-DIRECTION-METHOD).
IWSLT'14 is lowercased by its recipe (as fairseq's prepare-iwslt14.sh): its sacreBLEU is
case-insensitive (signature case:lc).
"""

import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from train import EXPERIMENTS, USER_DIR, count_gpus, recipe_cli  # noqa: E402

# Table 7: (beam, length penalty) per direction
DECODING = {
    ("iwslt15", "en-vi"): (10, 1.0), ("iwslt15", "vi-en"): (15, 0.3),
    ("iwslt14", "en-de"): (10, 1.5), ("iwslt14", "de-en"): (9, 1.5),
    ("iwslt16", "en-fr"): (10, 0.2), ("iwslt16", "fr-en"): (10, 2.0),
    ("wmt16", "en-de"): (4, 0.6),
}


def main(argv=None):
    ap, argv, extra = recipe_cli(__doc__, argv)
    ap.add_argument("--direction")
    ap.add_argument("--method", default="arch", help="only used for the default checkpoint dir")
    ap.add_argument("--data")
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--path", help="checkpoint file (default: CHECKPOINT_DIR/checkpoint_best.pt)")
    ap.add_argument("--subset", default="test", choices=["test", "valid"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", help="where hypotheses and logs go (default CHECKPOINT_DIR/eval-SUBSET)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--print-args", action="store_true", help="print the fairseq-generate command and exit")
    a = ap.parse_args(argv)
    e = EXPERIMENTS[a.dataset]
    smoke = a.smoke or os.environ.get("ARCH_SMOKE") == "1"
    direction = a.direction or e["directions"][0]
    if direction not in e["directions"]:
        ap.error(f"--direction for {a.dataset} is one of {', '.join(e['directions'])}")
    src, tgt = direction.split("-")
    suffix = "-smoke" if smoke else ""
    data = a.data or os.path.join("data", a.dataset + suffix)
    ckpt_dir = a.checkpoint_dir or os.path.join("checkpoints", f"{a.dataset}-{direction}-{a.method}{suffix}")
    path = a.path or os.path.join(ckpt_dir, "checkpoint_best.pt")
    out = a.out or os.path.join(os.path.dirname(path), f"eval-{a.subset}")
    beam, lenpen = DECODING[(a.dataset, direction)]
    gpus = count_gpus()
    cmd = ["fairseq-generate", os.path.join(data, "bin"), "--user-dir", USER_DIR, "--task", "arch_translation",
           "--source-lang", src, "--target-lang", tgt, "--path", path, "--gen-subset", a.subset,
           "--beam", str(beam), "--lenpen", str(lenpen), "--batch-size", str(a.batch_size),
           "--required-batch-size-multiple", "1", "--post-process", "sentencepiece",
           "--max-len-a", "1.2", "--max-len-b", "10"]
    cmd += ["--cpu"] if gpus == 0 else ["--fp16"]
    cmd += extra
    if a.print_args:
        print(json.dumps(cmd))
        return 0
    for p, what in ((os.path.join(data, "COMPLETE"), "prepared data dir"), (path, "checkpoint")):
        if not os.path.exists(p):
            print(f"evaluate: no {what} {p}", file=sys.stderr)
            return 2
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "generate.log")
    print(f"evaluate: {a.dataset} {direction} {a.subset}, beam {beam}, lenpen {lenpen} (Table 7), {path}", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from progress import console_cmd

    with open(log, "w") as f:
        res = subprocess.run(console_cmd(cmd), stdout=f, stderr=subprocess.STDOUT, env=env)
    text = open(log, encoding="utf-8").read()
    if res.returncode != 0:
        print(text[-3000:], file=sys.stderr)
        print(f"evaluate: fairseq-generate failed (log {log})", file=sys.stderr)
        return 1
    m = re.search(r"^.*BLEU4 = .*$", text, re.M)
    if not m:
        print(f"evaluate: no BLEU4 line in {log}", file=sys.stderr)
        return 1
    print(f"fairseq (tokenised): {m.group(0).split('|')[-1].strip()}")

    import sacrebleu
    from sacremoses import MosesDetokenizer

    from score import hypotheses

    hyps = hypotheses(log)
    if a.subset == "test":
        ref_path = os.path.join(data, "ref", f"test.{tgt}")
        refs = [l.rstrip("\n") for l in open(ref_path, encoding="utf-8")]
    else:  # no untokenised valid references are kept: detokenise the tokenised ones
        ref_path = os.path.join(data, "text", f"valid.{tgt}")
        md0 = MosesDetokenizer(lang=tgt)
        refs = [md0.detokenize(l.split()) for l in open(ref_path, encoding="utf-8")]
    if sorted(hyps) != list(range(len(refs))):
        print(f"evaluate: {len(hyps)} hypotheses in {log} for {len(refs)} references in {ref_path}", file=sys.stderr)
        return 1
    md = MosesDetokenizer(lang=tgt)
    detok = [md.detokenize(hyps[i].split()) for i in range(len(refs))]
    with open(os.path.join(out, f"hyp.detok.{tgt}"), "w", encoding="utf-8") as f:
        f.write("\n".join(detok) + "\n")
    bleu = sacrebleu.metrics.BLEU(lowercase=bool(manifest.get("lowercase")))
    score = bleu.corpus_score(detok, [refs])
    print(f"sacreBLEU (detokenised) {score.score:.2f}  ({score})")
    print(f"signature: {bleu.get_signature()}")
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump({"dataset": a.dataset, "direction": direction, "subset": a.subset, "beam": beam, "lenpen": lenpen,
                   "checkpoint": os.path.abspath(path), "fairseq": m.group(0).split("|")[-1].strip(),
                   "sacrebleu": round(score.score, 2), "signature": str(bleu.get_signature())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
