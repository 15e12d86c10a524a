# Shared body of the recipe wrappers (scripts/prepare-*.sh, train-*.sh, evaluate.sh), sourced by them.
# They run inside the project's Python environment (scripts/env.sh), installed first if needed.
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
#   run_recipe CALLER PY_SCRIPT [DATASET] -- ARGS...
# --help / -h: the calling script's header comment, the files prepare expects (prepare only) and the
# Python recipe's options. Otherwise: exec the Python recipe with DATASET (if any) and ARGS.
run_recipe() {
    local caller="$1" py="$2" dataset=()
    shift 2
    if [[ "$1" != "--" ]]; then dataset=("$1"); shift; fi
    shift  # the "--"
    arch_use_env >&2
    local recipes
    recipes="$(cd "$(dirname "$caller")" && pwd)/recipes"
    if [[ " $* " == *" -h "* || " $* " == *" --help "* ]]; then
        sed -n '2,/^set -euo/p' "$caller" | sed '$d; s/^# \{0,1\}//'
        if [[ "$py" == prepare.py ]]; then
            echo; python3 "$recipes/prepare.py" "${dataset[@]}" --help-files; echo
        fi
        python3 "$recipes/$py" --help | sed -n '/^options/,$p'
        exit 0
    fi
    export PYTHONWARNINGS=ignore
    exec python3 "$recipes/$py" "${dataset[@]}" "$@"
}
