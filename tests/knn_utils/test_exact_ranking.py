"""knn_utils/exact_ranking.py: the CPU kernel and the torch ranking against the formula, bit for bit, on data full of
exact ties; the search and the kNN targets through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_utils.exact_ranking import ReadAhead, exact_nearest, rank_candidates
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import candidate_count, load_index, stable_order
from knn_utils.knn_targets import SearchJob, TargetSettings, compute_knn_targets, search_rows
from tests.knn_fixtures import write_datastore
from utils.artifacts.datastore import load_datastore

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def formula_ranking(keys: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ranking as the previous code computed it, in one torch expression: rows sorted, float32
    ``sum((key - q) ** 2)``, a stable sort by distance (so equal distances keep the lower row), -1 last."""
    rows = torch.from_numpy(rows).sort(dim=1).values  # (n, c)
    stored = torch.from_numpy(keys)[rows.clamp(min=0)].float()  # (n, c, d)
    dists = (stored - torch.from_numpy(queries)[:, None, :]).square().sum(dim=2).masked_fill(rows < 0, float("inf"))
    dists, order = dists.sort(dim=1, stable=True)
    return dists[:, :k].numpy(), rows.gather(1, order[:, :k]).numpy()


def tied_keys(rows: int, dim: int, seed: int) -> np.ndarray:
    """float16 keys on a coarse grid (exact ties in any summation order), a sixth of them exact copies of others, a
    few rows of float16 subnormals."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-3, 4, size=(rows, dim)).astype(np.float32) * 0.5
    copies = rng.choice(rows, size=rows // 6, replace=False)
    keys[copies] = keys[rng.choice(rows, size=len(copies))]
    keys[:5] = rng.integers(1, 1024, size=(5, dim)) * 2.0**-24  # subnormal in float16
    return keys.astype(np.float16)


def candidates(num_rows: int, n: int, c: int, seed: int) -> np.ndarray:
    """(n, c) candidate rows in no order, with repeats and some -1 (no candidate)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(-1, num_rows, size=(n, c))
    rows[:, 1] = rows[:, 0]  # the same row twice
    return rows


@pytest.mark.parametrize("dim", [3, 8, 33, 576])
def test_the_cpu_kernel_gives_the_formula_bit_for_bit(dim):
    keys = tied_keys(400, dim, seed=dim)
    queries = np.concatenate([keys[:20].astype(np.float32), np.random.default_rng(1).normal(size=(20, dim)).astype(np.float32)])
    rows = candidates(len(keys), len(queries), 60, seed=2)
    expected_dists, expected_rows = formula_ranking(keys, queries, rows, 50)
    ties = (np.diff(expected_dists, axis=1) == 0).sum()
    assert ties > 100  # equal distances: the lower row must come first
    for threads, block_bytes in [(1, 1 << 23), (3, 1 << 23), (2, 4 * 60 * dim * 3)]:  # the last: 3 queries per block
        dists, found = rank_candidates(keys, queries, rows, 50, threads=threads, block_bytes=block_bytes)
        np.testing.assert_array_equal(found, expected_rows)
        assert dists.tobytes() == expected_dists.tobytes()


