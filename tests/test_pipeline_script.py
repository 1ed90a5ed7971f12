"""scripts/pipeline.sh end to end on a tiny GPT-2 and a tiny corpus: every stage, stage skipping, and
training a second model's memory on existing kNN targets."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO
from utils.io import read_json


def run_pipeline(env: dict) -> str:
    result = subprocess.run(["bash", "scripts/pipeline.sh"], cwd=REPO, env={**os.environ, **env},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory, tiny_gpt2_dir, tiny_corpus) -> dict:
    return {
        "OUT": str(tmp_path_factory.mktemp("pipeline") / "run"), "MODEL": str(tiny_gpt2_dir),
        "TRAIN_FILE": str(tiny_corpus["train"]), "VALIDATION_FILE": str(tiny_corpus["validation"]),
        "TEST_FILE": str(tiny_corpus["test"]), "BLOCK": "32", "STRIDE": "16", "INDEX_TYPE": "flat", "K": "8",
        "KNN_TEMP": "4", "EVAL_BATCH": "8", "JOINT_LMBDAS": "0 0.5",
        "MEMORY_ARGS": "--num_layers 1 --num_train_epochs 1 --num_warmup_steps 0 --per_device_train_batch_size 64 "
                       "--disable_tqdm true",
    }


@pytest.fixture(scope="module")
def first_run(pipeline_env) -> str:
    return run_pipeline(pipeline_env)


def test_every_stage_writes_consistent_results(pipeline_env, first_run):
    out = pipeline_env["OUT"]
    base = read_json(f"{out}/eval_base_test/eval_results.json")["perplexity"]
    knnlm = read_json(f"{out}/eval_knnlm_test/knnlm_results.json")
    assert knnlm["base_perplexity"] == pytest.approx(base, rel=1e-6)
    assert (knnlm["k"], knnlm["knn_temp"], knnlm["index_type"]) == (8, 4.0, "flat")
    for split in ("validation", "test"):
        joint = read_json(f"{out}/eval_joint_{split}/joint_results.json")
        assert [p["lmbda"] for p in joint["lmbda_sweep"]] == [0.0, 0.5]
        # lmbda 0 is the base model on the same tokens, whichever stage scored them.
        assert joint["lmbda_sweep"][0]["perplexity"] == pytest.approx(joint["base_perplexity"], rel=1e-6)
    assert read_json(f"{out}/eval_joint_test/joint_results.json")["base_perplexity"] == pytest.approx(base, rel=1e-6)
    memory = read_json(f"{out}/memory/meta.json")
    assert memory["kind"] == "mlp_memory"
    assert read_json(f"{out}/dstore/meta.json")["rows"] == read_json(f"{out}/knn_targets/meta.json")["rows"]


def test_a_second_run_skips_every_stage(pipeline_env, first_run):
    before = {p: os.path.getmtime(p) for p in _result_files(pipeline_env["OUT"])}
    output = run_pipeline(pipeline_env)
    stages = [line for line in output.splitlines() if line.startswith("== ") and "took" not in line]
    assert len(stages) == 9 and all("already done" in line for line in stages), output
    assert {p: os.path.getmtime(p) for p in _result_files(pipeline_env["OUT"])} == before


def test_memory_on_existing_targets_skips_the_search(pipeline_env, first_run, tmp_path):
    out = pipeline_env["OUT"]
    env = {**pipeline_env, "OUT": str(tmp_path / "second"), "DATASET": f"{out}/dataset",
           "KNN_TARGETS": f"{out}/knn_targets", "JOINT_SPLITS": "test"}
    output = run_pipeline(env)
    assert "preprocess: already done" in output
    assert not (tmp_path / "second" / "knn_targets").exists() and not (tmp_path / "second" / "dstore" / "index").exists()
    assert os.path.abspath(read_json(tmp_path / "second" / "memory" / "meta.json")["knn_targets"]["path"]) == \
        os.path.abspath(f"{out}/knn_targets")
    assert (tmp_path / "second" / "eval_joint_test" / "joint_results.json").exists()
    assert not (tmp_path / "second" / "eval_joint_validation").exists()


def _result_files(out: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(out) for name in names if name.endswith(".json")]
