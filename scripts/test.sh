#!/usr/bin/env bash
# Install what is needed, then run the test suite (offline, CPU). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q "$@"
