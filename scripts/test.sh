#!/usr/bin/env bash
# The test suite on a fresh machine: install (idempotent), then pytest.
# About 5 minutes on 2 CPU cores. Extra arguments go to pytest (e.g. -k cache).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore
bash scripts/install.sh
export PYTHONWARNINGS="ignore"
exec python3 -m pytest -q -p no:cacheprovider tests "$@"
