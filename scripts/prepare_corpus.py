#!/usr/bin/env python3
"""Lay out a parallel corpus for fairseq-preprocess, optionally with a joint
sentencepiece vocabulary.

Input (``--corpus DIR``), one of:
  * fairseq's raw layout: ``train.SRC train.TGT valid.SRC valid.TGT test.SRC test.TGT``
    (one tokenised sentence per line);
  * the Multi30k release's ``tok/`` layout: ``train.lc.norm.tok.SRC``,
    ``val.lc.norm.tok.SRC``, ``test_2016_flickr.lc.norm.tok.SRC`` (and .TGT);
  * nothing: a synthetic toy corpus is generated (scripts/toy_corpus.py).
Output (``OUT``): ``{train,valid,test}.{SRC,TGT}`` (sentencepiece pieces when
``--spm-vocab > 0``), ``ref.test.TGT`` (the untouched reference), ``spm.model``.
Fails with a message on a missing file or on sides with different line counts.
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {
    "fairseq": {"train": "train.{l}", "valid": "valid.{l}", "test": "test.{l}"},
    "multi30k": {"train": "train.lc.norm.tok.{l}", "valid": "val.lc.norm.tok.{l}",
                 "test": "test_2016_flickr.lc.norm.tok.{l}"},
}


def detect_layout(corpus: str, src: str, tgt: str) -> dict:
    for name, layout in LAYOUTS.items():
        paths = {(split, l): os.path.join(corpus, pat.format(l=l)) for split, pat in layout.items() for l in (src, tgt)}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths
    want = "; ".join(f"{n}: " + ", ".join(p.format(l=src) for p in lay.values()) + " (and the ." + tgt + " files)"
                     for n, lay in LAYOUTS.items())
    sys.exit(f"prepare_corpus: {corpus} has neither layout for {src}-{tgt}. Expected {want}")


def read_lines(path: str, limit: int = 0):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f]
    return lines[:limit] if limit else lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--corpus", default="", help="corpus dir (empty: generate the toy corpus)")
    ap.add_argument("--src", default="src")
    ap.add_argument("--tgt", default="tgt")
    ap.add_argument("--spm-vocab", type=int, default=0, help="joint sentencepiece vocabulary size (0: none)")
    ap.add_argument("--max-train", type=int, default=0, help="keep only the first N training pairs (0: all)")
    ap.add_argument("--max-eval", type=int, default=0, help="keep only the first N valid/test pairs (0: all)")
    ap.add_argument("--toy-train", type=int, default=6000)
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    if not a.corpus:
        import toy_corpus

        toy_corpus.write_corpus(a.out + "/.toy", a.toy_train, 300, 300, seed=1)
        src_dir, a.src, a.tgt = a.out + "/.toy", "src", "tgt"
        paths = {(s, l): os.path.join(src_dir, f"{s}.{l}") for s in ("train", "valid", "test") for l in ("src", "tgt")}
        print(f"prepare_corpus: no corpus given, generated the synthetic toy corpus ({a.toy_train} training pairs)")
    else:
        paths = detect_layout(a.corpus, a.src, a.tgt)
        print(f"prepare_corpus: using {a.corpus}")

    data = {}
    for split in ("train", "valid", "test"):
        limit = a.max_train if split == "train" else a.max_eval
        s, t = read_lines(paths[(split, a.src)], limit), read_lines(paths[(split, a.tgt)], limit)
        if len(s) != len(t) or not s:
            sys.exit(f"prepare_corpus: {split} has {len(s)} {a.src} and {len(t)} {a.tgt} lines (truncated file?)")
        data[split] = (s, t)

    with open(os.path.join(a.out, f"ref.test.{a.tgt}"), "w", encoding="utf-8") as f:
        f.write("\n".join(data["test"][1]) + "\n")

    encode = None
    if a.spm_vocab > 0:
        import sentencepiece as spm

        joint = os.path.join(a.out, "spm_train.txt")
        with open(joint, "w", encoding="utf-8") as f:
            f.write("\n".join(data["train"][0] + data["train"][1]) + "\n")
        spm.SentencePieceTrainer.train(
            input=joint, model_prefix=os.path.join(a.out, "spm"), vocab_size=a.spm_vocab,
            character_coverage=1.0, model_type="unigram", bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
            minloglevel=2, hard_vocab_limit=False,
        )
        os.remove(joint)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(a.out, "spm.model"))
        encode = lambda lines: [" ".join(sp.encode(l, out_type=str)) for l in lines]  # noqa: E731

    for split, (s, t) in data.items():
        for lang, lines in ((a.src, s), (a.tgt, t)):
            lines = encode(lines) if encode else lines
            tmp = os.path.join(a.out, f"{split}.{lang}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, os.path.join(a.out, f"{split}.{lang}"))
    shutil.rmtree(a.out + "/.toy", ignore_errors=True)
    print(f"prepare_corpus: wrote {a.out} ({len(data['train'][0])} train, {len(data['valid'][0])} valid, "
          f"{len(data['test'][0])} test pairs, {a.src}->{a.tgt})")


if __name__ == "__main__":
    main()
