#!/usr/bin/env python3
"""Write a small synthetic parallel corpus (no network, no download, stdlib only).

The "source language" is a tiny grammar (determiner, adjectives, noun, verb, object,
optional prepositional phrase); the "target language" translates every word with a
fixed lexicon, puts adjectives after their noun and the verb at the end of the
clause. It is learnable by a small transformer in minutes, so the README's main
command gives a meaningful BLEU on a fresh machine. Output: fairseq's raw layout
``{train,valid,test}.{src,tgt}`` (one tokenised sentence per line).

    python scripts/toy_corpus.py OUT_DIR --train 6000 --valid 300 --test 300 --seed 1
"""

import argparse
import os
import random

DETS = ["der", "die", "das", "ein", "eine", "kein", "jeder", "dieser"]
ADJS = ["alte", "junge", "kleine", "grosse", "rote", "blaue", "schnelle", "ruhige", "helle",
        "dunkle", "gruene", "frohe", "muede", "kluge", "starke", "leise"]
NOUNS = ["mann", "frau", "kind", "hund", "katze", "vogel", "baum", "haus", "auto", "ball",
         "fluss", "berg", "stadt", "garten", "tisch", "buch", "lehrer", "arzt", "koch", "boot",
         "strand", "wald", "zug", "markt"]
VERBS = ["sieht", "hat", "mag", "findet", "baut", "malt", "holt", "sucht", "traegt", "kauft",
         "wirft", "liest"]
PREPS = ["in", "an", "auf", "neben", "hinter", "vor", "bei", "unter"]


def lexicon(rng: random.Random):
    """Fixed word-by-word translation to made-up target words."""
    vocab = DETS + ADJS + NOUNS + VERBS + PREPS
    syll = ["ka", "lo", "mi", "te", "su", "ra", "no", "ve", "pi", "do", "ze", "bu", "fa", "gi"]
    out, used = {}, set()
    for w in vocab:
        while True:
            t = "".join(rng.choice(syll) for _ in range(rng.randint(2, 3)))
            if t not in used:
                used.add(t)
                out[w] = t
                break
    return out


def noun_phrase(rng):
    adjs = rng.sample(ADJS, rng.choice([0, 0, 1, 1, 2]))
    return [rng.choice(DETS)] + adjs + [rng.choice(NOUNS)], len(adjs)


def sentence_pair(rng, lex):
    subj, na = noun_phrase(rng)
    obj, nb = noun_phrase(rng)
    verb = rng.choice(VERBS)
    src = subj + [verb] + obj
    # target: det noun adjs ... object ... verb
    tgt = [subj[0], subj[-1]] + subj[1:1 + na] + [obj[0], obj[-1]] + obj[1:1 + nb]
    if rng.random() < 0.4:
        prep = rng.choice(PREPS)
        pp, npp = noun_phrase(rng)
        src += [prep] + pp
        tgt += [prep, pp[0], pp[-1]] + pp[1:1 + npp]
    tgt += [verb]
    src += ["."]
    tgt += ["."]
    return " ".join(src), " ".join(lex.get(w, w) for w in tgt)


def write_corpus(out_dir: str, n_train: int, n_valid: int, n_test: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    lex = lexicon(random.Random(12345))  # the "language" is fixed; only sampling varies
    os.makedirs(out_dir, exist_ok=True)
    seen = set()
    splits = [("train", n_train), ("valid", n_valid), ("test", n_test)]
    for split, n in splits:
        src_lines, tgt_lines = [], []
        while len(src_lines) < n:
            s, t = sentence_pair(rng, lex)
            if s in seen:  # keep valid/test disjoint from train
                continue
            seen.add(s)
            src_lines.append(s)
            tgt_lines.append(t)
        for ext, lines in (("src", src_lines), ("tgt", tgt_lines)):
            with open(os.path.join(out_dir, f"{split}.{ext}"), "w") as f:
                f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--valid", type=int, default=300)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    write_corpus(a.out_dir, a.train, a.valid, a.test, a.seed)
    print(f"wrote toy corpus to {a.out_dir}: {a.train}/{a.valid}/{a.test} pairs")


if __name__ == "__main__":
    main()
