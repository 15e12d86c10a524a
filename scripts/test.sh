#!/usr/bin/env bash
# The test suite on a fresh machine: install into the project's environment (scripts/env.sh:
# .venv/ unless a venv/conda env is active; idempotent), then pytest inside it.
# About 7 minutes on 2 CPU cores, plus about 1 minute for the first install.
# Extra arguments go to pytest (e.g. -k cache, -m fast).
set -euo pipefail
source "$(dirname "$0")/env.sh"
arch_use_env
cd "$ARCH_REPO"
export PYTHONWARNINGS="ignore"
# -rs: every skip with its reason in the summary (CI sets ARCH_REQUIRE_DATA=1: missing data fails)
exec python -m pytest -q -rs -p no:cacheprovider tests "$@"
