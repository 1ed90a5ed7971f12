#!/usr/bin/env bash
# Install the project's dependencies with pip (CPU, faiss-cpu) into ./.venv, unless a virtual or conda
# environment is already active. For GPUs and faiss-gpu, use environment.yml with conda instead.
#   TORCH_SPEC   which torch to install when none is present (default: torch==2.13.0)
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

if ! python -c "import torch" 2>/dev/null; then
    echo "[install] installing ${TORCH_SPEC:-torch==2.13.0}"
    pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install --quiet -r requirements.txt
python -c "import torch, transformers, faiss, accelerate; print(f'[install] torch {torch.__version__}, transformers {transformers.__version__}, faiss {faiss.__version__}, accelerate {accelerate.__version__}')"
