#!/usr/bin/env python3
"""Evaluate a trained recipe: fairseq-generate on the test set with the paper's Table 7 beam size and
length penalty, on the best checkpoint (chosen by validation BLEU with the same decoding), then BLEU
against the prepared data's own text:

  BLEU (tokenised)   the hypotheses (sentencepiece decoded = Moses-tokenised text) against
                     DATA/text/test.TGT, the tokenised reference as prepared: whitespace tokens, no
                     smoothing (multi-bleu.perl / fairseq-score). The metric of the paper's Tables 2-3.
  compound-split     WMT'16 only: the same after Ott et al. (2018)'s compound splitting
                     (fairseq's scripts/compound_split_bleu.sh), the usual reading of Table 3.
  sacreBLEU          the hypotheses Moses-detokenised against DATA/ref/test.TGT (the untokenised
                     release text), with its signature.
  fairseq BLEU4      fairseq-generate's own line, for comparison only: its reference is rebuilt from the
                     binarised data (sentencepiece's normalisation, <<unk>> for unknown pieces).

    python scripts/recipes/evaluate.py DATASET [--direction SRC-TGT] [--adv-method M] [--seed N] [--data DIR]
        [--save-dir DIR | --path CHECKPOINT] [--gen-subset test|valid] [--results-path DIR]
        [-- EXTRA generate ARGS]

Defaults follow scripts/recipes/train.py (data/DATASET, checkpoints/DATASET-DIRECTION-METHOD-seedN).
No --max-len-a/b: fairseq's default length limit (200 pieces, --max-len-b 200), as fairseq's
examples/translation and the official scripts; --max-len-a 1.2 --max-len-b 10 would cut 22 of the 6750
IWSLT'14 De-En test references (docs/recipes.md). Hypotheses that reach the limit are counted and reported. IWSLT'14 is lowercased by its recipe (as fairseq's prepare-iwslt14.sh): its
sacreBLEU is case-insensitive (signature case:lc). Scores also go to RESULTS_PATH/scores.json.
Flags keep fairseq's names: --save-dir (train's checkpoint dir), --path, --gen-subset, --results-path,
--batch-size (fairseq-generate's), --adv-method, --seed. Old spellings, still accepted but deprecated (a note
is printed): --method (--adv-method), --checkpoint-dir (--save-dir), --subset (--gen-subset), --out
(--results-path).
"""

import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from train import DECODING, USER_DIR, add_flag, count_gpus, default_save_dir, recipe_cli, recipe_target  # noqa: E402



def score_log(text, data, subset, tgt, manifest, out, max_len=200):
    """Scores of a fairseq-generate log (its D- lines: sentencepiece decoded, i.e. tokenised text) against
    the prepared data: tokenised BLEU vs DATA/text/SUBSET.TGT (+ compound-split for the ott2018 WMT'16 data),
    sacreBLEU of the detokenised hypotheses vs DATA/ref/test.TGT; prints them, writes the hypotheses to OUT."""
    import sacrebleu
    from sacremoses import MosesDetokenizer

    from score import hypotheses_from_lines, tokenized_bleu

    lines = text.splitlines()
    hyps = hypotheses_from_lines(lines)
    # a hypothesis that stopped at fairseq's length limit has max_len + 1 positional scores (EOS forced)
    capped = sum(len(l.split("\t")[1].split()) > max_len for l in lines if l.startswith("P-"))
    if capped:
        print(f"evaluate: WARNING: {capped} hypotheses stopped at the length limit ({max_len} pieces)")
    tok_ref_path = os.path.join(data, "text", f"{subset}.{tgt}")
    tok_refs = [l.rstrip("\n") for l in open(tok_ref_path, encoding="utf-8")]
    if sorted(hyps) != list(range(len(tok_refs))):
        raise ValueError(f"{len(hyps)} hypotheses for {len(tok_refs)} references in {tok_ref_path}")
    ordered = [hyps[i] for i in range(len(tok_refs))]
    scores = {"n": len(ordered), "at_length_limit": capped}
    tok = tokenized_bleu(ordered, tok_refs)
    scores["bleu"] = round(tok.score, 2)
    print(f"BLEU (tokenised, vs {tok_ref_path}; the metric of Tables 2-3) {tok.score:.2f}  ({tok})")
    if manifest.get("style") == "ott2018":
        cs = tokenized_bleu(ordered, tok_refs, compound=True)
        scores["bleu_compound_split"] = round(cs.score, 2)
        print(f"BLEU (tokenised, compound-split as Ott et al. 2018; Table 3) {cs.score:.2f}  ({cs})")
    if subset == "test":
        ref_path = os.path.join(data, "ref", f"test.{tgt}")
        refs = [l.rstrip("\n") for l in open(ref_path, encoding="utf-8")]
    else:  # no untokenised valid references are kept: detokenise the tokenised ones
        ref_path = tok_ref_path
        md0 = MosesDetokenizer(lang=tgt)
        refs = [md0.detokenize(l.split()) for l in tok_refs]
    md = MosesDetokenizer(lang=tgt)
    detok = [md.detokenize(h.split()) for h in ordered]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"hyp.detok.{tgt}"), "w", encoding="utf-8") as f:
        f.write("\n".join(detok) + "\n")
    with open(os.path.join(out, f"hyp.tok.{tgt}"), "w", encoding="utf-8") as f:
        f.write("\n".join(ordered) + "\n")
    bleu = sacrebleu.metrics.BLEU(lowercase=bool(manifest.get("lowercase")))
    score = bleu.corpus_score(detok, [refs])
    scores.update(sacrebleu=round(score.score, 2), signature=str(bleu.get_signature()))
    print(f"sacreBLEU (detokenised, vs {ref_path}) {score.score:.2f}  ({score})")
    print(f"signature: {bleu.get_signature()}")
    m = re.search(r"^.*BLEU4 = .*$", text, re.M)
    if m:
        scores["fairseq_bleu4"] = m.group(0).split("|")[-1].strip()
        print(f"fairseq-generate's BLEU4 (reference rebuilt from bin/; for comparison only): {scores['fairseq_bleu4']}")
    return scores


