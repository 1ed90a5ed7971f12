"""benchmarks/gpu_run.py: its full-size plan (stages, sizes, seconds), and every stage run for real on a tiny slice
on the CPU (--dry_run), so that the GPU run cannot rot before a GPU arrives."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu_run
from benchmarks.memory_throughput import memory_params, peak_bf16_tflops
from utils.cli import UsageError

STAGE_NAMES = ["environment", "preprocess", "finetune", "datastore", "index", "knn_targets", "reranking", "memory",
               "finetuned_gain", "large_throughput"]


def test_full_plan_sizes():
    plan = gpu_run.make_plan(gpu_run.RunSizes.full())
    stages = plan["stages"]
    assert list(stages) == STAGE_NAMES
    rows = stages["datastore"]["rows"]
    assert rows == 2_581_967  # all of WikiText-2 train under SmolLM2's tokenizer: every token but the first
    assert stages["index"] == {**stages["index"], "rows": rows, "ncentroids": 4096, "train_size": 1_000_000}
    assert 576 % stages["index"]["code_size"] == 0  # sub-quantizers divide SmolLM2's width
    assert stages["knn_targets"]["k"] == 1024 and stages["knn_targets"]["probe"] == 32
    assert stages["knn_targets"]["queries"] == rows and stages["memory"]["rows"] == rows
    assert stages["memory"]["epochs"] > 1
    rerank = stages["reranking"]
    assert (rerank["k"], rerank["candidates"]) == (1024, 1152) and rerank["queries"] >= 16_000
    assert stages["memory"]["steps"] == stages["memory"]["epochs"] * math.ceil(rows / 512)
    large = stages["large_throughput"]
    assert large["preset"] == "large" and round(large["parameters"] / 1e6, 1) == 772.6
    assert large["flops_per_row"] == 6 * large["matrix_parameters"]
    assert all(stage["seconds"] > 0 for stage in stages.values())
    assert plan["seconds"] == pytest.approx(sum(stage["seconds"] for stage in stages.values()))
    # The search's share is the rate's: queries over queries/s.
    assert stages["knn_targets"]["search_seconds"] == pytest.approx(rows / gpu_run.rate("search_queries_per_second"))


def test_peaks_and_parameter_counts():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4 and peak_bf16_tflops(None) is None
    tiny = memory_params("tiny", hidden_size=8, vocab_size=10)
    # 2 GPT-2 blocks of d -> 4d -> d (8 d^2 weights each) and the d x V head; biases and norms are not matrices
    assert tiny["matrix_parameters"] == 2 * 8 * 8 * 8 + 8 * 10 and tiny["parameters"] > tiny["matrix_parameters"]


def test_a_real_run_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real run would start")
    with pytest.raises(UsageError, match="No GPU"):
        gpu_run.main(["--out", str(tmp_path / "real")])
    assert gpu_run.main(["--plan_only"])["plan"]["budget_seconds"] == 480


def test_dry_run_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "dry"
    found = gpu_run.main(["--dry_run", "--out", str(out)])
    stages, sizes = found["stages"], gpu_run.RunSizes.dry()
    assert list(stages) == STAGE_NAMES and found["device"] == "cpu" and not found["stages"]["environment"]["faiss_gpu"]
    written = json.loads((out / "gpu_run_dry.json").read_text())
    assert written["stages"]["finetuned_gain"] == stages["finetuned_gain"]
    assert (out / "gpu_run_dry.md").read_text().startswith("# gpu_run_dry: dry run")
    rows = stages["datastore"]["rows"]
    assert rows == stages["preprocess"]["tokens"]["train"] - 1  # every train token but the first
    assert stages["index"]["index_type"] == "ivfpq" and stages["index"]["rows"] == rows
    assert stages["index"]["settings"]["ncentroids"] == sizes.ncentroids
    assert stages["knn_targets"]["rows"] == rows and stages["knn_targets"]["k"] == sizes.k
    assert 1 <= stages["knn_targets"]["entries_per_row"] <= sizes.k
    rerank = stages["reranking"]
    assert rerank["queries"] == sizes.rerank_queries and rerank["candidates"] == sizes.k + 8
    assert rerank["identical_at_an_eighth_of_the_batch"] and rerank["queries_per_second"] > 0
    assert rerank["neighbours_differing_from_the_cpu_kernel"] == 0  # torch on the CPU: the kernel's own bits
    assert rerank["largest_distance_difference_from_the_cpu_kernel"] == 0.0
    targets = rerank["targets"]
    assert targets["rows"] == sizes.rerank_queries and targets["identical_at_an_eighth_of_the_batch"]
    assert targets["time_ratio_exact_over_faiss"] > 0
    assert "Exact re-ranking on cpu:" in (out / "gpu_run_dry.md").read_text()
    memory = stages["memory"]
    assert memory["epochs"] == sizes.memory_epochs > 1
    assert memory["steps"] == sizes.memory_epochs * math.ceil((rows - round(0.01 * rows)) / sizes.memory_batch)
    gain = stages["finetuned_gain"]
    assert gain["lmbda"] in sizes.lmbdas and math.isfinite(gain["finetuned_base_plus_memory"])
    assert gain["gain_percent"] == pytest.approx(100 * (1 - gain["finetuned_base_plus_memory"] / gain["finetuned_base"]))
    large = stages["large_throughput"]
    assert large["preset"] == "tiny" and large["rows_per_second"] > 0 and large["share_of_peak"] is None
    # A second run finds every stage's output complete and reads the same numbers back.
    again = gpu_run.main(["--dry_run", "--out", str(out)])
    assert again["stages"]["finetuned_gain"] == gain and again["stages"]["memory"] == memory
    assert again["seconds"]["memory"] < 5
