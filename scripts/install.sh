#!/usr/bin/env bash
# Usage: bash scripts/install.sh   (environment variables: README, "Install")
# Install fairseq-arch and everything it imports into its own Python environment
# (scripts/env.sh says which: an active venv/conda env, else .venv/ here, created now).
# Idempotent: a second run that finds nothing changed takes about a second.
#
# Order matters:
#   1. torch, first, so that nothing else pulls an unpinned (multi-GB CUDA) build:
#      - a torch==$ARCH_TORCH_VERSION wheel on this machine's disk (pip's find-links): that one;
#      - else, on Linux with no NVIDIA driver: the CPU build from PyTorch's CPU index
#        ($ARCH_TORCH_CPU_INDEX, about 200 MB), if it can be reached;
#      - else PyPI's build (on Linux a CUDA build, several GB; on macOS/Windows the CPU one).
#      ARCH_TORCH=cpu|pypi forces one of the last two; an environment with torch keeps it.
#   2. this package (editable) with every dependency the plugin, scripts, recipes, benchmarks
#      and tests import (setup.py: install_requires + extras test, bench) and ONE faiss:
#      ARCH_FAISS=cpu (default: faiss-cpu) or ARCH_FAISS=gpu (faiss-gpu-cu12, CUDA 12 runtime).
#      Both own the package `faiss`, so the other one is uninstalled first (README, Dependencies).
#   3. fairseq last, ve-fairseq==0.12.3 with --no-deps: its own metadata pins torchaudio (which
#      would replace torch) and cython (a build-time tool); with --no-deps pip installs nothing
#      for them and does not run the resolver check that would print "ERROR: ... ve-fairseq
#      requires torchaudio" for an install that works. Its real runtime deps came with step 2.
#
# In YOUR active environment (a venv or conda env that is not this project's .venv/) nothing you
# installed is replaced or removed: a fairseq >= 0.12 (official, fork or editable) and any faiss
# are kept, and the install says what it kept and what it would have installed.
# ARCH_INSTALL_REPLACE=1 replaces them (fairseq with ve-fairseq==0.12.3, faiss with ARCH_FAISS's).
# A fairseq older than 0.12 stops the install with that advice.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
source "$(dirname "$0")/env.sh"
cd "$ARCH_REPO"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_VERSION="${ARCH_TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${ARCH_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
FAISS="${ARCH_FAISS:-cpu}"
REPLACE="${ARCH_INSTALL_REPLACE:-0}"
case "$FAISS" in
    cpu) FAISS_DIST=faiss-cpu ;;
    gpu) FAISS_DIST=faiss-gpu-cu12 ;;
    *) echo "[install] ARCH_FAISS must be cpu or gpu, got '$FAISS'" >&2; exit 2 ;;
esac
ENV_DIR="$(arch_env_dir)"
say() { echo "[install] $*"; }

# --- the environment ---------------------------------------------------------------------------
if arch_env_is_ours; then
    BASE_PY="${PYTHON:-python3}"
    want="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [[ -x "$ENV_DIR/bin/python" ]]; then
        have="$("$ENV_DIR/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)"
        if [[ "$have" != "$want" && -n "${PYTHON:-}" ]]; then
            say "$ENV_DIR is Python $have but PYTHON=$PYTHON is $want: recreating it"
            rm -rf "$ENV_DIR"
        elif [[ "$have" == broken ]]; then
            say "$ENV_DIR is broken: recreating it"; rm -rf "$ENV_DIR"
        fi
    fi
    if [[ ! -x "$ENV_DIR/bin/python" ]]; then
        say "creating the virtual environment $ENV_DIR (Python $want, $BASE_PY)"
        "$BASE_PY" -m venv "$ENV_DIR"
    fi
