#!/usr/bin/env bash
# Install what is needed, check the layering contracts (pyproject.toml), then run the test suite (offline, CPU).
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
lint-imports --no-cache --no-logo
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q "$@"
