"""utils/openmp.py: the entry points that search set OMP_WAIT_POLICY before torch or FAISS is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Records OMP_WAIT_POLICY at the moment torch and faiss are first imported, then imports the module.
PROBE = """
import importlib, json, os, sys
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "faiss") and name not in seen:
            seen[name] = os.environ.get("OMP_WAIT_POLICY")
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print(json.dumps(seen))
"""


@pytest.mark.parametrize("module", ["knn_utils.knnlm", "benchmarks.bench_knn", "benchmarks.bench_verify"])
def test_the_wait_policy_is_set_before_torch_and_faiss_load(module):
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", PROBE, module], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"torch": "PASSIVE", "faiss": "PASSIVE"}


def test_a_wait_policy_already_set_wins():
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    result = subprocess.run([sys.executable, "-c", "import os, utils.openmp; print(os.environ['OMP_WAIT_POLICY'])"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ACTIVE"
