#!/usr/bin/env bash
# Evaluate a recipe's best checkpoint on its test set (docs/recipes.md): fairseq-generate with the
# paper's Table 7 beam / length penalty, fairseq's tokenised BLEU, then detokenised sacreBLEU with
# its signature.
#
#   bash scripts/evaluate.sh DATASET [--direction DIR] [--method M] [--data DIR]
#        [--checkpoint-dir DIR | --path CKPT] [--subset test|valid] [--smoke] [-- EXTRA generate ARGS]
#
# DATASET: iwslt14 | iwslt15 | iwslt16 | wmt16. Defaults match scripts/train-DATASET.sh.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [[ $# -eq 0 || " $* " == *" -h "* || " $* " == *" --help "* ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    python3 "$REPO/scripts/recipes/evaluate.py" --help | sed -n '/^options/,$p'
    exit 0
fi
export PYTHONWARNINGS=ignore
exec python3 "$REPO/scripts/recipes/evaluate.py" "$@"
