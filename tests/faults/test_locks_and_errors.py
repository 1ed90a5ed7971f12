"""Faults: two runs writing one artifact, a lock left by a killed run, NaN and infinite flags and results, and
bad inputs that must end in a one-line error (exit status 2) instead of a traceback or a wrong result.

Real processes (a holder of the lock, the CLIs, an ``accelerate launch``) and the real entry points called
in-process on the tiny fixtures; nothing under test is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import evaluate_joint
import train_base
import train_mlpmem_offline
from demo import generation_example
from downstream import eval_qa
from knn_utils import build_index, knnlm, saveKNNMulti
from knn_utils.index_search import load_index
from models import MemoryConfig, build_memory
from models.memory_directory import save_memory
from tests.conftest import REPO
from tests.knn_fixtures import cpu_launch_env, random_datastore, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from utils.artifacts.dataset import load_split
from utils.artifacts.datastore import load_datastore
from utils.checksums import model_files, record_checksums
from utils.cli import UsageError
from utils.io import ArtifactError, read_json, write_json
from utils.locking import owner_file
from utils.preprocess_dataset import main as preprocess

ENV = {**cpu_launch_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Holds the locks of (path, flag) pairs given as arguments until it is killed.
HOLDER = ("import sys, time; from utils.locking import artifact_locks; "
          "held = artifact_locks(list(zip(sys.argv[1::2], sys.argv[2::2]))); held.__enter__(); "
          "print('locked', flush=True); time.sleep(600)")


# ---------------------------------------------------------------------------------------------------
# Artifacts of the tiny pipeline: a memory for tiny_lm's model, damaged copies


@pytest.fixture(scope="module")
def memory_dir(tiny_lm, tmp_path_factory) -> Path:
    """A tiny random memory that fits tiny_lm's model (1 block reading its last block)."""
    base_config = AutoConfig.from_pretrained(tiny_lm["model"])
    fingerprint = load_split(str(tiny_lm["data"]), "test").meta["tokenizer"]["fingerprint"]
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(base_config, num_layers=1, intermediate_size=16, layer=1,
                                                 tokenizer_fingerprint=fingerprint))
    directory = tmp_path_factory.mktemp("memory") / "memory"
    save_memory(directory, memory, results={}, record={})
    return directory


def damaged_copy(source: Path, destination: Path, damage: str) -> Path:
    """A copy of a model directory whose model.safetensors has a corrupt header or all its weights NaN; a memory's
    meta.json records the damaged file's checksums, as when a diverged run saved it (so the damage itself is met)."""
    shutil.copytree(source, destination)
    weights = destination / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    if damage == "header":
        data[8:20] = b"not a header"
    else:  # every weight byte 0xff: each float32 is a NaN
        data[8 + header:] = b"\xff" * (len(data) - 8 - header)
    weights.write_bytes(data)
    if (destination / "meta.json").is_file():
        meta = read_json(destination / "meta.json")
        write_json(destination / "meta.json", {**meta, "checksums": record_checksums(destination, model_files(destination))})
    return destination


def model_flags(tiny_lm, model=None) -> list[str]:
    return ["--model_name_or_path", str(model or tiny_lm["model"]), "--dataset_name", str(tiny_lm["data"])]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr.split(lines[0])[0], stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# 1. One writer per artifact


