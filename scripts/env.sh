# Sourced by every entry script (demo.sh, test.sh, bench.sh, install.sh, the recipe wrappers):
# decides which Python environment fairseq-arch runs in and puts it first on PATH.
#
#   - an active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX): that one;
#   - otherwise $ARCH_VENV (default: .venv/ at the repository root), created by scripts/install.sh
#     with ${PYTHON:-python3} -m venv. Nothing is ever installed into a system Python.
#
# After `arch_use_env`, `python3`, `pip` and the fairseq console scripts (fairseq-train, ...) on
# PATH are the environment's own, so a package that the install does not provide fails loudly.
ARCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prints the environment's root directory.
arch_env_dir() {
    if [[ -n "${VIRTUAL_ENV:-}" ]]; then echo "$VIRTUAL_ENV"
    elif [[ -n "${CONDA_PREFIX:-}" ]]; then echo "$CONDA_PREFIX"
    else echo "${ARCH_VENV:-$ARCH_REPO/.venv}"; fi
}

# The environment is ours to create (not a user's active one).
arch_env_is_ours() { [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]]; }

# Install (unless ARCH_SKIP_INSTALL=1), then run everything after this inside the environment.
arch_use_env() {
    if [[ "${ARCH_SKIP_INSTALL:-0}" != 1 ]]; then bash "$ARCH_REPO/scripts/install.sh"; fi
    local dir; dir="$(arch_env_dir)"
    if [[ ! -x "$dir/bin/python3" && ! -x "$dir/bin/python" ]]; then
        echo "fairseq-arch: no Python environment at $dir (run bash scripts/install.sh)" >&2
        return 2
    fi
    if arch_env_is_ours; then export VIRTUAL_ENV="$dir"; fi
    export PATH="$dir/bin:$PATH"
    hash -r
    export PIP_ROOT_USER_ACTION=ignore
}
