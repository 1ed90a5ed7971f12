"""knn_utils/index_build.py, knn_utils/index_search.py and knn_utils/build_index.py on seeded random datastores."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from knn_utils import build_index as build_index_cli
from knn_utils import index_build, index_search
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import load_index, select_neighbours
from knn_utils.torch_search import TorchExactSearch
from tests.knn_fixtures import REPO, clustered_keys, random_datastore
from utils.artifacts.datastore import load_datastore
from utils.cli import UsageError

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

RECALL_BOUND = 0.8  # 10-recall@10 of IVFPQ (64 lists, nprobe 16, 16 x 8-bit codes) on clustered 32-d keys: 0.86 measured


def exact_neighbours(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force k nearest rows by squared L2 distance, (n, k)."""
    keys, queries = keys.astype(np.float64), queries.astype(np.float64)
    dists = (queries**2).sum(1)[:, None] + (keys**2).sum(1)[None, :] - 2 * queries @ keys.T  # (n, N)
    return np.argsort(dists, axis=1, kind="stable")[:, :k]


def test_ivfpq_recall_against_exact_search(tmp_path):
    dstore = random_datastore(tmp_path / "ds", rows=20000, dim=32, vocab=100, seed=0)
    meta = build_index(str(dstore), settings=IndexSettings(index_type="ivfpq", ncentroids=64, code_size=16, probe=16,
                                                           train_size=5000, num_keys_to_add_at_a_time=7000),
                       show_progress=False)
    assert meta["rows"] == 20000 and meta["index_type"] == "ivfpq" and meta["probe"] == 16
    datastore = load_datastore(str(dstore))
    queries = np.asarray(datastore.keys[:500], dtype=np.float32) + 0.05  # near, not on, stored keys
    found = load_index(dstore / "index", datastore).search(queries, 10).ids
    truth = exact_neighbours(np.asarray(datastore.keys), queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall > RECALL_BOUND, recall


def test_flat_index_is_exact_and_auto_chooses_it_for_small_datastores(tmp_path, caplog):
    dstore = random_datastore(tmp_path / "ds", rows=600, dim=16, vocab=30, seed=1)
    with caplog.at_level("WARNING"):
        meta = build_index(str(dstore), settings=IndexSettings(num_keys_to_add_at_a_time=250), show_progress=False)
    assert meta["index_type"] == "flat" and "auto chose flat" in caplog.text
    datastore = load_datastore(str(dstore))
    keys = np.asarray(datastore.keys)
    found = load_index(dstore / "index", datastore).search(keys[:50].astype(np.float32), 5)
    np.testing.assert_array_equal(found.ids, exact_neighbours(keys, keys[:50], 5))
    assert (found.ids[:, 0] == np.arange(50)).all()


def test_interrupted_build_resumes_to_the_same_index(tmp_path, monkeypatch):
    dstore = random_datastore(tmp_path / "ds", rows=3000, dim=16, vocab=30, seed=2)
    settings = IndexSettings(index_type="ivfpq", ncentroids=16, code_size=4, nbits=4, num_keys_to_add_at_a_time=700)
    build_index(str(dstore), str(tmp_path / "uninterrupted"), settings, show_progress=False)

    real_encode, calls = index_build.encode_chunk, []

    def dies_at_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(index_build, "encode_chunk", dies_at_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_index(str(dstore), str(tmp_path / "resumed"), settings, show_progress=False)
    assert len(list((tmp_path / "resumed.partial" / "chunks").glob("*.faiss"))) == 2
    monkeypatch.setattr(index_build, "encode_chunk", real_encode)
    build_index(str(dstore), str(tmp_path / "resumed"), settings, show_progress=False)

    assert not (tmp_path / "resumed.partial").exists()
    assert (tmp_path / "resumed" / "index.faiss").read_bytes() == (tmp_path / "uninterrupted" / "index.faiss").read_bytes()


@pytest.mark.parametrize("settings, flag", [
    (IndexSettings(index_type="ivfpq", ncentroids=1000), "--ncentroids"),
    (IndexSettings(index_type="ivfpq", ncentroids=8, code_size=5), "--code_size"),
    (IndexSettings(index_type="ivfpq", ncentroids=64, code_size=4, train_size=40), "--train_size"),
    (IndexSettings(index_type="ivfpq", ncentroids=8, code_size=4, nbits=10), "--nbits"),
])
def test_settings_too_large_for_the_data_are_usage_errors(tmp_path, settings, flag):
    dstore = random_datastore(tmp_path / "ds", rows=500, dim=16, vocab=30, seed=3)
    with pytest.raises(UsageError, match=flag):
        build_index(str(dstore), settings=settings, show_progress=False)
    assert not (dstore / "index").exists()


def test_bad_flags_and_missing_datastore_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--code_size"):
        IndexSettings(code_size=0)
    with pytest.raises(UsageError, match="--dstore_path .* does not exist"):
        build_index(str(tmp_path / "nowhere"))


def test_index_of_another_datastore_is_refused(tmp_path):
    small = random_datastore(tmp_path / "a", rows=300, dim=16, vocab=30, seed=4)
    build_index(str(small), show_progress=False)
    other = load_datastore(str(random_datastore(tmp_path / "b", rows=300, dim=16, vocab=30, seed=5)))
    wider = load_datastore(str(random_datastore(tmp_path / "c", rows=300, dim=8, vocab=30, seed=4)))
    with pytest.raises(UsageError, match="--index_path .* was built over"):
        load_index(small / "index", other)
    with pytest.raises(UsageError, match="dimension 16.*dimension 8"):
        load_index(small / "index", wider)


def test_select_neighbours_sorts_drops_own_row_by_id_and_pads():
    ids = np.array([[7, 3, 5, -1], [2, 9, 4, 1]])
    dists = np.array([[0.5, 0.0, 0.2, 3e38], [0.0, 0.0, 0.4, 0.1]], dtype=np.float32)
    got = select_neighbours(dists, ids, k=3, exclude_rows=np.array([3, 9]))
    np.testing.assert_array_equal(got.ids, [[5, 7, -1], [2, 1, 4]])  # row 1: id 2 ties with own row 9 and stays
    assert np.isinf(got.dists[0, 2]) and got.dists[1, 0] == 0.0


def faiss_flat(keys: np.ndarray) -> faiss.IndexFlatL2:
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.astype(np.float32))
    return index


@pytest.mark.parametrize("blocks", [{}, {"query_rows": 7, "key_rows": 50}, {"max_score_bytes": 3000}])
@pytest.mark.parametrize("k", [1, 10, 400])  # 400: more than the 300 rows
def test_torch_exact_search_matches_faiss_flat(blocks, k):
    keys = clustered_keys(300, 24, seed=7)  # float16 (300, 24)
    queries = np.random.default_rng(7).standard_normal((40, 24)).astype(np.float32)
    queries[:20] = keys[:20] + 0.01 * queries[:20]  # near stored keys, and far from them
    dists, ids = TorchExactSearch(keys, "cpu", load_rows=64, **blocks).search(queries, k)
    expected_dists, expected_ids = faiss_flat(keys).search(queries, k)
    assert dists.shape == ids.shape == (40, k) and dists.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(dists, expected_dists, rtol=1e-4, atol=1e-4)


def test_torch_search_through_knn_index_matches_faiss_with_own_rows_left_out(tmp_path, caplog):
    dstore = random_datastore(tmp_path / "ds", rows=250, dim=16, vocab=30, seed=8)
    build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    datastore = load_datastore(str(dstore))
    with caplog.at_level("INFO", logger="knn_utils.index_search"):
        torch_index = load_index(dstore / "index", datastore, torch_device="cpu")
    assert isinstance(torch_index.index, TorchExactSearch) and torch_index.nprobe is None
    assert "runs in torch on cpu" in caplog.text
    faiss_index = load_index(dstore / "index", datastore)
    queries = np.asarray(datastore.keys[:60], dtype=np.float32)
    for k, exclude_rows in [(5, np.arange(60)), (5, None), (300, np.arange(60))]:  # 300: more than the rows
        got, expected = torch_index.search(queries, k, exclude_rows), faiss_index.search(queries, k, exclude_rows)
        np.testing.assert_array_equal(got.ids, expected.ids)
        np.testing.assert_allclose(got.dists, expected.dists, rtol=1e-4, atol=1e-3)  # FAISS: ~1e-4 off at distance 0
    assert (got.ids[:, -51:] == -1).all() and np.isinf(got.dists[:, -51:]).all()  # 249 neighbours + 51 missing


def test_torch_search_is_chosen_only_for_a_flat_index_without_faiss_gpu(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(index_search.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(index_search.torch.cuda, "mem_get_info", lambda: (0, 1 << 30))  # no room: ranking on the CPU
    monkeypatch.setattr(index_search, "faiss_gpu_available", lambda: False)
    assert index_search.torch_search_device("flat", use_gpu=True) == "cuda"
    assert index_search.torch_search_device("flat", use_gpu=False) is None
    assert index_search.torch_search_device("ivfpq", use_gpu=True) is None
    dstore = random_datastore(tmp_path / "ds", rows=1000, dim=16, vocab=30, seed=9)
    build_index(str(dstore), settings=IndexSettings(index_type="ivfpq", ncentroids=8, code_size=4, nbits=4),
                show_progress=False)
    datastore = load_datastore(str(dstore))
    with caplog.at_level("WARNING"):
        index = load_index(dstore / "index", datastore, use_gpu=True)
    assert isinstance(index.index, faiss.IndexIVFPQ) and "FAISS sees none" in caplog.text
    with pytest.raises(ValueError, match="exact"):
        load_index(dstore / "index", datastore, torch_device="cpu")
    monkeypatch.setattr(index_search, "faiss_gpu_available", lambda: True)
    assert index_search.torch_search_device("flat", use_gpu=True) is None


def test_released_command_line(tmp_path, capsys):
    dstore = random_datastore(tmp_path / "ds", rows=2000, dim=16, vocab=30, seed=6)
    meta = build_index_cli.main(["--dstore_path", str(dstore), "--num_keys_to_add_at_a_time", "1000", "--ncentroids", "16",
                                 "--code_size", "4", "--probe", "4", "--index_type", "ivfpq", "--nbits", "6"])
    assert meta["settings"]["ncentroids"] == 16 and meta["probe"] == 4 and (dstore / "index" / "meta.json").is_file()
    assert meta["datastore"]["keys_sha256"] == load_datastore(str(dstore)).meta["keys_sha256"]
    result = subprocess.run([sys.executable, "-m", "knn_utils.build_index", "--dstore_path", str(dstore),
                             "--index_path", str(tmp_path / "bad"), "--index_type", "ivfpq", "--ncentroids", "5000"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--ncentroids 5000" in result.stderr and "Traceback" not in result.stderr
