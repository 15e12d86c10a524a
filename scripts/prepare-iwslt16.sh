#!/usr/bin/env bash
# Prepare IWSLT'16 En-Fr / Fr-En for the ARCH recipes (docs/recipes.md): raw release -> Moses tokenisation
# (sacremoses) -> cleaning -> joint sentencepiece -> fairseq-preprocess --joined-dictionary.
#
#   bash scripts/prepare-iwslt16.sh [OUT] [--raw PATH ...] [--valid-sets S,...] [--test-sets S,...] [--smoke] [--force]
#
# Sets: valid tst2013, test tst2014 (--valid-sets / --test-sets pick others); Table 4's 1080 / 1133
# pairs match no set of the release (docs/recipes.md). The sizes are printed beside Table 4, with a
# WARNING when they differ.
#
# OUT defaults to data/iwslt16 (data/iwslt16-smoke with --smoke). --raw: the release archive(s), files or a
# directory holding them; without it the public sources are downloaded (needs network). The
# files expected are listed below. OUT is written atomically (OUT/COMPLETE marks a finished dir);
# a missing or truncated input exits non-zero with a message and leaves no OUT.
# --smoke (or ARCH_SMOKE=1): the first 300 training pairs, a few dozen valid/test pairs (CI).
set -euo pipefail
source "$(dirname "$0")/recipes/wrapper.sh"
run_recipe "$0" prepare.py iwslt16 -- "$@"