def test_every_float16_value_is_converted_exactly():
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    values = values[np.isfinite(values)]  # 63,488 values, zeros and subnormals included
    keys = values[: len(values) // 8 * 8].reshape(-1, 8)  # (7936, 8)
    queries = np.array([np.zeros(8), np.full(8, 1e-3)], dtype=np.float32)
    rows = np.tile(np.arange(len(keys)), (2, 1))
    expected_dists, expected_rows = formula_ranking(keys, queries, rows, len(keys))
    dists, found = rank_candidates(keys, queries, rows, len(keys))
    np.testing.assert_array_equal(found, expected_rows)
    assert dists.tobytes() == expected_dists.tobytes()


def test_fewer_candidates_than_k_come_back_as_no_neighbour():
    keys = tied_keys(50, 8, seed=0)
    dists, found = rank_candidates(keys, keys[:4].astype(np.float32), np.array([[3, -1, 7]] * 4), 5)
    assert found.shape == dists.shape == (4, 5)
    assert (found[:, 2:] == -1).all() and np.isinf(dists[:, 2:]).all()
    assert sorted(found[0, :2]) == [3, 7]


def test_the_torch_ranking_on_the_cpu_is_the_kernel():
    """`exact_nearest` is the GPU's ranking; run on the CPU it must give the kernel's bits (one code path, two devices)."""
    keys = tied_keys(300, 40, seed=5)
    queries = np.random.default_rng(6).normal(size=(30, 40)).astype(np.float32)
    rows = candidates(len(keys), len(queries), 70, seed=7)
    dists, found = exact_nearest(torch.from_numpy(keys), torch.from_numpy(queries), torch.from_numpy(rows), 64,
                                 max_bytes=6 * 70 * 40 * 4)  # blocks of 4 queries
    expected_dists, expected_rows = rank_candidates(keys, queries, rows, 64)
    np.testing.assert_array_equal(found.numpy(), expected_rows)
    assert dists.numpy().tobytes() == expected_dists.tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_ranking_does_not_depend_on_the_other_queries():
    keys = tied_keys(3000, 576, seed=8)
    queries = np.random.default_rng(9).normal(size=(150, 576)).astype(np.float32)
    rows = candidates(len(keys), len(queries), 300, seed=10)
    device_keys, device_queries, device_rows = (torch.from_numpy(a).cuda() for a in (keys, queries, rows))
    whole = exact_nearest(device_keys, device_queries, device_rows, 256)
    for size in (1, 7, 100):
        parts = [exact_nearest(device_keys, device_queries[s : s + size], device_rows[s : s + size], 256)
                 for s in range(0, len(queries), size)]
        for got, expected in zip((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), whole):
            assert torch.equal(got, expected)


def test_stable_order_is_a_stable_argsort():
    rng = np.random.default_rng(11)
    values = rng.choice(np.array([-2.5, -0.0, 0.0, 1.0, 1.0, 3.5, np.inf, -np.inf, np.nan], dtype=np.float32),
                        size=(50, 40))
    values[:10] = rng.normal(size=(10, 40)).astype(np.float32)
    expected = np.argsort(values, axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(stable_order(values, 25), expected)


@pytest.fixture(scope="module")
def tied_ivfpq(tmp_path_factory):
    """1,200 tied keys of width 16 with random values below 12, an IVFPQ index and an exact one."""
    keys = tied_keys(1200, 16, seed=12)
    vals = np.random.default_rng(13).integers(12, size=len(keys)).astype(np.int32)
    dstore = write_datastore(tmp_path_factory.mktemp("tied") / "ds", keys, vals)
    build_index(str(dstore), settings=IndexSettings(index_type="ivfpq", ncentroids=8, code_size=4, nbits=6), show_progress=False)
    build_index(str(dstore), str(dstore / "flat"), IndexSettings(index_type="flat"), show_progress=False)
    return dstore


@pytest.mark.parametrize("index_name", ["index", "flat"])
def test_targets_are_byte_identical_for_any_batch_size_and_ranking_device(tied_ivfpq, tmp_path, index_name):
    """The CPU kernel at 5 and 64 queries per search, and the torch ranking (the GPU's, here on the CPU)."""
    runs = {"b5": {"batch_size": 5}, "b64": {"batch_size": 64}, "torch": {"batch_size": 64, "rerank_device": "cpu"}}
    for name, run in runs.items():
        settings = TargetSettings(k=20, knn_temp=2.0, probe=4, batch_size=run["batch_size"], chunk_rows=320)
        compute_knn_targets(str(tied_ivfpq), str(tmp_path / name), index_path=str(tied_ivfpq / index_name),
                            settings=settings, rerank_device=run.get("rerank_device"))
    for name in ("offsets", "token_ids", "probs", "labels"):
        assert len({(tmp_path / run / f"{name}.npy").read_bytes() for run in runs}) == 1, name


def test_the_index_ranks_candidates_like_the_formula(tied_ivfpq):
    datastore = load_datastore(str(tied_ivfpq))
    index = load_index(tied_ivfpq / "index", datastore, probe=4)
    queries, own = np.asarray(datastore.keys[:100], dtype=np.float32), np.arange(100)
    proposed = index.search(queries, candidate_count(30), own, exact=False).ids  # what the exact ranking re-ranks
    found = index.search(queries, 30, own)
    expected_dists, expected_rows = formula_ranking(np.asarray(datastore.keys), queries, proposed, 30)
    np.testing.assert_array_equal(found.ids, expected_rows)
    assert found.dists.tobytes() == expected_dists.tobytes()
    on_torch = load_index(tied_ivfpq / "index", datastore, probe=4, rerank_device="cpu")
    assert on_torch.rerank_device.type == "cpu" and on_torch.rerank_keys is not None
    np.testing.assert_array_equal(on_torch.search(queries, 30, own).ids, found.ids)


def test_faiss_ranking_of_ivfpq_is_batch_independent_with_ties_to_the_lower_row(tied_ivfpq, tmp_path):
    """``--recompute_dists False`` reads no keys: IVFPQ's own distances are computed per query, and equal ones (exact
    copies have equal codes) are ordered by row."""
    for batch_size in (5, 64):
        settings = TargetSettings(k=20, knn_temp=2.0, probe=4, batch_size=batch_size, chunk_rows=320, recompute_dists=False)
        compute_knn_targets(str(tied_ivfpq), str(tmp_path / f"b{batch_size}"), settings=settings)
    for name in ("offsets", "token_ids", "probs", "labels"):
        assert (tmp_path / "b5" / f"{name}.npy").read_bytes() == (tmp_path / "b64" / f"{name}.npy").read_bytes()
    datastore = load_datastore(str(tied_ivfpq))
    found = load_index(tied_ivfpq / "index", datastore, probe=4).search(
        np.asarray(datastore.keys[:200], dtype=np.float32), 20, np.arange(200), exact=False)
    equal = found.dists[:, 1:] == found.dists[:, :-1]
    assert equal.sum() > 100
    assert (found.ids[:, 1:][equal] > found.ids[:, :-1][equal]).all()


def test_read_ahead_asks_for_the_pages_of_the_candidates_once(tied_ivfpq, tmp_path):
    keys = np.lib.format.open_memmap(tmp_path / "keys.npy", mode="w+", dtype=np.float16, shape=(100, 1100))
    read_ahead = ReadAhead(keys)
    try:
        row_bytes, page = 2200, read_ahead.page
        runs = read_ahead.page_runs(np.array([[7, -1, 7, 50], [8, 99, -1, 50]]))
        expected = sorted({(keys.offset + r * row_bytes + b) // page for r in (7, 8, 50, 99) for b in (0, row_bytes - 1)})
        pages = [first + i for first, count in runs.tolist() for i in range(count)]
        assert pages == expected and (np.diff(runs[:, 0]) > runs[:-1, 1]).all()  # each page once, runs apart, ascending
        read_ahead(np.array([[7, 8, 50]]))  # queues the reads: no error, no result
    finally:
        read_ahead.close()
    datastore = load_datastore(str(tied_ivfpq))
    queries = np.asarray(datastore.keys[:50], dtype=np.float32)
    plain, ahead = (load_index(tied_ivfpq / "index", datastore, probe=4, read_ahead=flag) for flag in (False, True))
    assert plain.read_ahead is None and ahead.read_ahead is not None
    assert load_index(tied_ivfpq / "index", datastore, probe=4).read_ahead is None  # only when asked (bench_scale: slower)
    found, expected_found = ahead.search(queries, 20, np.arange(50)), plain.search(queries, 20, np.arange(50))
    np.testing.assert_array_equal(found.ids, expected_found.ids)
    assert found.dists.tobytes() == expected_found.dists.tobytes()


@pytest.mark.parametrize("index_name, recompute_dists", [("index", False), ("flat", False), ("flat", True)])
def test_targets_built_in_torch_are_those_of_the_cpu_path_on_tied_keys(tied_ivfpq, index_name, recompute_dists):
    """knn_targets.search_rows with the datastore's values on a torch device (what --knn_gpu does where no exact
    ranking follows the search; here on the CPU) gives the NumPy path's targets: the same proposals, ties to the
    lower row, so the same tokens; a probability may move by one float16 step (torch's float64 exp and sums are
    not NumPy's to the last bit, knn_utils/torch_targets.py)."""
    datastore = load_datastore(str(tied_ivfpq))
    index = load_index(tied_ivfpq / index_name, datastore, probe=4)
    settings = TargetSettings(k=20, knn_temp=2.0, probe=4, batch_size=50, recompute_dists=recompute_dists)
    jobs = [SearchJob(index=index, datastore=datastore, queries=datastore, settings=settings, exclude_self=True,
                      device_vals=vals) for vals in (None, torch.from_numpy(np.asarray(datastore.vals)))]
    if recompute_dists:  # the exact torch search on the CPU: the torch path runs after it
        jobs[1].index = load_index(tied_ivfpq / index_name, datastore, torch_device="cpu")
    cpu, in_torch = (search_rows(job, 0, 300) for job in jobs)
    assert cpu.counts.sum() > 300
    np.testing.assert_array_equal(cpu.counts, in_torch.counts)
    np.testing.assert_array_equal(cpu.token_ids, in_torch.token_ids)
    steps = np.abs(cpu.probs.view(np.int16).astype(int) - in_torch.probs.view(np.int16).astype(int))  # float16 ulps
    assert steps.max() <= 1 and (steps == 0).mean() > 0.99