fi
PY="$ENV_DIR/bin/python"
[[ -x "$PY" ]] || PY="$ENV_DIR/bin/python3"
[[ -x "$PY" ]] || { echo "[install] no python in $ENV_DIR" >&2; exit 2; }
# pip -q, and without the "WARNING: Location 'file:///...' is ignored" lines that a machine whose
# pip config names local package folders prints for every package (nothing to do with this install).
pip_install() {
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory\.$" || true; }
}
PIP=(pip_install)

# Nothing changed since the last complete install: done.
STAMP="$ENV_DIR/.fairseq-arch-install"
fingerprint="$( (cat setup.py requirements/fairseq.txt scripts/install.sh; echo "faiss=$FAISS replace=$REPLACE") | cksum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" ]] \
   && "$PY" -c "import torch, fairseq, faiss, fairseq_arch" 2>/dev/null; then
    say "up to date: $("$PY" -c 'import torch; print(torch.__version__)') in $ENV_DIR"
    exit 0
fi
rm -f "$STAMP"

# --- 1. torch ----------------------------------------------------------------------------------
torch_build() {   # (stderr: torch warns that numpy is missing when it is installed before it)
    "$PY" - 2>/dev/null <<'PYEOF'
import torch
cuda = torch.version.cuda
print(f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU'} build)")
PYEOF
}
if "$PY" -c "import torch" 2>/dev/null; then
    say "keeping the installed $(torch_build)"
else
    has_nvidia=0
    { [[ -e /proc/driver/nvidia/version ]] || command -v nvidia-smi >/dev/null 2>&1; } && has_nvidia=1
    mode="${ARCH_TORCH:-auto}"
    # A wheel on this machine's disk (pip's find-links): --no-index looks nowhere else.
    local_wheel=0
    if [[ "$mode" == auto ]] && "$PY" -m pip install -q --dry-run --no-deps --no-index \
            "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        local_wheel=1
    fi
    installed=0
    if [[ $local_wheel == 1 ]]; then
        say "installing torch==$TORCH_VERSION from the wheel on this machine's disk"
        "${PIP[@]}" "torch==$TORCH_VERSION" && installed=1
    elif [[ "$mode" == cpu || ( "$mode" == auto && "$(uname -s)" == Linux && $has_nvidia == 0 ) ]]; then
        say "no NVIDIA driver: trying the CPU build of torch==$TORCH_VERSION ($TORCH_CPU_INDEX, ~200 MB)"
        # pip's output is kept quiet unless it worked: an unreachable index is an expected outcome here
        if cpu_log="$("$PY" -m pip install -q --timeout 20 --retries 1 --index-url "$TORCH_CPU_INDEX" \
                --no-deps "torch==$TORCH_VERSION" 2>&1)"; then
            "${PIP[@]}" "torch==$TORCH_VERSION" && installed=1   # its dependencies, from PyPI
        else
            say "no CPU build from $TORCH_CPU_INDEX (pip: $(grep -m1 -oE 'Name or service not known|timed out|No matching distribution[^)]*|Connection refused' <<<"$cpu_log" || echo "${cpu_log##*$'\n'}"))"
            [[ "$mode" == cpu ]] && { echo "[install] ARCH_TORCH=cpu and no CPU build found" >&2; exit 1; }
        fi
    fi
    if [[ $installed == 0 ]]; then
        say "installing torch==$TORCH_VERSION from PyPI (on Linux a CUDA build: several GB)"
        "${PIP[@]}" "torch==$TORCH_VERSION"
    fi
    say "installed $(torch_build)"
fi

# What the environment already has: "<distributions>|<version>" of fairseq, the faiss distributions
found_fairseq="$("$PY" - 2>/dev/null <<'PYEOF'
import importlib.metadata as m, logging
logging.disable(logging.WARNING)  # fairseq's import-time notices
dists = sorted(set(m.packages_distributions().get("fairseq", [])))
try:
    import fairseq
    version = getattr(fairseq, "__version__", "unknown")
except Exception:
    version = ""
print(" ".join(dists) + "|" + version if (dists or version) else "")
PYEOF
)" || found_fairseq=""
found_faiss="$("$PY" - <<'PYEOF'
import importlib.metadata as m
names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in m.distributions()}
print(" ".join(sorted(n for n in names if n == "faiss" or n.startswith("faiss-"))))
PYEOF
)"
# keep what a user's own environment holds unless ARCH_INSTALL_REPLACE=1
keep_users=0
arch_env_is_ours || [[ "$REPLACE" == 1 ]] || keep_users=1
if [[ $keep_users == 1 && -n "$found_fairseq" ]]; then
    # checked before anything is installed: a fairseq the plugin cannot run on stops here
    if ! "$PY" -c 'import re, sys; m = re.match(r"(\d+)\.(\d+)", sys.argv[1]); sys.exit(not m or (int(m[1]), int(m[2])) < (0, 12))' \
            "${found_fairseq#*|}" 2>/dev/null; then
        echo "[install] fairseq ${found_fairseq#*|} (${found_fairseq%%|*}) in $ENV_DIR is not 0.12 or newer, which" \
             "fairseq-arch needs: upgrade it, or rerun with ARCH_INSTALL_REPLACE=1 to replace it with" \
             "ve-fairseq==0.12.3. Nothing was installed." >&2
        exit 2
    fi
