#!/usr/bin/env bash
# The GPU check (README, "Multi-GPU, accumulation, mixed precision, resume"): one line per check,
# about 5 minutes on one H100/H200; exit status 1 if any check failed. On a CPU it runs the
# smoke version (tiny, fp32 only), which is what tests/test_gpu_check.py runs.
#   bash scripts/gpu-check.sh [--smoke] [--only device,search,train,resume,ddp,cost,ops,peak-chunks,refresh-wmt] [--work DIR]
# Data: Multi30k from ../shared/data (ARCH_MULTI30K=<its tok/ folder> to point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
arch_use_env
export PYTHONWARNINGS=ignore
exec python3 scripts/gpu_check.py "$@"
