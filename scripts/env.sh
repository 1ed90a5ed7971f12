# Sourced by the other scripts: install if needed, then activate the environment.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# SKIP_INSTALL=1: use the python already on PATH as it is (a machine with no package index).
[ -n "${SKIP_INSTALL:-}" ] || bash "$_repo/scripts/install.sh"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    # shellcheck disable=SC1091
    source "$_repo/.venv/bin/activate"
fi
export TOKENIZERS_PARALLELISM=false
cd "$_repo"

