"""utils/artifacts: each format module writes, reads back and checks its own layout, without the code that produces it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.knn_fixtures import write_datastore
from utils.artifacts.dataset import load_split, write_split
from utils.artifacts.datastore import datastore_summary, load_datastore, open_datastore
from utils.artifacts.knn_targets import (SparseRows, check_labels, check_targets_for_datastore, load_knn_targets,
                                         merge_chunks, missing_chunks, write_chunk)
from utils.cli import UsageError
from utils.io import ArtifactError, write_json
from utils.windows import make_windows


def test_reading_the_formats_and_the_memory_loads_neither_faiss_nor_knn_utils():
    """A fresh interpreter: what the memory's training and the joint model read must not pull in the retrieval code."""
    code = ("import sys, utils.artifacts.dataset, utils.artifacts.datastore, utils.artifacts.knn_targets, models, "
            "models.joint, models.joint.perplexity, models.training.modes\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'faiss', 'knn_utils'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_dataset_split_round_trip_and_count_check(tmp_path):
    tokens = np.arange(50, dtype=np.int32) % 7
    windows = make_windows(len(tokens), block_size=16, stride=8)
    entry, checksums = write_split(tmp_path, "train", tokens, windows)
    assert sorted(checksums) == ["train/tokens.npy", "train/windows.npy"]
    assert entry == {"tokens": 50, "rows": 49, "windows": len(windows), "max_token_id": 6,
                     "tokens_sha256": entry["tokens_sha256"]}
    write_json(tmp_path / "meta.json", {"kind": "dataset", "format_version": 1, "splits": {"train": entry},
                                        "tokenizer": {"fingerprint": "t"}, "block_size": 16, "stride": 8,
                                        "checksums": checksums})
    split = load_split(str(tmp_path), "train")
    assert np.array_equal(split.tokens, tokens) and np.array_equal(split.windows, windows)
    assert split.num_rows == 49
    with pytest.raises(ArtifactError, match="no 'test' split"):
        load_split(str(tmp_path), "test")
    np.save(tmp_path / "train" / "tokens.npy", tokens[:40])  # a file that no longer matches meta.json
    with pytest.raises(ArtifactError, match="40 tokens, meta.json says 50"):
        load_split(str(tmp_path), "train", verify=False)  # behind the checksums, which refuse it first


def test_datastore_round_trip_summary_and_flag_in_errors(tmp_path):
    keys = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float16)
    vals = np.arange(12, dtype=np.int32)
    path = write_datastore(tmp_path / "dstore", keys, vals)
    datastore = load_datastore(str(path))
    assert np.array_equal(datastore.keys, keys) and np.array_equal(datastore.vals, vals)
    summary = datastore_summary(datastore)
    assert (summary["rows"], summary["dim"], summary["path"]) == (12, 4, str(path.resolve()))
    with pytest.raises(ArtifactError, match="^--dstore_path .*missing"):
        open_datastore(tmp_path / "missing", "--dstore_path")


def test_knn_targets_chunks_merge_into_csr_and_read_back(tmp_path):
    vals = np.array([3, 1, 4, 1, 5], dtype=np.int32)
    datastore = load_datastore(str(write_datastore(tmp_path / "dstore", np.zeros((5, 2), np.float16), vals)))
    staging = tmp_path / "targets.partial"
    chunks = [SparseRows(counts=np.array([2, 0, 1]), token_ids=np.array([1, 4, 2], np.int32),
                         probs=np.array([0.25, 0.75, 1.0], np.float16)),
              SparseRows(counts=np.array([1, 1]), token_ids=np.array([0, 5], np.int32), probs=np.array([1, 1], np.float16))]
    write_chunk(staging, 1, chunks[1])
    assert missing_chunks(staging, num_rows=5, chunk_rows=3) == [0]
    with pytest.raises(ArtifactError, match=r"chunks \[0\] were never written"):
        merge_chunks(staging, datastore, chunk_rows=3)
    write_chunk(staging, 0, chunks[0])
    counts = merge_chunks(staging, datastore, chunk_rows=3)
    assert counts["rows"] == 5 and counts["nnz"] == 5 and counts["empty_rows"] == 1
    write_json(staging / "meta.json", {"kind": "knn_targets", "format_version": 1, **counts})
    targets = load_knn_targets(staging)
    assert np.array_equal(targets.offsets, [0, 2, 2, 3, 4, 5]) and np.array_equal(targets.labels, vals)
    ids, probs = targets.row(0)
    assert ids.tolist() == [1, 4] and probs.tolist() == [0.25, 0.75]
    entry_row, token_ids, _ = targets.batch(np.array([4, 0]))
    assert entry_row.tolist() == [0, 1, 1] and token_ids.tolist() == [5, 1, 4]
    check_targets_for_datastore(targets, datastore)  # same rows, same labels: accepted
    with pytest.raises(UsageError, match="gold token of row 2 is 4 but"):
        check_labels(targets, np.array([3, 1, 9, 1, 5]), "the other text")