@contextmanager
def holder(*pairs: tuple[Path, str]):
    """A real process holding the locks of ``pairs`` until it is SIGKILLed (as ``kill -9`` would end a run)."""
    args = [str(item) for pair in pairs for item in pair]
    process = subprocess.Popen([sys.executable, "-c", HOLDER, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked", process.stderr.read()
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def concurrent(tiny_lm, tmp_path_factory):
    """While a real process holds the locks of a datastore and of a dataset, run the CLIs that write them.

    ``train_base --save_knnlm_dstore`` (one process) and ``utils.preprocess_dataset`` under ``accelerate launch``
    (two processes) run at the same time. The datastore's staging directory holds the holder's work so far.
    Then the holder is SIGKILLed: its owner records stay, as after a crash.
    """
    root = tmp_path_factory.mktemp("concurrent")
    dstore, dataset = root / "dstore", root / "dataset"
    staging = root / "dstore.partial"
    staging.mkdir()
    (staging / "progress.json").write_text('{"the first run": "its rows so far"}')
    with holder((dstore, "--dstore_dir"), (dataset, "--output_dir")) as process:
        commands = {
            "train_base": ["-m", "train_base", *model_flags(tiny_lm), "--do_eval", "--eval_subset", "train",
                           "--save_knnlm_dstore", "--dstore_dir", str(dstore), "--output_dir", str(root / "eval"),
                           "--report_to", "none"],
            "launch": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "utils.preprocess_dataset",
                       "--tokenizer_path", str(tiny_lm["model"]), "--train_file", str(tiny_lm["root"] / "train.txt"),
                       "--output_dir", str(dataset)],
        }
        runs = {name: subprocess.Popen([sys.executable, *command], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, start_new_session=True)
                for name, command in commands.items()}
        try:
            results = {name: (run, *run.communicate(timeout=240)) for name, run in runs.items()}
        finally:  # a launch that hangs (a process waiting for a main process that is gone) is ended with its group
            for run in runs.values():
                if run.poll() is None:
                    os.killpg(run.pid, signal.SIGKILL)
        left = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))  # what the refused runs left
        staged = {p.name: p.read_text() for p in staging.iterdir()} if staging.is_dir() else None
    return {"root": root, "dstore": dstore, "dataset": dataset, "holder": process, "left": left, "staged": staged,
            **results}


def owner_named(error: str, process) -> None:
    for part in (f"host {socket.gethostname()}", f"pid {process.pid}", "artifact_locks", "started 20"):
        assert part in error, error


def test_a_second_writer_is_refused_and_touches_nothing(concurrent):
    process, _, stderr = concurrent["train_base"]
    assert process.returncode == 2, stderr[-3000:]
    error = one_error_line(stderr)
    assert f"--dstore_dir {concurrent['dstore']} is being written by another run" in error
    owner_named(error, concurrent["holder"])
    assert concurrent["left"] == ["dstore.partial"]  # no datastore, no --output_dir, no dataset
    assert concurrent["staged"] == {"progress.json": '{"the first run": "its rows so far"}'}


def test_a_refused_lock_ends_a_whole_accelerate_launch(concurrent):
    """The main process is refused the lock; the launch ends (no process waits forever) with the clear error."""
    process, _, stderr = concurrent["launch"]
    assert process.returncode != 0
    error = one_error_line(stderr)
    assert f"--output_dir {concurrent['dataset']} is being written by another run" in error
    owner_named(error, concurrent["holder"])
    assert "dataset" not in concurrent["left"] and "dataset.partial" not in concurrent["left"]


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(concurrent, tiny_lm, capfd):
    dataset, dead = concurrent["dataset"], concurrent["holder"].pid
    assert json.loads(owner_file(dataset).read_text())["pid"] == dead  # left behind by the SIGKILL
    preprocess(["--tokenizer_path", str(tiny_lm["model"]), "--train_file", str(tiny_lm["root"] / "train.txt"),
                "--output_dir", str(dataset), "--block_size", "32", "--stride", "16"])
    warning = [line for line in capfd.readouterr().err.splitlines() if "Taking over the lock" in line]
    assert len(warning) == 1 and f"pid {dead}" in warning[0] and f"process {dead} on this host is dead" in warning[0]
    assert (dataset / "meta.json").is_file() and not owner_file(dataset).exists()


# ---------------------------------------------------------------------------------------------------
# 5. NaN and infinities: in flags, in results, in weights


