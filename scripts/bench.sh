#!/usr/bin/env bash
# Benchmarks that measure the paper's claims on this code (README, "Benchmarks").
#   bash scripts/bench.sh cost       # per-update cost of every method, ~5 min on 2 cores
#   bash scripts/bench.sh cost-spread --suite quality_v3  # the cost goals over every cost run kept
#   bash scripts/bench.sh scale      # cache build + neighbour search, Tatoeba and 10^6 sentences
#   bash scripts/bench.sh quality    # Multi30k sacreBLEU, methods x seeds (long: see README); two runs at a
#                                      time on 2 cores want OMP_NUM_THREADS=1 (else 5-8x slower)
#   bash scripts/bench.sh plots      # PNGs from the JSON results
# Options after the sub-command go to `python -m benchmarks` (--help lists them).
# Results: benchmarks/results/{cost,scale,quality}.{md,json} and *.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
arch_use_env
export PYTHONWARNINGS=ignore
exec python3 -m benchmarks "$@"
