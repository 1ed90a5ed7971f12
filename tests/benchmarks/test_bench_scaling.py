"""The scaling benchmark's bookkeeping on a tiny random Llama and the tiny corpus: points are added one by one,
a rerun skips what is done and resumes what is not, and the table and plot are made from the JSON alone."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from benchmarks import bench_scaling
from benchmarks.scaling_report import tables
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tiny_model("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_points_resume_and_report(tmp_path, tiny_llama_dir, tiny_corpus):
    stem = tmp_path / "results" / "scaling"
    argv = ["--out", str(tmp_path / "out"), "--results", str(stem), "--model_dir", str(tiny_llama_dir), "--gguf_file", "",
            "--train_file", str(tiny_corpus["train"]), "--validation_file", str(tiny_corpus["validation"]),
            "--test_file", str(tiny_corpus["test"]), "--max_chars", "100000", "--block_size", "32", "--k", "8",
            "--memory_blocks", "1", "--loader_workers", "0", "--epochs", "1", "2", "--batch_size", "64", "--warmup_steps", "2",
            "--cpt_epochs", "0.25", "0.75", "--cpt_batch", "2", "--datastore_fractions", "0.5", "1",
            "--datastore_blocks", "1", "--datastore_epochs", "1", "--eval_windows", "3", "--lmbdas", "0.25", "0.5"]

    # Interrupted after three new points (as a kill would): the first size's two lengths and the base.
    first = bench_scaling.main([*argv, "--stop_after_points", "3"])
    assert sorted(first["points"]) == ["base/steps_0", "memory/blocks_1/epochs_1", "memory/blocks_1/epochs_2"]
    done = json.loads(stem.with_suffix(".json").read_text())["points"]
    assert done == first["points"]
    # 1 size x 2 lengths, the base and 2 lengths, 1 fraction, 1 decay-check length
    assert "**In progress: 3 of 7 points.**" in tables(first)

    # The rerun keeps those points as they were and adds the rest.
    second = bench_scaling.main(argv)
    for key, point in done.items():
        assert second["points"][key] == point
    assert set(second["points"]) - set(done) == {"base/steps_2", "base/steps_6", "datastore/fraction_0.5/epochs_1",
                                                  "decay/blocks_1/epochs_1"}
    grid, early = second["points"]["memory/blocks_1/epochs_2"], second["points"]["memory/blocks_1/epochs_1"]
    assert grid["steps"] == 2 * early["steps"] and grid["train_flops"] == 2 * early["train_flops"]
    # The epoch-1 point is the run's checkpoint at that step, saved as a memory: not the final memory again.
    assert early["memory_dir"] != grid["memory_dir"]
    assert early["validation_memory_perplexity"] != grid["validation_memory_perplexity"]
    # Each memory point carries its run's own validation (the held-out last rows) at that step.
    assert early["held_out"]["rows"] > 0 and early["held_out"]["kl"] != grid["held_out"]["kl"]
    assert second["points"]["base/steps_6"]["train_flops"] == 3 * second["points"]["base/steps_2"]["train_flops"]
    # Of the continued pretraining's checkpoints only the longest run's last one is kept (to resume a longer one),
    # though the resumed run also saved at step 4 (it keeps the first run's save_steps, 2).
    cpt = tmp_path / "out" / "base_cpt"
    assert sorted(c.relative_to(cpt).as_posix() for c in cpt.glob("*/checkpoint-*")) == ["steps_6/checkpoint-6"]
    assert grid["lmbda"] in (0.25, 0.5) and grid["test_joint_perplexity"] > 1
    # The decay check is its own run of that length (a linear decay), not the constant-rate run's checkpoint.
    decayed = second["points"]["decay/blocks_1/epochs_1"]
    assert decayed["lr_scheduler"] == "linear" and early["lr_scheduler"] == "constant_with_warmup"
    assert decayed["steps"] == early["steps"] and decayed["memory_dir"] != early["memory_dir"]
    assert decayed["validation_memory_perplexity"] != early["validation_memory_perplexity"]
    assert "What the constant learning rate costs" in tables(second)
    half = second["points"]["datastore/fraction_0.5/epochs_1"]
    assert half["datastore_rows"] < grid["datastore_rows"]
    for point in second["points"].values():
        assert point["machine"]["cores"] >= 1 and len(point["load_start"]) == 3

    # A snapshot memory gives evaluate_joint's numbers for that checkpoint (the base is the same for every memory).
    assert (grid["validation_base_perplexity"] ==
            pytest.approx(half["validation_base_perplexity"]))
    assert grid["test_base_perplexity"] == pytest.approx(second["points"]["base/steps_0"]["test_perplexity"])

    # Points written before they recorded the held-out rows get them from their run's metrics on the next run.
    data = json.loads(stem.with_suffix(".json").read_text())
    for point in data["points"].values():
        point.pop("held_out", None)
    stem.with_suffix(".json").write_text(json.dumps(data))
    third = bench_scaling.main(argv)
    assert third["points"]["memory/blocks_1/epochs_1"]["held_out"] == early["held_out"]
    assert third["points"]["decay/blocks_1/epochs_1"]["held_out"] == decayed["held_out"]

    # The report comes from the JSON alone: a point edited there shows in the regenerated table.
    data = json.loads(stem.with_suffix(".json").read_text())
    data["points"]["memory/blocks_1/epochs_2"]["test_joint_perplexity"] = 12345.678
    stem.with_suffix(".json").write_text(json.dumps(data))
    bench_scaling.main([*argv, "--report_only"])
    assert "12345.68" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0
    assert "12345.68" in tables(data) and "In progress" not in tables(data)
