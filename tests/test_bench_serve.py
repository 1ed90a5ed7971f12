"""benchmarks/bench_serve_gpu.sh's dry mode on the CPU: the GPU run's stages and sizes, the joint directory it reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_benchmark_dry_run_prepares_the_joint_model_and_plans_the_run(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "TINY": "1", "WORK_DIR": str(tmp_path / "work"),
           "OUT_DIR": str(tmp_path / "results"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "bench_serve_gpu.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "results" / "serve_vllm_gpu.json").read_text())
    assert plan["stages"] == ["prepare"] and "vllm" not in plan and "hf" not in plan  # nothing timed, no GPU needed
    settings = plan["settings"]
    assert (settings["device"], settings["dtype"], settings["enforce_eager"]) == ("cuda", "bfloat16", 0)
    assert settings["batch_sizes"] == [1, 8, 32] and settings["new_tokens"] == 128
    assert plan["plan"]["engines"] == ["base", "joint"]
    assert plan["plan"]["generated_tokens_per_engine"] == (3 * 128 + 3 + 2) * (1 + 8 + 32)
    memory = plan["memory"]
    assert (memory["num_layers"], memory["memory_style"], memory["layer"]) == (2, "llama", 1)  # the last of 2 blocks
    flops = plan["flops_per_token"]
    assert plan["flop_bound"] == round(flops["base"] / (flops["base"] + flops["memory"]), 4)
    norms = (memory["num_layers"] + 1) * memory["hidden_size"]  # the only memory parameters outside a matmul
    assert flops["memory"] == 2 * (memory["parameters"] - norms)
    joint_meta = json.loads((tmp_path / "work" / "joint" / "meta.json").read_text())
    assert joint_meta["kind"] == "mlp_memory_joint" and joint_meta["lmbda"] == 0.25
    assert "Dry run" in (tmp_path / "results" / "serve_vllm_gpu.md").read_text()
