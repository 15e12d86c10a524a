#!/usr/bin/env bash
# Train and evaluate one row of the paper's Tables 2-3 with several seeds (default 1,2,3) and report
# the mean and standard deviation of the test BLEU (docs/recipes.md).
#
#   bash scripts/train-seeds.sh DATASET [--direction DIR] [--adv-method M] [--seeds 1,2,3] [--data DIR]
#        [--smoke] [--report-only] [--print-args] [-- EXTRA fairseq-train ARGS]
#
# --adv-method M as in train-*.sh (arch, none, r3f, smart, freelb, rdrop; the old --method still works,
# deprecated). Each seed trains in its own save dir (checkpoints/DATASET-DIR-METHOD-seedN) and is evaluated
# with the Table 7 decoding; a rerun resumes unfinished seeds. Summary: checkpoints/DATASET-DIR-METHOD-seeds.json.
set -euo pipefail
source "$(dirname "$0")/recipes/wrapper.sh"
[[ $# -eq 0 ]] && set -- --help
run_recipe "$0" seeds.py -- "$@"
