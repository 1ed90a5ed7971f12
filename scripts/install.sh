#!/usr/bin/env bash
# Install the project's dependencies with pip (CPU, faiss-cpu) into ./.venv, unless a virtual or conda
# environment is already active. For GPUs and faiss-gpu, use environment.yml with conda instead.
#   TORCH_SPEC   which torch to install when none is present (default: torch==2.13.0)
#   PINNED=0     install the loose ranges of requirements.txt only, not the exact versions of requirements-lock.txt
#                (the versions the README's quickstart numbers come from)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "[install] creating .venv"
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

# Skip pip when this environment was already installed from the same requirement files and settings.
stamp="$(python -c 'import sys; print(sys.prefix)')/.mlp-memory-install"
wanted="$(cat requirements.txt requirements-lock.txt | sha256sum | cut -d' ' -f1) PINNED=${PINNED:-1} ${TORCH_SPEC:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
        && python -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torch', 'transformers', 'faiss'))))"; then
    exit 0
fi

if ! python -c "import torch" 2>/dev/null; then
    echo "[install] installing ${TORCH_SPEC:-torch==2.13.0}"
    pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "${PINNED:-1}" = 0 ]; then
    pip install --quiet -r requirements.txt
else
    pip install --quiet -r requirements.txt -c requirements-lock.txt
fi
python -c "import torch, transformers, faiss, accelerate; print(f'[install] torch {torch.__version__}, transformers {transformers.__version__}, faiss {faiss.__version__}, accelerate {accelerate.__version__}')"
echo "$wanted" > "$stamp"
