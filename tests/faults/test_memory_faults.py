"""Faults around the memory: planted pickles, killed training, changed settings, stale logs.

Each test fails without its fix (issue "Artifacts you can trust", items 4, 6 and 8). Training runs on the tiny
pipeline of tests/models/test_memory_training.py (tiny GPT-2 -> datastore -> exact kNN targets) with one torch
thread, so that every run of the same settings gives the same bits, in this process or in a killed one.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_mlpmem_offline
from models import MemoryConfig, build_memory, load_memory
from tests.conftest import REPO
from tests.knn_fixtures import cpu_launch_env, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from tests.models.test_memory_training import final_weights, offline_args, pipeline  # noqa: F401  (pipeline: fixture)
from utils.cli import UsageError
from utils.io import ArtifactError


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Same bits in every process, and no thread contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metrics_lines(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "rows_per_second"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b) -> bool:
    a, b = final_weights(a), final_weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------
# Item 6: no pickle from disk


class Planted:
    """Unpickling this creates ``path``: the proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--per_device_train_batch_size", "64",
         "--validation_rows", "64"]


@pytest.fixture(scope="module")
def stopped_run(pipeline, tmp_path_factory):  # noqa: F811
    """A run stopped after step 2, with its checkpoint of step 2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("stopped") / "memory"
    torch.set_num_threads(1)
    assert train_mlpmem_offline.main(offline_args(pipeline, out, *STEPS), stop_after_steps=2) is None
    return out


def checkpoint_of(out):
    (checkpoint,) = sorted((out / "checkpoints").iterdir())
    return checkpoint


def test_a_checkpoint_holds_no_pickle(stopped_run):
    names = sorted(p.name for p in checkpoint_of(stopped_run).iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state_0.json",
                     "rng_state_0.safetensors", "scheduler.json", "trainer_state.json"]


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "notes.txt", "optimizer.safetensors"])
def test_a_planted_pickle_is_refused_and_never_runs(pipeline, stopped_run, tmp_path, name):  # noqa: F811
    """accelerate's names (it loaded custom_checkpoint_0.pkl with weights_only=False: the pickle ran), and pickle
    bytes under a harmless name or in place of one of our files."""
    out = tmp_path / "memory"
    shutil.copytree(stopped_run, out)
    marker = tmp_path / "the_pickle_ran"
    (checkpoint_of(out) / name).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ArtifactError, match=f"pickle format.*{name}.*--overwrite_output_dir"):
        train_mlpmem_offline.main(offline_args(pipeline, out, *STEPS))
    assert not marker.exists()


def test_a_pickled_memory_is_never_loaded(tmp_path):
    """The memory directory is read from safetensors only: a pytorch_model.bin beside config.json is not loaded."""
    memory = tmp_path / "memory"
    build_memory(MemoryConfig.from_preset("tiny", hidden_size=32, vocab_size=42)).save_pretrained(memory)
    (memory / "model.safetensors").unlink()
    marker = tmp_path / "the_pickle_ran"
    (memory / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(UsageError, match="safetensors"):
        load_memory(memory)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Items 6 and 8: a real training process killed with SIGKILL resumes exactly; a restart leaves no stale lines


KILL_RUN = ["--max_train_steps", "240", "--checkpointing_steps", "20", "--save_total_limit", "2",
            "--per_device_train_batch_size", "16", "--validation_rows", "64", "--eval_steps", "60"]


def test_resume_after_sigkill_matches_an_uninterrupted_run(pipeline, tmp_path):  # noqa: F811
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train_mlpmem_offline", *offline_args(pipeline, killed, *KILL_RUN)],
                               cwd=REPO, env={**cpu_launch_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(killed.glob("checkpoints/step-*/trainer_state.json")):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL and not (killed / "meta.json").exists(), "finished before the kill"
    assert len(metrics_lines(killed)) >= 20

    train_mlpmem_offline.main(offline_args(pipeline, killed, *KILL_RUN))  # resumes from its newest checkpoint
    straight = tmp_path / "straight"
    train_mlpmem_offline.main(offline_args(pipeline, straight, *KILL_RUN))
    assert same_weights(straight, killed)
    assert metrics_lines(killed) == metrics_lines(straight)


def test_a_restart_before_the_first_checkpoint_leaves_no_stale_metrics(pipeline, tmp_path):  # noqa: F811
    args = ["--max_train_steps", "4", "--checkpointing_steps", "no", "--per_device_train_batch_size", "64",
            "--validation_rows", "64"]
    restarted = tmp_path / "restarted"
    train_mlpmem_offline.main(offline_args(pipeline, restarted, *args), stop_after_steps=3)
    assert [r["step"] for r in metrics_lines(restarted) if r["type"] == "train"] == [1, 2, 3]
    train_mlpmem_offline.main(offline_args(pipeline, restarted, *args))  # no checkpoint: from step 0 again
    straight = tmp_path / "straight"
    train_mlpmem_offline.main(offline_args(pipeline, straight, *args))
    assert metrics_lines(restarted) == metrics_lines(straight)
    assert [r["step"] for r in metrics_lines(restarted) if r["type"] == "train"] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------
# Item 4: a rerun with other settings does not resume the old run


@pytest.mark.parametrize("flag, value, saved, now", [
    ("--learning_rate", "1e-3", "0.0005", "0.001"),
    ("--alpha", "0.9", "0.5", "0.9"),
    ("--lr_scheduler_type", "cosine", "'linear'", "'cosine'"),
    ("--max_train_steps", "6", "4", "6"),
    ("--memory_dropout", "0.0", "None", "0.0"),
])
def test_a_rerun_with_other_settings_is_refused(pipeline, stopped_run, tmp_path, flag, value, saved, now):  # noqa: F811
    out = tmp_path / "memory"
    shutil.copytree(stopped_run, out)
    args = offline_args(pipeline, out, *STEPS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(UsageError, match=rf"another run.*{flag} {saved} in the checkpoint, {now} now.*--overwrite_output_dir"):
        train_mlpmem_offline.main(args)


def test_logging_settings_may_change_on_resume(pipeline, stopped_run, tmp_path):  # noqa: F811
    out = tmp_path / "memory"
    shutil.copytree(stopped_run, out)
    train_mlpmem_offline.main(offline_args(pipeline, out, *STEPS, "--logging_steps", "3", "--save_total_limit", "3",
                                           "--eval_steps", "1", "--per_device_eval_batch_size", "7"))
    assert json.loads((out / "meta.json").read_text())["results"]["train_steps"] == 4
