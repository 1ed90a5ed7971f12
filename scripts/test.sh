#!/usr/bin/env bash
# Install what is needed, check the layering contracts (pyproject.toml), then run the test suite (offline, CPU).
# Extra arguments go to pytest. Without them, the vLLM serving tests (tests/serving, skipped in the main environment)
# then run in the serving environment, which SERVE=1 scripts/install.sh builds (.venv-serve); SERVE=0 leaves them out.
set -euo pipefail
source "$(dirname "$0")/env.sh"
lint-imports --no-cache --no-logo
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q "$@"
if [ $# -eq 0 ] && [ "${SERVE:-1}" != 0 ]; then
    serve_venv="${SERVE_VENV:-.venv-serve}"
    [ -n "${SKIP_INSTALL:-}" ] || SERVE=1 bash scripts/install.sh
    if [ -x "$serve_venv/bin/python" ]; then
        echo "== the vLLM serving tests, in $serve_venv"
        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$serve_venv/bin/python" -m pytest -q tests/serving
    else
        echo "== no $serve_venv (SKIP_INSTALL=1): the vLLM serving tests did not run"
    fi
fi
