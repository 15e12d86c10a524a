#!/usr/bin/env bash
# Install fairseq-arch and its dependencies into the current Python (idempotent,
# a few seconds when everything is there). Order matters:
#   1. torch: keep an installed torch; otherwise the CPU wheel torch==2.13.0
#      (an unpinned torch would pull a multi-GB CUDA build).
#   2. fairseq: ve-fairseq==0.12.3 with --no-deps (its torchaudio requirement
#      would replace torch); its real runtime deps come with step 3.
#   3. this package, editable, with the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[install] no torch found: installing the CPU wheel torch==2.13.0"
    "${PIP[@]}" "torch==2.13.0"
fi
if ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("ve-fairseq") == "0.12.3" else 1)
PYEOF
then
    echo "[install] installing ve-fairseq==0.12.3 (--no-deps)"
    "${PIP[@]}" --no-deps -r requirements/fairseq.txt
fi
"${PIP[@]}" -e ".[test,bench]"
"$PY" -c "import torch, fairseq, faiss; print(f'[install] torch {torch.__version__}, fairseq {fairseq.__version__}, faiss {faiss.__version__}')" 2>/dev/null
