"""knn_utils/knn_targets.py and the saveKNNMulti CLI against brute-force numpy on small seeded datastores."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knn_utils import knn_targets as targets_lib
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import load_index
from knn_utils.knn_targets import TargetSettings, compute_knn_targets
from knn_utils.saveKNNMulti import SaveKnnArguments
from tests.knn_fixtures import accelerate_launch, clustered_keys, random_datastore, write_datastore
from utils.artifacts.datastore import load_datastore
from utils.artifacts.knn_targets import load_knn_targets
from utils.cli import UsageError, parse_args

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

VOCAB = 12
FP16_TOLERANCE = 2e-3  # probabilities are stored as float16 (relative precision 1e-3)


@pytest.fixture(scope="module")
def flat_dstore(tmp_path_factory):
    """300 clustered 8-d keys, values below VOCAB (so neighbours share tokens), with an exact index."""
    path = random_datastore(tmp_path_factory.mktemp("flat") / "ds", rows=300, dim=8, vocab=VOCAB, seed=0)
    build_index(str(path), settings=IndexSettings(index_type="flat"), show_progress=False)
    return path


def dense_reference(keys, vals, k, knn_temp, threshold, queries=None) -> np.ndarray:
    """The kNN distribution of every query as a dense (n, VOCAB) float64 array, the slow obvious way."""
    exclude_self = queries is None
    keys = keys.astype(np.float64)
    queries = keys if queries is None else queries.astype(np.float64)
    dists = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # (n, N)
    if exclude_self:
        np.fill_diagonal(dists, np.inf)
    dense = np.zeros((len(queries), VOCAB))
    for i, row in enumerate(dists):
        nearest = np.argsort(row, kind="stable")[:k]
        weights = np.exp(-(row[nearest] - row[nearest].min()) / knn_temp)
        np.add.at(dense[i], vals[nearest], weights / weights.sum())
        keep = dense[i] > threshold
        keep[dense[i].argmax()] = True  # the most likely token is always kept
        dense[i] = np.where(keep, dense[i], 0.0) / dense[i][keep].sum()
    return dense


def densify(targets, rows) -> np.ndarray:
    dense = np.zeros((len(rows), VOCAB))
    for j, i in enumerate(rows):
        ids, probs = targets.row(i)
        dense[j, ids] = probs
    return dense


def settings(**overrides) -> TargetSettings:
    return TargetSettings(**{"k": 10, "knn_temp": 0.5, "batch_size": 64, "chunk_rows": 128, **overrides})


def test_sparse_targets_equal_brute_force(flat_dstore, tmp_path):
    meta = compute_knn_targets(str(flat_dstore), str(tmp_path / "t"), settings=settings(threshold=1e-3))
    targets = load_knn_targets(tmp_path / "t")
    datastore = load_datastore(str(flat_dstore))
    expected = dense_reference(np.asarray(datastore.keys), np.asarray(datastore.vals), 10, 0.5, 1e-3)
    got = densify(targets, range(300))
    np.testing.assert_array_equal(got > 0, expected > 0)
    np.testing.assert_allclose(got, expected, atol=FP16_TOLERANCE)
    np.testing.assert_array_equal(targets.labels, datastore.vals)
    assert meta["rows"] == 300 and meta["nnz"] == (expected > 0).sum() and meta["exclude_self"]
    assert targets.token_ids.dtype == np.int32 and targets.probs.dtype == np.float16 and targets.offsets.dtype == np.int64


def test_max_targets_keeps_the_most_likely(flat_dstore, tmp_path):
    compute_knn_targets(str(flat_dstore), str(tmp_path / "t"), settings=settings(max_targets=2))
    full = densify(load_knn_targets(tmp_path / "t"), range(300))
    datastore = load_datastore(str(flat_dstore))
    reference = dense_reference(np.asarray(datastore.keys), np.asarray(datastore.vals), 10, 0.5, 0.0)
    assert ((full > 0).sum(1) <= 2).all()
    np.testing.assert_array_equal(full.argmax(1), reference.argmax(1))


def test_own_row_is_left_out_but_its_exact_duplicates_are_kept(tmp_path):
    keys = clustered_keys(200, 8, seed=1)
    vals = np.random.default_rng(1).integers(8, VOCAB, size=200).astype(np.int32)
    keys[10] = keys[3]  # a pair of duplicates with different next tokens
    keys[51] = keys[52] = keys[50]  # and a triple
    vals[[3, 10, 50, 51, 52]] = [1, 2, 5, 6, 7]
    dstore = write_datastore(tmp_path / "ds", keys, vals)
    build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    compute_knn_targets(str(dstore), str(tmp_path / "t"), settings=settings(k=4, knn_temp=0.01, batch_size=200))
    targets = load_knn_targets(tmp_path / "t")

    def distribution(row):
        ids, probs = targets.row(row)
        return dict(zip(ids.tolist(), probs.astype(float).tolist()))

    assert distribution(3)[2] > 0.99 and 1 not in distribution(3)
    assert distribution(10)[1] > 0.99 and 2 not in distribution(10)
    assert distribution(50)[6] == pytest.approx(0.5, abs=0.01) and distribution(50)[7] == pytest.approx(0.5, abs=0.01)
    assert 5 not in distribution(50)


def test_rows_sum_to_one_and_batch_matches_row_with_a_partial_ivf_search(tmp_path):
    dstore = random_datastore(tmp_path / "ds", rows=2000, dim=8, vocab=VOCAB, seed=2)
    build_index(str(dstore), settings=IndexSettings(index_type="ivfpq", ncentroids=32, code_size=4, nbits=4, probe=1),
                show_progress=False)
    # k=100 with one list of ~60 keys visited: FAISS returns -1 for the missing neighbours
    compute_knn_targets(str(dstore), str(tmp_path / "t"), settings=settings(k=100, knn_temp=1.0, batch_size=500))
    targets = load_knn_targets(tmp_path / "t")
    counts = np.diff(targets.offsets)
    sums = np.bincount(np.repeat(np.arange(2000), counts), weights=targets.probs.astype(np.float64), minlength=2000)
    np.testing.assert_allclose(sums[counts > 0], 1.0, atol=FP16_TOLERANCE)
    assert targets.meta["empty_rows"] == (counts == 0).sum() < 5 and (targets.token_ids >= 0).all()

    rows = np.array([1999, 0, 5, 5, 1234])
    entry_row, ids, probs = targets.batch(rows)
    for position, row in enumerate(rows):
        row_ids, row_probs = targets.row(row)
        np.testing.assert_array_equal(ids[entry_row == position], row_ids)
        np.testing.assert_array_equal(probs[entry_row == position], row_probs)


def test_interrupted_search_resumes_to_the_identical_artifact(flat_dstore, tmp_path):
    reference_meta = compute_knn_targets(str(flat_dstore), str(tmp_path / "fresh"), settings=settings())
    assert compute_knn_targets(str(flat_dstore), str(tmp_path / "t"), settings=settings(), max_new_chunks=2) is None
    chunks = sorted((tmp_path / "t.partial" / "chunks").iterdir())
    assert len(chunks) == 2 and not (tmp_path / "t").exists()
    for path in chunks[-1].iterdir():  # a torn last chunk: rerun it
        path.unlink()
    chunks[-1].rmdir()
    meta = compute_knn_targets(str(flat_dstore), str(tmp_path / "t"), settings=settings())

    for name in ("offsets", "token_ids", "probs", "labels"):
        assert (tmp_path / "t" / f"{name}.npy").read_bytes() == (tmp_path / "fresh" / f"{name}.npy").read_bytes()
    timing = ("seconds", "search_seconds")
    assert {k: v for k, v in meta.items() if k not in timing} == {k: v for k, v in reference_meta.items() if k not in timing}


def test_two_processes_write_the_same_artifact_as_one(flat_dstore, tmp_path):
    """Also at another --batch_size: 7 queries per search call here, 64 in the single process."""
    compute_knn_targets(str(flat_dstore), str(tmp_path / "one"), settings=settings())
    accelerate_launch("knn_utils.saveKNNMulti", [
        "--dstore_path", str(flat_dstore), "--index_path", str(flat_dstore / "index"), "--output_path", str(tmp_path / "two"),
        "--k", "10", "--knn_temp", "0.5", "--batch_size", "7", "--chunk_rows", "70", "--ignore_first", "True"])
    for name in ("offsets", "token_ids", "probs", "labels"):
        assert (tmp_path / "two" / f"{name}.npy").read_bytes() == (tmp_path / "one" / f"{name}.npy").read_bytes()
    assert load_knn_targets(tmp_path / "two").meta["num_processes"] == 2


def test_val_path_queries_another_datastore_without_exclusion(flat_dstore, tmp_path):
    queries = random_datastore(tmp_path / "val", rows=40, dim=8, vocab=VOCAB, seed=7)
    meta = compute_knn_targets(str(flat_dstore), str(tmp_path / "t"), val_path=str(queries), settings=settings())
    targets = load_knn_targets(tmp_path / "t")
    datastore, val = load_datastore(str(flat_dstore)), load_datastore(str(queries))
    expected = dense_reference(np.asarray(datastore.keys), np.asarray(datastore.vals), 10, 0.5, 1e-8,
                               queries=np.asarray(val.keys))
    np.testing.assert_allclose(densify(targets, range(40)), expected, atol=FP16_TOLERANCE)
    np.testing.assert_array_equal(targets.labels, val.vals)
    assert not meta["exclude_self"] and meta["rows"] == 40


def test_faiss_distances_give_the_same_targets_with_an_exact_index(flat_dstore, tmp_path):
    compute_knn_targets(str(flat_dstore), str(tmp_path / "a"), settings=settings())
    compute_knn_targets(str(flat_dstore), str(tmp_path / "b"), settings=settings(recompute_dists=False))
    a, b = load_knn_targets(tmp_path / "a"), load_knn_targets(tmp_path / "b")
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.probs.astype(float), b.probs.astype(float), atol=FP16_TOLERANCE)


def test_torch_exact_search_gives_the_same_targets_as_faiss(flat_dstore, tmp_path):
    faiss_meta = compute_knn_targets(str(flat_dstore), str(tmp_path / "faiss"), settings=settings())
    torch_meta = compute_knn_targets(str(flat_dstore), str(tmp_path / "torch"), settings=settings(), torch_device="cpu")
    a, b = load_knn_targets(tmp_path / "faiss"), load_knn_targets(tmp_path / "torch")
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.probs.astype(float), b.probs.astype(float), atol=FP16_TOLERANCE)
    assert torch_meta["nnz"] == faiss_meta["nnz"] and torch_meta["index"] == faiss_meta["index"]


def test_ignore_first_parses_true_and_false():
    common = ["--dstore_path", "d", "--output_path", "o"]
    assert parse_args((SaveKnnArguments, TargetSettings), [*common, "--ignore_first", "False"])[1].ignore_first is False
    assert parse_args((SaveKnnArguments, TargetSettings), [*common, "--ignore_first", "True"])[1].ignore_first is True
    args, target_settings = parse_args((SaveKnnArguments, TargetSettings), [*common, "--knn_gpu"])
    assert args.knn_gpu is True and target_settings.ignore_first is True
    assert target_settings.recompute_dists is True  # the exact ranking unless asked otherwise
    assert parse_args((SaveKnnArguments, TargetSettings), [*common, "--recompute_dists", "False"])[1].recompute_dists is False


def test_bad_inputs_are_usage_errors(flat_dstore, tmp_path):
    with pytest.raises(UsageError, match="--k must be"):
        TargetSettings(k=0)
    with pytest.raises(UsageError, match="--dstore_path .* does not exist"):
        compute_knn_targets(str(tmp_path / "nowhere"), str(tmp_path / "t"))
    other = random_datastore(tmp_path / "other", rows=300, dim=8, vocab=VOCAB, seed=9)
    with pytest.raises(UsageError, match="--index_path"):
        compute_knn_targets(str(other), str(tmp_path / "t"), index_path=str(flat_dstore / "index"))
    wider = random_datastore(tmp_path / "wider", rows=30, dim=4, vocab=VOCAB, seed=9)
    with pytest.raises(UsageError, match="--val_path .* dim"):
        compute_knn_targets(str(flat_dstore), str(tmp_path / "t"), val_path=str(wider))


def test_sum_by_token_groups_equal_tokens_per_row():
    tokens = np.array([[3, 1, 3, -1], [2, 2, 2, 2]])
    weights = np.array([[0.2, 0.3, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    rows, group_tokens, sums = targets_lib.sum_by_token(tokens, weights)
    np.testing.assert_array_equal(rows, [0, 0, 0, 1])
    np.testing.assert_array_equal(group_tokens, [-1, 1, 3, 2])
    np.testing.assert_allclose(sums, [0.0, 0.3, 0.7, 1.0])


# ---------------------------------------------------------------------------------------------------
# The same k neighbours for any batching: exact distances, ties to the lower row

GRID = 2.0**-10  # float16's spacing in [1, 2): squared distances between such keys are exact in float32


def tie_keys(clusters: int = 25, size: int = 16, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Clustered float16 keys on a grid, full of exact ties and near-ties (distances one grid step apart),
    with one row in six a copy of another (exact duplicates); float16 (clusters * size, dim).

    Every squared distance between two keys is a small integer times GRID**2, computed exactly in float32
    in any order of summation, so the nearest rows by (distance, row) are well defined.
    """
    rng = np.random.default_rng(seed)
    centres = 1.25 + np.round(0.5 * rng.random((clusters, dim)) / GRID) * GRID
    keys = np.repeat(centres, size, axis=0) + rng.integers(-3, 4, size=(clusters * size, dim)) * GRID
    copies = rng.choice(len(keys), size=len(keys) // 6, replace=False)
    keys[copies] = keys[rng.choice(len(keys), size=len(copies))]
    return keys.astype(np.float16)


def nearest_by_distance_then_row(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: each row's k nearest other rows sorted by (distance, row), and their distances; float64."""
    keys = keys.astype(np.float64)
    dists = ((keys[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # (N, N)
    np.fill_diagonal(dists, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(keys)), dists.shape), dists), axis=1)[:, :k]
    return order, np.take_along_axis(dists, order, axis=1)


@pytest.fixture
def blas_from_20_queries(monkeypatch):
    """FAISS's exact search through BLAS from 20 queries per call (FAISS 1.15 waits for 128,000; older ones
    used 20): its distances, ||q||^2 + ||x||^2 - 2 q.x in float32, then round differently with the batch size."""
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 20)


def test_neighbours_are_the_nearest_by_distance_then_row_for_any_batch_size(tmp_path, blas_from_20_queries):
    keys = tie_keys()
    dstore = write_datastore(tmp_path / "ds", keys, np.zeros(len(keys), dtype=np.int32))
    build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    index = load_index(dstore / "index", load_datastore(str(dstore)))
    k, queries, rows = 6, keys.astype(np.float32), np.arange(len(keys))
    expected_ids, expected_dists = nearest_by_distance_then_row(keys, k)
    ties_at_k = expected_dists[:, -1] == nearest_by_distance_then_row(keys, k + 1)[1][:, -1]
    assert ties_at_k.sum() >= 10  # rows whose k-th neighbour ties with the next: the lower row must win
    assert (expected_dists[:, 0] == 0).sum() >= 50  # rows with an exact duplicate elsewhere
    for batch_size in (1, 7, 64):
        found = [index.search(queries[s : s + batch_size], k, rows[s : s + batch_size]) for s in range(0, len(keys), batch_size)]
        np.testing.assert_array_equal(np.concatenate([f.ids for f in found]), expected_ids)
        np.testing.assert_array_equal(np.concatenate([f.dists for f in found]), expected_dists.astype(np.float32))
    faiss_order = np.concatenate([index.search(queries[s : s + 64], k, rows[s : s + 64], exact=False).ids
                                  for s in range(0, len(keys), 64)])
    assert (faiss_order != expected_ids).any(axis=1).sum() > 50  # what FAISS alone gives at 64 queries per call


def test_targets_are_byte_identical_for_any_batch_size(tmp_path, blas_from_20_queries):
    keys = tie_keys()
    vals = np.random.default_rng(1).integers(VOCAB, size=len(keys)).astype(np.int32)
    dstore = write_datastore(tmp_path / "ds", keys, vals)
    build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    knn_temp = 20 * GRID**2  # a neighbour 20 grid steps further away weighs e times less
    for batch_size in (7, 64):
        compute_knn_targets(str(dstore), str(tmp_path / f"b{batch_size}"),
                            settings=settings(k=6, knn_temp=knn_temp, batch_size=batch_size, chunk_rows=batch_size * 3))
    for name in ("offsets", "token_ids", "probs", "labels"):
        assert (tmp_path / "b7" / f"{name}.npy").read_bytes() == (tmp_path / "b64" / f"{name}.npy").read_bytes()
    expected = dense_reference(keys, vals, 6, knn_temp, 1e-8)  # sorts by (distance, row) too
    got = densify(load_knn_targets(tmp_path / "b7"), range(len(keys)))
    np.testing.assert_array_equal(got > 0, expected > 0)
    np.testing.assert_allclose(got, expected, atol=FP16_TOLERANCE)
