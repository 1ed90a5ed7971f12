"""scripts/pipeline.sh with a recipe, end to end on a tiny GPT-2 and a tiny corpus: every stage, the ledger and the
memory's model card, skipping complete stages, comparing two runs, and training a second model's memory on
existing kNN targets."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from models.model_card import read_front_matter
from scripts import pipeline
from tests.conftest import REPO
from utils.cli import UsageError
from utils.io import read_json
from utils.run_layout import RunLayout

QUESTIONS = ["the river of the city", "who built the old bridge", "the king was born near", "many people and"]


def tiny_recipe(model, corpus: dict) -> dict:
    """The standard pipeline at tiny sizes (the recipe the tests here and in tests/faults/ run)."""
    return {
        "description": "the tiny test pipeline",
        "shared": {"model": str(model), "k": 8, "knn_temp": 4, "eval_batch": 8, "lmbdas": [0, 0.5]},
        "preprocess": {**{f"{split}_file": str(path) for split, path in corpus.items()}, "block_size": 32,
                       "stride": 16},
        "index": {"index_type": "flat"},
        "memory": {"num_layers": 1, "num_train_epochs": 1, "num_warmup_steps": 0, "per_device_train_batch_size": 64,
                   "disable_tqdm": True},
    }


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_gpt2_dir, tiny_corpus):
    directory = tmp_path_factory.mktemp("pipeline")
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_recipe(tiny_gpt2_dir, tiny_corpus), "out": str(directory / "run")}))
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/pipeline.sh", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "SKIP_INSTALL": "1"})


@pytest.fixture(scope="module")
def first_run(recipe) -> RunLayout:
    result = run_script(str(recipe))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| test split | base | kNN-LM | base + memory |" in result.stdout  # the summary's table
    return RunLayout(recipe.parent / "run")


def test_every_stage_writes_consistent_results(first_run):
    layout = first_run
    base = read_json(layout.eval_base("test") / "eval_results.json")["perplexity"]
    knnlm = read_json(layout.knnlm("test") / "knnlm_results.json")
    assert knnlm["base_perplexity"] == pytest.approx(base, rel=1e-6)
    assert (knnlm["k"], knnlm["knn_temp"], knnlm["index_type"]) == (8, 4.0, "flat")
    for split in ("validation", "test"):
        joint = read_json(layout.eval_joint(split) / "joint_results.json")
        assert [p["lmbda"] for p in joint["lmbda_sweep"]] == [0.0, 0.5]
        # lmbda 0 is the base model on the same tokens, whichever stage scored them.
        assert joint["lmbda_sweep"][0]["perplexity"] == pytest.approx(joint["base_perplexity"], rel=1e-6)
    validation = read_json(layout.eval_joint("validation") / "joint_results.json")
    best = min(validation["lmbda_sweep"], key=lambda e: (e["perplexity"], e["lmbda"]))
    assert validation["lmbda_choice"]["lmbda"] == best["lmbda"]  # the choice is recorded where it was made
    assert read_json(layout.eval_joint("test") / "joint_results.json")["lmbda_choice"] is None  # none on test
    summary = read_json(layout.summary)
    assert summary["lmbda"]["base_plus_memory"] == best["lmbda"]
    assert read_json(layout.memory / "meta.json")["kind"] == "mlp_memory"
    assert read_json(layout.dstore / "meta.json")["rows"] == read_json(layout.knn_targets / "meta.json")["rows"]


def test_the_ledger_records_recipe_settings_versions_fingerprints_and_metrics(first_run, recipe):
    ledger = read_json(first_run.ledger)
    assert ledger["recipe"]["text"] == recipe.read_text() and ledger["recipe"]["shared"]["k"] == 8
    assert ledger["environment"]["torch"] and ledger["environment"]["faiss"]
    runs = ledger["runs"]
    assert set(runs) == {"preprocess", "eval_base_test", "datastore", "index", "knn_targets", "knnlm_validation",
                          "knnlm_test", "memory", "eval_joint_validation", "eval_joint_test", "summary"}
    targets = runs["knn_targets"]
    assert targets["settings"]["k"] == 8 and targets["settings"]["output_path"] == "{out}/knn_targets"
    assert targets["inputs"]["dstore"]["fingerprint"] == runs["datastore"]["outputs"]["dstore"]["fingerprint"]
    assert targets["metrics"]["nnz"] > 0 and targets["wall_seconds"] > 0 and targets["peak_rss_bytes"] > 2 ** 20
    assert runs["eval_base_test"]["metrics"]["perplexity"] == pytest.approx(
        read_json(first_run.eval_base("test") / "eval_results.json")["perplexity"])
    assert runs["eval_joint_validation"]["metrics"]["lmbda_choice/lmbda"] in (0.0, 0.5)
    assert read_json(first_run.stage_record("knn_targets"))["settings"] == targets["settings"]
    card = read_front_matter((first_run.memory / "README.md").read_text())  # rewritten with the run's metrics
    metrics = card["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == pytest.approx(read_json(first_run.summary)["test_perplexity"]["base"])


def test_a_second_run_skips_every_stage(recipe, first_run, capsys):
    results = [p for p in first_run.out.rglob("*.json") if p.parent != first_run.out]
    before = {p: os.path.getmtime(p) for p in results}
    pipeline.main([str(recipe)])
    stages = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ") and "took" not in line]
    assert len(stages) == 11 and all("already done" in line for line in stages[:-1]), stages
    assert stages[-1] == "== summary"  # only reads: run every time
    assert {p: os.path.getmtime(p) for p in results} == before


def test_two_runs_with_one_setting_changed_differ_in_exactly_that_setting(recipe, first_run, tmp_path, capsys):
    """The comparison that settles "which hyperparameters gave this number": one changed setting, and what it moved."""
    other = tmp_path / "other"
    pipeline.main([str(recipe), f"out={other}", "shared.knn_temp=2"])
    capsys.readouterr()
    diff = pipeline.main(["compare", str(first_run.out), str(other)])
    printed = capsys.readouterr().out
    assert [(c["setting"], c["a"], c["b"]) for c in diff["settings"]] == [("knn_temp", "4", "2")]
    assert diff["settings"][0]["runs"] == ["knn_targets", "knnlm_test", "knnlm_validation"]
    assert [(c["name"], c["a"], c["b"]) for c in diff["recipe"]] == [("knn_temp", 4, 2)]
    assert diff["environment"] == [] and "versions and machine: none differ" in printed
    assert {c["name"] for c in diff["artifacts"]} >= {"knn_targets", "memory"}
    assert "dstore" not in {c["name"] for c in diff["artifacts"]}  # the same bytes in both runs
    moved = {(c["run"], c["metric"]) for c in diff["results"]}
    assert ("knnlm_test", "lmbda_sweep/lmbda=0.5/perplexity") in moved and ("knnlm_test", "knn_temp") in moved
    assert not any(run in ("eval_base_test", "datastore", "preprocess") for run, _ in moved)
    assert "knn_temp: 4 -> 2  (knn_targets, knnlm_test, knnlm_validation)" in printed


def test_memory_on_existing_targets_skips_the_search(recipe, first_run, tmp_path, capsys):
    second = RunLayout(tmp_path / "second")
    pipeline.main([str(recipe), f"out={second.out}", f"shared.dataset={first_run.dataset}",
                   f"shared.knn_targets={first_run.knn_targets}", "eval_joint.splits=[test]"])
    printed = capsys.readouterr().out
    assert "== preprocess: not run (shared.dataset is given)" in printed
    assert "== knn_targets: not run (shared.knn_targets is given)" in printed
    assert not second.knn_targets.exists() and not second.index.exists() and not second.dataset.exists()
    assert os.path.abspath(read_json(second.memory / "meta.json")["knn_targets"]["path"]) == \
        os.path.abspath(first_run.knn_targets)
    assert (second.eval_joint("test") / "joint_results.json").exists()
    assert not second.eval_joint("validation").exists()
    assert "base_plus_memory" not in read_json(second.summary)["test_perplexity"]  # a test sweep alone chooses nothing


def test_a_memory_trained_online_on_the_same_targets(recipe, first_run, tmp_path, capsys):
    """memory_online in place of memory: the memory trained on the base's hidden states computed on the fly (no saved
    keys) against the first run's kNN targets, into the run's memory/, which the joint evaluation reads as any
    memory; the dry run plans it. A recipe with both memory stages is one error."""
    second = RunLayout(tmp_path / "online")
    settings = [f"out={second.out}", f"shared.dataset={first_run.dataset}", f"shared.knn_targets={first_run.knn_targets}",
                "eval_joint.splits=[test]", "memory_online.num_layers=1", "memory_online.num_train_epochs=1",
                "memory_online.num_warmup_steps=0", "memory_online.per_device_train_batch_size=4",
                "memory_online.disable_tqdm=true"]
    pipeline.main([str(recipe), "stages=[memory_online, eval_joint, summary]", *settings, "--dry_run"])
    assert "| memory_online | to run |" in capsys.readouterr().out and not second.out.exists()
    pipeline.main([str(recipe), "stages=[memory_online, eval_joint, summary]", *settings])
    assert "== memory_online\n   python -m train_mlpmem_online " in capsys.readouterr().out
    meta = read_json(second.memory / "meta.json")
    assert meta["mode"] == "online" and meta["source"]["mode"] == "online"
    assert os.path.abspath(meta["knn_targets"]["path"]) == os.path.abspath(first_run.knn_targets)
    joint = read_json(second.eval_joint("test") / "joint_results.json")
    assert joint["lmbda_sweep"][0]["lmbda"] == 0 and joint["lmbda_sweep"][0]["perplexity"] == \
        pytest.approx(read_json(first_run.eval_base("test") / "eval_results.json")["perplexity"], rel=1e-5)
    recorded = read_json(second.stage_record("memory_online"))
    assert recorded["settings"]["dataset_name"] == str(first_run.dataset) and "knn_targets" in recorded["inputs"]
    with pytest.raises(UsageError, match="stages memory and memory_online both train"):
        pipeline.main([str(recipe), "stages=[memory, memory_online]", *settings])


def test_the_qa_stage_records_its_choice_and_the_runs_after_it_read_it(recipe, first_run, tmp_path):
    """QA on the validation questions at each lmbda, the choice recorded with its table, the test run at it."""
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answer": [q.split()[-1]]}) + "\n" for q in QUESTIONS))
    pipeline.main([str(recipe), "stages=[qa, summary]", f"qa.validation_file={questions}",
                   f"qa.test_file={questions}", "qa.lmbdas=[0, 0.9]", "qa.prompt_template=the {question}",
                   "qa.max_new_tokens=3"])
    choice = read_json(first_run.qa_choice)
    assert [row["lmbda"] for row in choice["table"]] == [0, 0.9] and choice["lmbda"] in (0, 0.9)
    assert choice["rule"].startswith("highest exact match")
    tested = read_json(first_run.qa("test", choice["lmbda"]) / "qa_results.json")
    assert tested["lmbda"] == choice["lmbda"] and tested["use_neural_knn"]
    assert read_json(first_run.summary)["qa_test"]["lmbda"] == choice["lmbda"]
    assert not read_json(first_run.qa("test", None) / "qa_results.json")["use_neural_knn"]  # the base, same run
    recorded = read_json(first_run.stage_record("qa_test"))
    assert recorded["settings"]["lmbda"] == choice["lmbda"] and "qa_choice" in recorded["inputs"]
    assert recorded["settings"]["memory"] == "{out}/memory"  # through the front door (MemoryArguments)
