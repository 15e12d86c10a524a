#!/usr/bin/env python3
"""sacreBLEU of a fairseq-generate log against a reference file.

Takes the ``D-<id>`` lines (hypotheses after --post-process), orders them by
sentence id, and prints the corpus BLEU with sacreBLEU's signature. Fails if the
log does not hold one hypothesis per reference line.

    python scripts/score.py generate.log ref.test.en [--hyp-out hyp.txt] [--tokenized [--compound-split]]

--tokenized: BLEU of the whitespace tokens as they are (multi-bleu.perl / fairseq-score, no smoothing),
for tokenised references such as a prepared data dir's text/test.*: the metric of the paper's Tables 2-3.
--compound-split: Ott et al. (2018)'s compound splitting ("Café-Liebhaber" -> "Café ##AT##-##AT##
Liebhaber" on both sides, fairseq's scripts/compound_split_bleu.sh) before that BLEU (WMT'16, Table 3).
"""

import argparse
import re
import sys

import sacrebleu

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    r"""fairseq's scripts/compound_split_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def tokenized_bleu(hyps, refs, compound=False):
    """Corpus BLEU of pre-tokenised text, split on whitespace only, without smoothing (what
    multi-bleu.perl and fairseq-score compute); with ``compound`` after compound_split."""
    if compound:
        hyps, refs = [compound_split(h) for h in hyps], [compound_split(r) for r in refs]
    bleu = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(list(hyps), [list(refs)])


def hypotheses_from_lines(lines):
    """{sentence id: text} of the ``D-`` lines of a fairseq-generate log."""
    hyps = {}
    for line in lines:
        if line.startswith("D-"):
            head, _score, text = (line.rstrip("\n").split("\t") + ["", ""])[:3]
            hyps[int(head[2:])] = text
    return hyps


def hypotheses(log_path: str):
    with open(log_path, encoding="utf-8") as f:
        return hypotheses_from_lines(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("ref")
    ap.add_argument("--hyp-out", default="")
    ap.add_argument("--tokenized", action="store_true", help="BLEU of whitespace tokens (tokenised references)")
    ap.add_argument("--compound-split", action="store_true", help="with --tokenized: Ott et al. 2018's compound split")
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
    if a.tokenized:
        res = tokenized_bleu(ordered, refs, compound=a.compound_split)
        print(f"BLEU (tokenised{', compound-split' if a.compound_split else ''}) {res.score:.2f}  ({res})")
        return
    # the demo corpora are tokenised text; sacreBLEU then scores tokenised text (said in the README)
    bleu = sacrebleu.metrics.BLEU(force=True)
    res = bleu.corpus_score(ordered, [refs])
    print(f"sacreBLEU {res.score:.2f}  ({res})")
    print(f"signature: {bleu.get_signature()}")


if __name__ == "__main__":
    main()
