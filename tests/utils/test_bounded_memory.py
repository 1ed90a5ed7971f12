"""Readers and writers of large artifacts work chunk by chunk: the merged kNN targets' labels and row statistics
are streamed, and give the same bytes and numbers whatever the chunk size."""

from __future__ import annotations

import numpy as np
import pytest

import utils.artifacts.knn_targets as knn_target_files
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.knn_targets import TargetSettings, compute_knn_targets
from tests.knn_fixtures import random_datastore
from utils.artifacts.knn_targets import DATA_FILES

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def test_merged_targets_do_not_depend_on_the_merge_chunk(tmp_path, monkeypatch):
    dstore = random_datastore(tmp_path / "dstore", rows=300, dim=8, vocab=20, seed=0)
    build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    settings = TargetSettings(k=6, knn_temp=1.0)
    whole = compute_knn_targets(str(dstore), str(tmp_path / "whole"), settings=settings)
    monkeypatch.setattr(knn_target_files, "MERGE_ROWS", 7)  # 43 chunks, the last one short
    chunked = compute_knn_targets(str(dstore), str(tmp_path / "chunked"), settings=settings)
    for name in DATA_FILES:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "chunked" / name).read_bytes()
    for field in ("rows", "nnz", "empty_rows", "mean_targets_per_row", "max_targets_in_a_row"):
        assert whole[field] == chunked[field]
    offsets = np.load(tmp_path / "whole" / "offsets.npy")
    assert whole["max_targets_in_a_row"] == np.diff(offsets).max() and whole["empty_rows"] == (np.diff(offsets) == 0).sum()
    assert np.array_equal(np.load(tmp_path / "whole" / "labels.npy"), np.load(dstore / "vals.npy"))
