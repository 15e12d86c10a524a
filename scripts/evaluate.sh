#!/usr/bin/env bash
# Evaluate a recipe's best checkpoint on its test set (docs/recipes.md): fairseq-generate with the
# paper's Table 7 beam / length penalty; tokenised BLEU against the prepared text/test.* (the metric of
# Tables 2-3; WMT'16 also compound-split, as Ott et al. 2018), then detokenised sacreBLEU against the
# release's text with its signature.
#
#   bash scripts/evaluate.sh DATASET [--direction DIR] [--adv-method M] [--seed N] [--data DIR]
#        [--save-dir DIR | --path CKPT] [--gen-subset test|valid] [--results-path DIR] [--smoke] [-- EXTRA generate ARGS]
#
# DATASET: iwslt14 | iwslt15 | iwslt16 | wmt16. Defaults match scripts/train-DATASET.sh. Flags keep fairseq's names
# (--save-dir: the training run's checkpoint dir; --gen-subset, --results-path, --batch-size as fairseq-generate's);
# the old --method, --checkpoint-dir, --subset and --out still work (deprecated).
set -euo pipefail
source "$(dirname "$0")/recipes/wrapper.sh"
[[ $# -eq 0 ]] && set -- --help
run_recipe "$0" evaluate.py -- "$@"
