"""A stage killed with SIGKILL in mid-run and rerun redoes only the work it had not finished, and ends with
the bytes (and the perplexity) of a run that was never interrupted.

Each test runs the real entry point in a subprocess, slowed by a pause after each unit of work
(tests/faults/instrumented.py) so that polling the files it writes can kill it part-way, then reruns
the same command and counts the work that goes through the model, the search or the encoder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import train_base
from knn_utils import build_index as build_index_cli
from knn_utils import index_build
from knn_utils import knn_targets as targets_lib
from knn_utils import saveKNNMulti
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import KnnIndex
from tests.faults.instrumented import count_lm_windows
from tests.knn_fixtures import REPO, accelerate_launch, cpu_launch_env, random_datastore
from utils.artifacts.datastore import load_datastore
from utils.io import chunk_ranges, partial_path, read_json
from utils.windows import ROW_BEGIN, ROW_END

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

PAUSE_SECONDS = "0.2"  # after each unit of work in the killed run: room to kill it part-way on a busy machine


def run_until_killed(args: list[str], progress: Callable[[], int], at_least: int, timeout: float = 300) -> None:
    """Run ``python -m tests.faults.instrumented ARGS`` and SIGKILL its whole process group as soon as
    ``progress()`` reaches ``at_least``. Fails if the run ends (or the time runs out) before that."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.faults.instrumented", *args], cwd=REPO,
                                   env=cpu_launch_env(), stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if progress() >= at_least:
                os.killpg(process.pid, signal.SIGKILL)
                assert process.wait() == -signal.SIGKILL
                return
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGKILL)
        log.seek(0)
        pytest.fail(f"the run ended (exit status {process.wait()}) before it could be killed:\n{log.read()[-3000:]}")


def record_calls(monkeypatch, owner, name: str, record: Callable) -> list:
    """Wrap ``owner.name``: each call appends ``record(*args)`` to the returned list, then runs the real one."""
    calls, real = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


# ---------------------------------------------------------------------------------------------------
# train_base: the datastore and the perplexity of the same pass


def eval_flags(model_dir: Path, dataset: Path, out: Path, dstore: Path) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--do_eval", "--eval_subset", "train",
            "--per_device_eval_batch_size", "3", "--output_dir", str(out), "--save_knnlm_dstore", "--dstore_dir",
            str(dstore), "--report_to", "none"]


def windows_done(staging: Path) -> int:
    try:
        return int(np.load(staging / "done_windows.npy", mmap_mode="r").sum())
    except (OSError, ValueError, EOFError):  # not there yet, or still being created
        return 0


def test_datastore_rerun_after_a_kill_scores_only_the_windows_left(tiny_gpt2_dir, tiny_dataset, tmp_path):
    reference = train_base.main(eval_flags(tiny_gpt2_dir, tiny_dataset, tmp_path / "ref", tmp_path / "ref_ds"))
    staging = partial_path(tmp_path / "ds")
    run_until_killed(["--pause_after", "utils.artifacts.datastore:DatastoreWriter.write", PAUSE_SECONDS, "train_base",
                      *eval_flags(tiny_gpt2_dir, tiny_dataset, tmp_path / "killed", tmp_path / "ds")],
                     lambda: windows_done(staging), at_least=6)
    done = np.load(staging / "done_windows.npy")
    windows = np.load(tiny_dataset / "train" / "windows.npy")
    assert 6 <= done.sum() < len(done) - 6
    shutil.copytree(staging, partial_path(tmp_path / "ds2"))  # the same interrupted run, resumed below by 2 processes

    with count_lm_windows() as scored:
        resumed = train_base.main(eval_flags(tiny_gpt2_dir, tiny_dataset, tmp_path / "one", tmp_path / "ds"))
    assert scored[0] == (~done).sum()  # every window not written before the kill, and no other
    assert resumed["eval_resumed_rows"] == (windows[done, ROW_END] - windows[done, ROW_BEGIN]).sum()
    assert resumed["perplexity"] == reference["perplexity"] and resumed["eval_loss"] == reference["eval_loss"]
    assert same_files(tmp_path / "ds", tmp_path / "ref_ds", ("keys.npy", "vals.npy"))

    counts = tmp_path / "windows_scored_per_process.txt"
    accelerate_launch("tests.faults.instrumented", ["--count_windows", str(counts), "train_base",
                                                    *eval_flags(tiny_gpt2_dir, tiny_dataset, tmp_path / "two", tmp_path / "ds2")])
    two = read_json(tmp_path / "two" / "eval_results.json")
    per_process = [int(line) for line in counts.read_text().split()]
    assert len(per_process) == 2 and sum(per_process) == (~done).sum()
    assert two["num_processes"] == 2 and two["eval_resumed_rows"] == resumed["eval_resumed_rows"]
    assert two["perplexity"] == reference["perplexity"]
    assert same_files(tmp_path / "ds2", tmp_path / "ref_ds", ("keys.npy", "vals.npy"))
    assert load_datastore(str(tmp_path / "ds2")).meta["keys_sha256"] == load_datastore(str(tmp_path / "ref_ds")).meta["keys_sha256"]


