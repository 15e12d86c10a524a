#!/usr/bin/env bash
# The mechanism probe on both recipes (issue 19): the quality v3 configuration (Multi30k, 3000
# pairs, the v2 model, seed 1), 12 epochs, Tc 4, `--adv-probe-sentences 256`, once with
# `--arch-recipe text` and once with `--arch-recipe code`. Each epoch start logs the mean sentence
# norm and the KL of what that recipe trains on (fresh ascent, cached rows, rebuilt rows, random
# directions of equal norm). The probe lines go to benchmarks/results/probe_recipes/<recipe>.log.
# About 8 minutes per recipe at one thread on an idle core.
#   Usage: bash scripts/probe-recipes.sh [WORK]   (WORK: scratch, default /tmp/arch-bench)
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "$0")/.."
source scripts/env.sh
arch_use_env
WORK=${1:-/tmp/arch-bench}
DATA=$(python -c "from benchmarks import quality; print(quality.data_bin('$WORK', 3000, 500))")
OUT=benchmarks/results/probe_recipes
mkdir -p "$OUT"
for recipe in text code; do
  extra=(); [[ $recipe == code ]] && extra=(--arch-cache-dtype float32)
  save="$WORK/probe-recipes/$recipe"
  rm -rf "$save"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-train "$DATA" --user-dir fairseq_arch --task arch_translation \
    --criterion adversarial_label_smoothed_cross_entropy --label-smoothing 0.1 --arch transformer --share-all-embeddings \
    --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 \
    --decoder-ffn-embed-dim 256 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1 --optimizer adam \
    --adam-betas '(0.9, 0.98)' --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 300 --max-tokens 4096 \
    --max-epoch 12 --seed 1 --save-dir "$save" --no-save --cpu --num-workers 0 --log-format simple \
    --log-interval 100 --adv-method arch --arch-recipe $recipe "${extra[@]}" --arch-refresh-interval 4 \
    --adv-probe-sentences 256 2>&1 | grep -E "ARCH probe|ARCH epoch" > "$OUT/$recipe.log"
  echo "probe_recipes: $recipe -> $OUT/$recipe.log"
done
