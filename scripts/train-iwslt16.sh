#!/usr/bin/env bash
# Train IWSLT'16 En-Fr / Fr-En as in the ARCH paper (docs/recipes.md) with fairseq-train.
#
#   bash scripts/train-iwslt16.sh [--direction DIR] [--adv-method arch|none|r3f|smart|freelb|rdrop] [--seed N] [--data DIR]
#        [--save-dir DIR] [--max-tokens N] [--batch-tokens N] [--hydra] [--smoke] [--print-args]
#        [-- EXTRA fairseq-train ARGS]
#
# Directions: en-fr (default), fr-en. --adv-method: arch (default); none is the Transformer row of Tables 2-3; rdrop is R-Drop
# (--adv-lambda 5, its alpha). Flags keep fairseq-train's names (--adv-method, --seed, --save-dir, --max-tokens,
# --arch-neighbor-embeddings); the old --method still works (deprecated).
# Data: the output of scripts/prepare-iwslt16.sh (default data/iwslt16). Checkpoints: checkpoints/iwslt16-DIR-METHOD-seedN
# (--seed N, default 1; `-- --seed` is refused). Best checkpoint by validation BLEU (Table 7 decoding).
# --update-freq is computed from the GPUs found so that max-tokens x GPUs x update-freq reaches the
# paper's batch (the batch used, updates per epoch and warm-up epochs are printed); no GPU: one CPU
# device (--cpu). Rerun the same command to resume (checkpoint_last.pt and the ARCH cache in
# SAVE_DIR/arch_cache). --hydra: the same run through fairseq-hydra-train and configs/recipes/*.yaml.
# Several seeds with mean/std: scripts/train-seeds.sh. --smoke (or ARCH_SMOKE=1): tiny model, 2 epochs (CI).
set -euo pipefail
source "$(dirname "$0")/recipes/wrapper.sh"
run_recipe "$0" train.py iwslt16 -- "$@"
