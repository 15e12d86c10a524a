#!/usr/bin/env bash
# Prepare WMT'16 En-De for the ARCH recipes (docs/recipes.md): raw release -> Moses tokenisation
# (sacremoses) -> cleaning -> joint sentencepiece -> fairseq-preprocess --joined-dictionary.
#
#   bash scripts/prepare-wmt16.sh [OUT] [--raw PATH ...] [--style ott2018|wmt14] [--smoke] [--force]
#
# --style ott2018 (default): as Ott et al. 2018 / Google's wmt16_en_de archive (which --raw also takes):
# no -a, no punctuation normalisation, clean 1-80 tokens, joint 32k BPE pieces. --style wmt14: the
# earlier pipeline (fairseq's prepare-wmt14en2de.sh: normalised, -a, clean 1-250, ratio 1.5).
#
# OUT defaults to data/wmt16 (data/wmt16-smoke with --smoke). --raw: the release archive(s), files or a
# directory holding them; without it the public sources are downloaded (needs network). The
# files expected are listed below. OUT is written atomically (OUT/COMPLETE marks a finished dir);
# a missing or truncated input exits non-zero with a message and leaves no OUT.
# --smoke (or ARCH_SMOKE=1): the first 300 training pairs, a few dozen valid/test pairs (CI).
set -euo pipefail
source "$(dirname "$0")/recipes/wrapper.sh"
run_recipe "$0" prepare.py wmt16 -- "$@"
