#!/usr/bin/env bash
# Prepare IWSLT'14 De-En / En-De for the ARCH recipes (docs/recipes.md): raw release -> Moses tokenisation
# (sacremoses) -> cleaning -> joint sentencepiece -> fairseq-preprocess --joined-dictionary.
#
#   bash scripts/prepare-iwslt14.sh [OUT] [--raw PATH ...] [--test-sets S,...] [--smoke] [--force]
#
# Sets: as fairseq's prepare-iwslt14.sh (valid: every 23rd training line; test: dev2010, TEDX.dev2012,
# tst2010-2012). The sizes are printed beside the paper's Table 4.
#
# OUT defaults to data/iwslt14 (data/iwslt14-smoke with --smoke). --raw: the release archive(s), files or a
# directory holding them; without it the public sources are downloaded (needs network). The
# files expected are listed below. OUT is written atomically (OUT/COMPLETE marks a finished dir);
# a missing or truncated input exits non-zero with a message and leaves no OUT.
# --smoke (or ARCH_SMOKE=1): the first 300 training pairs, a few dozen valid/test pairs (CI).
set -euo pipefail
source "$(dirname "$0")/recipes/wrapper.sh"
run_recipe "$0" prepare.py iwslt14 -- "$@"