@pytest.mark.parametrize("entry,argv,message", [
    (knnlm.main, ["--dstore_dir", "D", "--output_dir", "O", "--knn_temp", "nan"], "--knn_temp must be a finite number"),
    (knnlm.main, ["--dstore_dir", "D", "--output_dir", "O", "--lmbda", "0.25", "nan"], "--lmbda must be a finite number"),
    (evaluate_joint.main, ["--knn_generator_path", "M", "--output_dir", "O", "--knn_temp", "inf"],
     r"--memory_temp \(--knn_temp\) must be a finite number"),
    (saveKNNMulti.main, ["--dstore_path", "D", "--output_path", "O", "--knn_temp", "nan"],
     "--knn_temp must be a finite number"),
    (eval_qa.main, ["--data_file", "Q.jsonl", "--output_dir", "O", "--knn_temp", "nan"],
     r"--memory_temp \(--knn_temp\) must be a finite number"),
    (generation_example.main, ["--prompt", "a", "--knn_temp", "nan"],
     r"--memory_temp \(--knn_temp\) must be a finite number"),
    (train_mlpmem_offline.main, ["--knn_dstore_path", "D", "--knn_save_path", "T", "--output_dir", "O",
                                 "--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
    (train_mlpmem_offline.main, ["--knn_dstore_path", "D", "--knn_save_path", "T", "--output_dir", "O",
                                 "--learning_rate", "-0.001"], "--learning_rate must be > 0"),
    (train_base.main, ["--do_eval", "--output_dir", "O", "--weight_decay", "nan"], "--weight_decay must be a finite number"),
    (train_base.main, ["--do_train", "--output_dir", "O", "--learning_rate", "-0.0001"], "--learning_rate must be > 0"),
], ids=["knnlm-knn_temp-nan", "knnlm-lmbda-nan", "evaluate_joint-knn_temp-inf", "saveKNNMulti-knn_temp-nan",
        "eval_qa-knn_temp-nan", "demo-knn_temp-nan", "offline-max_grad_norm-nan", "offline-learning_rate-negative",
        "train_base-weight_decay-nan", "train_base-learning_rate-negative"])
def test_non_finite_and_negative_flags_are_refused(tiny_lm, entry, argv, message):
    extra = model_flags(tiny_lm) if entry in (knnlm.main, evaluate_joint.main, train_base.main) else []
    extra = ["--model_name_or_path", str(tiny_lm["model"])] if entry is eval_qa.main else extra
    with pytest.raises(UsageError, match=message):
        entry([*extra, *argv])


def test_a_memory_with_nan_weights_is_refused_at_load(tiny_lm, memory_dir, tmp_path):
    poisoned = damaged_copy(memory_dir, tmp_path / "memory", "nan")
    with pytest.raises(ArtifactError, match=r"--memory .*memory: the memory's weights hold NaN .*model.safetensors"):
        evaluate_joint.main([*model_flags(tiny_lm), "--knn_generator_path", str(poisoned), "--output_dir",
                             str(tmp_path / "out"), "--eval_subset", "test"])
    assert not (tmp_path / "out").exists()


def test_nan_base_weights_give_an_error_not_a_perplexity(tiny_lm, tmp_path):
    """Flipped weight bytes of the base model: train_base and the kNN-LM fail and write no results."""
    poisoned = damaged_copy(tiny_lm["model"], tmp_path / "model", "nan")
    with pytest.raises(ArtifactError, match=r"The base model's log-probabilities are NaN: its weights may be corrupt "
                                            rf"\(--model_name_or_path {re.escape(str(poisoned))}\)"):
        train_base.main([*model_flags(tiny_lm, poisoned), "--do_eval", "--eval_subset", "test", "--max_eval_samples", "2",
                         "--output_dir", str(tmp_path / "eval"), "--report_to", "none"])
    assert not (tmp_path / "eval" / "eval_results.json").exists()
    if not (tiny_lm["dstore"] / "index").exists():
        build_index.main(["--dstore_path", str(tiny_lm["dstore"]), "--index_type", "flat"])
    with pytest.raises(ArtifactError, match="The base model's log-probabilities are NaN"):
        knnlm.main([*model_flags(tiny_lm, poisoned), "--dstore_dir", str(tiny_lm["dstore"]), "--eval_subset", "test",
                    "--max_eval_samples", "2", "--k", "4", "--output_dir", str(tmp_path / "knnlm"),
                    "--allow_base_mismatch"])  # NaN weights are another base: allowed, to reach the perplexity
    assert not (tmp_path / "knnlm" / "knnlm_results.json").exists()


def test_a_nan_memory_perplexity_is_an_error(tiny_lm, memory_dir, tmp_path):
    """A tiny --knn_temp makes the memory's logits overflow to NaN log-probabilities: an error, no joint_results.json."""
    with pytest.raises(ArtifactError, match=r"The memory's log-probabilities are NaN: its weights may be corrupt "
                                            rf"\(--memory {re.escape(str(memory_dir))}\), or --memory_temp "
                                            "1e-45 is too small"):
        evaluate_joint.main([*model_flags(tiny_lm), "--knn_generator_path", str(memory_dir), "--knn_temp", "1e-45",
                             "--eval_subset", "test", "--max_eval_samples", "2", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "joint_results.json").exists()


# ---------------------------------------------------------------------------------------------------
# 10. Clear errors for damaged artifacts and bad inputs


@pytest.fixture
def small_datastore(tmp_path) -> Path:
    return random_datastore(tmp_path / "dstore", rows=64, dim=8, vocab=20, seed=0)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damaged,message", [
    ("keys.npy", r"keys.npy is truncated or corrupt \(expected float16 keys of shape \(64, 8\)"),
    ("meta.json", r"meta.json is truncated or corrupt \(expected the JSON description of a datastore\)"),
])
def test_a_truncated_datastore_file_is_named(small_datastore, damaged, message):
    truncate(small_datastore / damaged)
    with pytest.raises(ArtifactError, match=message):
        build_index.main(["--dstore_path", str(small_datastore), "--index_type", "flat"])


def test_a_truncated_index_is_named_with_or_without_verification(small_datastore, tmp_path):
    build_index.main(["--dstore_path", str(small_datastore), "--index_type", "flat"])
    truncate(small_datastore / "index" / "index.faiss")
    with pytest.raises(ArtifactError, match=r"index.faiss is [\d,]+ bytes, meta.json records [\d,]+"):  # checksums
        saveKNNMulti.main(["--dstore_path", str(small_datastore), "--output_path", str(tmp_path / "targets"), "--k", "4"])
    # Processes that skip the verification (all but one per machine) read it: FAISS's error becomes a named one.
    with pytest.raises(ArtifactError, match=r"index.faiss is missing, truncated or corrupt \(expected a flat index of "
                                            r"64 keys\)"):
        load_index(small_datastore / "index", load_datastore(str(small_datastore), verify=False), verify=False)


@pytest.mark.parametrize("content,message", [
    (b"", r"--train_file .*train.txt is empty"),
    (b"\n  \n\n", "The train split has 0 tokens"),
    (b"w1 w2 \xff\xfe w3\n", r"--train_file .*train.txt is not UTF-8 text \(byte 6"),
], ids=["empty", "blank", "not-utf8"])
def test_an_unusable_corpus_file_leaves_nothing_behind(tiny_lm, tmp_path, content, message):
    corpus = tmp_path / "train.txt"
    corpus.write_bytes(content)
    out = tmp_path / "dataset"
    with pytest.raises(UsageError, match=message):
        preprocess(["--tokenizer_path", str(tiny_lm["model"]), "--train_file", str(corpus), "--output_dir", str(out)])
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_qa_file_that_is_not_utf8_is_named(tiny_lm, tmp_path):
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_bytes(b'{"question": "caf\xe9?", "answer": ["x"]}\n')
    with pytest.raises(UsageError, match=rf"--data_file {re.escape(str(qa_file))} is not UTF-8 text \(byte 17"):
        eval_qa.main(["--model_name_or_path", str(tiny_lm["model"]), "--data_file", str(qa_file),
                      "--output_dir", str(tmp_path / "qa")])


def test_a_corrupt_safetensors_header_is_named(tiny_lm, memory_dir, tmp_path):
    base = damaged_copy(tiny_lm["model"], tmp_path / "base", "header")
    weights = re.escape(str(base / "model.safetensors"))
    with pytest.raises(ArtifactError, match=rf"--model_name_or_path {re.escape(str(base))}: cannot read the weights in "
                                            rf"{weights}: the file is truncated or corrupt"):
        train_base.main([*model_flags(tiny_lm, base), "--do_eval", "--eval_subset", "test", "--output_dir",
                         str(tmp_path / "eval")])
    memory = damaged_copy(memory_dir, tmp_path / "memory", "header")
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text('{"question": "the river?", "answer": ["w1"]}\n')
    with pytest.raises(ArtifactError, match=rf"--memory {re.escape(str(memory))}: cannot read the weights in "
                                            rf"{re.escape(str(memory / 'model.safetensors'))}"):
        eval_qa.main(["--model_name_or_path", str(tiny_lm["model"]), "--data_file", str(qa_file),
                      "--output_dir", str(tmp_path / "qa"), "--use_neural_knn", "--knn_generator_path", str(memory)])
    assert not (tmp_path / "qa").exists()


def test_a_missing_relative_model_directory_is_not_taken_for_a_hub_name(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(UsageError, match="--model_name_or_path outputs/base: no such file or directory"):
        train_base.main([*model_flags(tiny_lm, "outputs/base"), "--do_eval", "--eval_subset", "test", "--output_dir", "eval"])
    with pytest.raises(UsageError, match="--model_name_or_path nowhere/base: not a local directory, and not a hub model"):
        train_base.main([*model_flags(tiny_lm, "nowhere/base"), "--do_eval", "--eval_subset", "test", "--output_dir", "eval"])


def test_an_unwritable_output_is_refused_before_any_work(tiny_lm, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ArtifactError, match=rf"--output_dir {re.escape(str(a_file / 'eval'))}: cannot be written, "
                                            rf"{re.escape(str(a_file))} is a file"):
        train_base.main([*model_flags(tiny_lm), "--do_eval", "--save_knnlm_dstore", "--dstore_dir", str(tmp_path / "ds"),
                         "--output_dir", str(a_file / "eval")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_a_read_only_directory_is_refused_before_any_work(tiny_lm, memory_dir, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match=rf"{re.escape(str(read_only))} is not writable"):
        evaluate_joint.main([*model_flags(tiny_lm), "--knn_generator_path", str(memory_dir), "--output_dir",
                             str(read_only / "out")])


def test_offline_training_checks_its_inputs_before_creating_the_output(tiny_lm, tmp_path):
    out = tmp_path / "memory"
    with pytest.raises(ArtifactError, match="does not exist"):
        train_mlpmem_offline.main(["--knn_dstore_path", str(tiny_lm["dstore"]), "--knn_save_path",
                                   str(tmp_path / "no_targets"), "--output_dir", str(out)])
    assert not out.exists()


def test_meta_json_records_absolute_paths(tiny_lm, tmp_path, monkeypatch):
    """Relative flags from one directory; the dataset and the datastore record where things are for any other."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_lm["model"], tmp_path / "model")
    (tmp_path / "train.txt").write_text((tiny_lm["root"] / "train.txt").read_text())
    preprocess(["--tokenizer_path", "model", "--train_file", "train.txt", "--output_dir", "data", "--block_size", "32",
                "--stride", "16"])
    here = Path.cwd()  # tmp_path with any symbolic link resolved
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["path"] == str(here / "model") and meta["source"]["train_file"] == str(here / "train.txt")
    train_base.main(["--model_name_or_path", "model", "--dataset_name", "data", "--do_eval", "--eval_subset", "train",
                     "--max_eval_samples", "1", "--save_knnlm_dstore", "--dstore_dir", "dstore", "--output_dir", "eval",
                     "--report_to", "none"])
    meta = json.loads((tmp_path / "dstore" / "meta.json").read_text())
    assert meta["model"]["model_name_or_path"] == str(here / "model") and meta["dataset"]["path"] == str(here / "data")
