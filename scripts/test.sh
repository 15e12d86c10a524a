#!/usr/bin/env bash
# The test suite on a fresh machine: install into the project's environment (scripts/env.sh:
# .venv/ unless a venv/conda env is active; idempotent), then pytest inside it.
# About 9 minutes on 2 CPU cores (the README gives the last measured count), plus about 1 minute
# for the first install.
# Usage: bash scripts/test.sh [PYTEST ARGS]: extra arguments go to pytest (e.g. -k cache, -m fast;
# pytest's own options: .venv/bin/python -m pytest --help).
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
source "$(dirname "$0")/env.sh"
arch_use_env
cd "$ARCH_REPO"
export PYTHONWARNINGS="ignore"
# Two pytest workers (-n 2), each taking whole test files (--dist loadfile: a module's shared
# fixtures, its trained toy runs, are built once), at one thread each: most of a test's time is a
# fairseq process starting up or a tiny model training, which a second core halves, while
# OpenMP's spinning threads make two 2-thread processes on 2 cores several times slower.
# Arguments given to this script come later and win (-n 0: one process).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# -rs: every skip with its reason in the summary (CI sets ARCH_REQUIRE_DATA=1: missing data fails);
# --durations=15: the slowest tests, so that a CI run near its 20-minute limit says where the time went
exec python -m pytest -q -rs --durations=15 -p no:cacheprovider -n 2 --dist loadfile tests "$@"
