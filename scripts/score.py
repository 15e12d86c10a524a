#!/usr/bin/env python3
"""sacreBLEU of a fairseq-generate log against a reference file.

Takes the ``D-<id>`` lines (hypotheses after --post-process), orders them by
sentence id, and prints the corpus BLEU with sacreBLEU's signature. Fails if the
log does not hold one hypothesis per reference line.

    python scripts/score.py generate.log ref.test.en [--hyp-out hyp.txt]
"""

import argparse
import sys

import sacrebleu


def hypotheses(log_path: str):
    hyps = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("D-"):
                head, _score, text = (line.rstrip("\n").split("\t") + ["", ""])[:3]
                hyps[int(head[2:])] = text
    return hyps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("ref")
    ap.add_argument("--hyp-out", default="")
    a = ap.parse_args()
    with open(a.ref, encoding="utf-8") as f:
        refs = [l.rstrip("\n") for l in f]
    hyps = hypotheses(a.log)
    if sorted(hyps) != list(range(len(refs))):
        sys.exit(f"score: {len(hyps)} hypotheses in {a.log} for {len(refs)} references")
    ordered = [hyps[i] for i in range(len(refs))]
    if a.hyp_out:
        with open(a.hyp_out, "w", encoding="utf-8") as f:
            f.write("\n".join(ordered) + "\n")
    # the demo corpora are tokenised text; sacreBLEU then scores tokenised text (said in the README)
    bleu = sacrebleu.metrics.BLEU(force=True)
    res = bleu.corpus_score(ordered, [refs])
    print(f"sacreBLEU {res.score:.2f}  ({res})")
    print(f"signature: {bleu.get_signature()}")


if __name__ == "__main__":
    main()