fi

# --- 2. this package and every import's package --------------------------------------------------
extras="$FAISS,test,bench"
if [[ $keep_users == 1 && -n "$found_faiss" ]]; then
    say "keeping the installed $found_faiss (would have installed $FAISS_DIST; ARCH_INSTALL_REPLACE=1 replaces it)"
    extras="test,bench"
else
    # faiss-cpu and faiss-gpu* both write faiss/: remove every other one before installing ours
    others="$(tr ' ' '\n' <<<"$found_faiss" | grep -vx "$FAISS_DIST" | tr '\n' ' ' || true)"
    if [[ -n "${others// /}" ]]; then
        say "uninstalling $others(ARCH_FAISS=$FAISS installs $FAISS_DIST; they all own the package faiss)"
        "$PY" -m pip uninstall -q -y $others
        "${PIP[@]}" --force-reinstall --no-deps "$FAISS_DIST"  # faiss/ was shared: put ours back whole
    fi
fi
say "installing fairseq-arch (editable) and its dependencies$([[ $extras == "$FAISS,"* ]] && echo ", $FAISS_DIST")"
"${PIP[@]}" -e ".[$extras]"

# --- 3. fairseq, last, without its metadata's pins ---------------------------------------------------
fairseq_dists="${found_fairseq%%|*}" fairseq_version="${found_fairseq#*|}"
if [[ "$fairseq_dists" == ve-fairseq && "$fairseq_version" == 0.12.3 ]]; then
    :
elif [[ $keep_users == 1 && -n "$found_fairseq" ]]; then
    say "keeping the installed fairseq $fairseq_version (${fairseq_dists:-not from a distribution}; would have installed" \
        "ve-fairseq==0.12.3; ARCH_INSTALL_REPLACE=1 replaces it)"
else
    if [[ -n "$fairseq_dists" && "$fairseq_dists" != ve-fairseq ]]; then
        say "uninstalling $fairseq_dists (replaced by ve-fairseq==0.12.3)"
        "$PY" -m pip uninstall -q -y $fairseq_dists
    fi
    say "installing ve-fairseq==0.12.3 (--no-deps: README, Dependencies)"
    "${PIP[@]}" --no-deps -r requirements/fairseq.txt
fi

"$PY" - 2>/dev/null <<'PYEOF'
import logging; logging.disable(logging.INFO)   # fairseq's "Please install tensorboardX" at import
import faiss, fairseq, torch
cuda = torch.version.cuda
print(f"[install] ready: torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU'} build), "
      f"fairseq {fairseq.__version__}, faiss {faiss.__version__}")
PYEOF
echo "$fingerprint" > "$STAMP"
say "environment: $ENV_DIR"