# ---------------------------------------------------------------------------------------------------
# The kNN target search and the index build: chunks on disk are not computed again


def chunks_on_disk(chunks: Path, pattern: str) -> int:
    return len(list(chunks.glob(pattern))) if chunks.is_dir() else 0


def test_knn_target_rerun_after_a_kill_searches_only_the_chunks_left(tmp_path, monkeypatch):
    dstore = random_datastore(tmp_path / "ds", rows=400, dim=8, vocab=12, seed=0)
    build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    flags = ["--dstore_path", str(dstore), "--k", "8", "--knn_temp", "0.5", "--batch_size", "32", "--chunk_rows", "64"]
    saveKNNMulti.main([*flags, "--output_path", str(tmp_path / "ref")])
    chunks = partial_path(tmp_path / "t") / "chunks"
    run_until_killed(["--pause_after", "knn_utils.knn_targets:write_chunk", PAUSE_SECONDS, "knn_utils.saveKNNMulti",
                      *flags, "--output_path", str(tmp_path / "t")], lambda: chunks_on_disk(chunks, "[0-9]*[0-9]"), at_least=2)
    ranges = chunk_ranges(400, 64)
    done = [c for c in range(len(ranges)) if (chunks / f"{c:06d}").is_dir()]
    assert 2 <= len(done) < len(ranges)

    searched_chunks = record_calls(monkeypatch, targets_lib, "search_rows", lambda job, begin, end: begin // 64)
    searched_queries = record_calls(monkeypatch, KnnIndex, "search", lambda index, queries, *args, **kwargs: len(queries))
    saveKNNMulti.main([*flags, "--output_path", str(tmp_path / "t")])
    assert sorted(searched_chunks) == [c for c in range(len(ranges)) if c not in done]
    assert sum(searched_queries) == sum(ranges[c][1] - ranges[c][0] for c in searched_chunks)
    assert same_files(tmp_path / "t", tmp_path / "ref", ("offsets.npy", "token_ids.npy", "probs.npy", "labels.npy"))


def test_index_rerun_after_a_kill_encodes_only_the_chunks_left(tmp_path, monkeypatch):
    dstore = random_datastore(tmp_path / "ds", rows=3000, dim=16, vocab=30, seed=2)
    flags = ["--dstore_path", str(dstore), "--index_type", "ivfpq", "--ncentroids", "16", "--code_size", "4", "--nbits", "4",
             "--num_keys_to_add_at_a_time", "500"]
    build_index_cli.main([*flags, "--index_path", str(tmp_path / "ref")])
    chunks = partial_path(tmp_path / "index") / "chunks"
    run_until_killed(["--pause_after", "knn_utils.index_build:write_index_atomically", PAUSE_SECONDS, "knn_utils.build_index",
                      *flags, "--index_path", str(tmp_path / "index")], lambda: chunks_on_disk(chunks, "*.faiss"), at_least=2)
    done = chunks_on_disk(chunks, "*.faiss")
    assert 2 <= done < 6

    encoded = record_calls(monkeypatch, index_build, "encode_chunk", lambda trained_index, keys, first_id, use_gpu: first_id // 500)
    trained = record_calls(monkeypatch, index_build, "train", lambda *args: 1)
    build_index_cli.main([*flags, "--index_path", str(tmp_path / "index")])
    assert encoded == list(range(done, 6)) and trained == []  # the trained index on disk is reused, not retrained
    assert same_files(tmp_path / "index", tmp_path / "ref", ("index.faiss",))