def main(argv=None):
    ap, argv, extra = recipe_cli(__doc__, argv)
    ap.add_argument("--direction", help="SRC-TGT (default: the first of the dataset's directions)")
    add_flag(ap, "--adv-method", "--method", dest="method", default="arch", metavar="M",
             help="the method trained, only used for the default --save-dir (default arch)")
    ap.add_argument("--seed", type=int, default=1, help="only used for the default --save-dir (default 1)")
    ap.add_argument("--data", help="prepared dir (default data/DATASET, data/DATASET-smoke with --smoke)")
    add_flag(ap, "--save-dir", "--checkpoint-dir", dest="checkpoint_dir", metavar="DIR",
             help="the training run's checkpoint dir, train's --save-dir (default "
                  "checkpoints/DATASET-DIRECTION-METHOD-seedN[-smoke])")
    ap.add_argument("--path", help="checkpoint file (default: SAVE_DIR/checkpoint_best.pt)")
    add_flag(ap, "--gen-subset", "--subset", dest="subset", default="test", choices=["test", "valid"],
             help="split to translate and score (default test)")
    ap.add_argument("--batch-size", type=int, default=128, help="fairseq-generate's sentences per batch (default 128)")
    add_flag(ap, "--results-path", "--out", dest="out", metavar="DIR",
             help="where hypotheses, the generate log and scores.json go (default "
                  "DIR_OF_PATH/eval-SUBSET)")
    ap.add_argument("--smoke", action="store_true", help="a --smoke run's data and checkpoints")
    ap.add_argument("--print-args", action="store_true", help="print the fairseq-generate command and exit")
    a = ap.parse_args(argv)
    e, smoke, direction = recipe_target(ap, a)
    src, tgt = direction.split("-")
    data = a.data or os.path.join("data", a.dataset + ("-smoke" if smoke else ""))
    ckpt_dir = a.checkpoint_dir or default_save_dir(a.dataset, direction, a.method, a.seed, smoke)
    path = a.path or os.path.join(ckpt_dir, "checkpoint_best.pt")
    out = a.out or os.path.join(os.path.dirname(path), f"eval-{a.subset}")
    beam, lenpen = DECODING[(a.dataset, direction)]
    gpus = count_gpus()
    cmd = ["fairseq-generate", os.path.join(data, "bin"), "--user-dir", USER_DIR, "--task", "arch_translation",
           "--source-lang", src, "--target-lang", tgt, "--path", path, "--gen-subset", a.subset,
           "--beam", str(beam), "--lenpen", str(lenpen), "--batch-size", str(a.batch_size),
           "--required-batch-size-multiple", "1", "--post-process", "sentencepiece"]
    cmd += ["--cpu"] if gpus == 0 else ["--fp16"]
    cmd += extra
    if a.print_args:
        print(f"evaluate: results (generate.log, hypotheses, scores.json) would go to {out}", file=sys.stderr)
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
    from progress import console_cmd

    with open(log, "w") as f:
        res = subprocess.run(console_cmd(cmd), stdout=f, stderr=subprocess.STDOUT, env=env)
    text = open(log, encoding="utf-8").read()
    if res.returncode != 0:
        print(text[-3000:], file=sys.stderr)
        print(f"evaluate: fairseq-generate failed (log {log})", file=sys.stderr)
        return 1
    scores = {"dataset": a.dataset, "direction": direction, "subset": a.subset, "beam": beam, "lenpen": lenpen,
              "checkpoint": os.path.abspath(path), "data": os.path.abspath(data)}
    max_len = int(next((extra[i + 1] for i, x in enumerate(extra[:-1]) if x == "--max-len-b"), 200))
    try:
        scores.update(score_log(text, data, a.subset, tgt, manifest, out, max_len))
    except ValueError as ex:
        print(f"evaluate: {ex} (log {log})", file=sys.stderr)
        return 1
    recipe = os.path.join(os.path.dirname(os.path.abspath(path)), "recipe.json")
    if os.path.exists(recipe):
        scores["recipe"] = json.load(open(recipe))
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
