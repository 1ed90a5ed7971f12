"""Opening a datastore's FAISS index and searching it: the ``k`` nearest rows of each query, ranked by exact
distance to the stored keys (the default) or by the index's own distances.

An index is one FAISS index (utils/artifacts/index.py) or, built with ``--index_shards``, several, each over a
contiguous range of rows (knn_utils/sharded.py searches those spread over processes). knn_utils/index_build.py
builds it.

Searching an exact (flat) index on a GPU needs faiss-gpu, which pip does not ship; with faiss-cpu,
`knn_utils.torch_search.TorchExactSearch` searches the datastore's keys on the GPU with torch instead and
gives the same neighbours.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from knn_utils.faiss_devices import GPU_MAX_K, faiss_gpu_available, to_device
from knn_utils.sharded import GatheredQueries, ShardExchange, distributed_world, merge_neighbours, shards_of_process
from knn_utils.exact_ranking import ReadAhead, exact_nearest, rank_candidates
from knn_utils.torch_search import TorchExactSearch, keys_on_device
from utils.artifacts.datastore import Datastore
from utils.artifacts.index import index_parts, read_index_file, read_index_meta
from utils.cli import UsageError
from utils.io import timed

logger = logging.getLogger(__name__)

GPU_KEYS_SHARE = 0.5  # the exact ranking runs on the search's GPU when the keys take at most this share of its free memory
KNN_GPU_HELP = ("Search on the GPU: with faiss-gpu, FAISS's GPU index on this process's GPU (one process and several "
                "GPUs: sharded over all of them); with faiss-cpu and an exact (flat) index, an exact torch search on the "
                "CUDA device; otherwise (an IVFPQ index, or no GPU) the CPU. With a GPU, the exact ranking of a FAISS "
                "index's candidates runs there too when the keys fit (knn_utils/exact_ranking.py), and the targets "
                "are built there when no CPU ranking follows the search (knn_utils/torch_targets.py).")


@dataclass
class Neighbours:
    """The ``k`` nearest datastore rows of each query, nearest first; id -1 (distance inf) where none was found."""

    ids: np.ndarray  # int64 (n, k)
    dists: np.ndarray  # float32 (n, k) squared L2 distances (exact ones, unless searched with exact=False)

    @property
    def valid(self) -> np.ndarray:
        return self.ids >= 0  # bool (n, k)


def select_neighbours(dists: np.ndarray, ids: np.ndarray, k: int, exclude_rows: np.ndarray | None = None,
                      lower_row_first: bool = False) -> Neighbours:
    """The ``k`` nearest valid results of a FAISS search, sorted by distance, leaving out ``exclude_rows``.

    ``exclude_rows`` (n,) gives, per query, a datastore row to drop (the query's own row) -- matched by
    id, so an exact duplicate of the query stored under another row is kept. Results are sorted here
    because not every FAISS build returns them sorted; ``-1`` results (fewer hits than asked) are kept
    at the end as id -1 with an infinite distance. Equal distances keep FAISS's order, or, with
    ``lower_row_first``, the lower row first.
    """
    invalid = ids < 0
    if exclude_rows is not None:
        invalid |= ids == np.asarray(exclude_rows, dtype=np.int64)[:, None]
    if lower_row_first:
        by_row = np.argsort(np.where(invalid, np.iinfo(np.int64).max, ids), axis=1, kind="stable")  # (n, m)
        dists, ids, invalid = (np.take_along_axis(a, by_row, axis=1) for a in (dists, ids, invalid))
    order = stable_order(np.where(invalid, np.inf, dists).astype(np.float32), k)  # (n, k)
    keep_invalid = np.take_along_axis(invalid, order, axis=1)
    return Neighbours(
        ids=np.where(keep_invalid, -1, np.take_along_axis(ids, order, axis=1)),
        dists=np.where(keep_invalid, np.inf, np.take_along_axis(dists, order, axis=1)).astype(np.float32),
    )


def stable_order(values: np.ndarray, k: int) -> np.ndarray:
    """The positions of the ``k`` smallest float32 ``values`` of each row (n, m), smallest first, equal values in
    position order: ``np.argsort(values, kind="stable")[:, :k]`` (NaN last), through one sort of 64-bit keys (the
    value's bits, made to order as unsigned integers, above the position), which numpy sorts several times faster."""
    values = np.asarray(values, dtype=np.float32) + np.float32(0)  # -0.0 becomes 0.0: equal, as for argsort
    bits = values.view(np.uint32).astype(np.uint64)
    negative = (bits >> np.uint64(31)).astype(bool)
    bits = np.where(negative, ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))  # order as the floats
    bits[np.isnan(values)] = np.uint64(0xFFFFFFFF)  # NaN last, like argsort
    keys = (bits << np.uint64(32)) | np.arange(values.shape[1], dtype=np.uint64)
    return (np.sort(keys, axis=1)[:, :k] & np.uint64(0xFFFFFFFF)).astype(np.int64)


def candidate_count(k: int) -> int:
    """Rows asked of the index for ``k`` exact neighbours: ``k`` plus a margin (k / 8, at least 8) for the rounding
    of the index's own distances, which changes with the number of queries per search call."""
    return k + max(8, k // 8)


@dataclass
class Shard:
    """One searchable part of an index: a FAISS index (or `TorchExactSearch`) over the datastore rows
    ``[begin, end)``, whose result id ``i`` is the row ``i + id_offset``."""

    searcher: faiss.Index | TorchExactSearch
    begin: int
    end: int
    id_offset: int = 0

    def raw(self, queries: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """The searcher's own ``wanted`` results per query (n, wanted), global row ids, padded with id -1 (distance
        inf) where the shard has fewer rows; not sorted or filtered."""
        asked = min(wanted, self.end - self.begin)
        dists, ids = self.searcher.search(queries, asked)  # (n, asked) each
        if self.id_offset:
            ids = np.where(ids >= 0, ids + self.id_offset, -1)
        if asked < wanted:  # a datastore (shard) smaller than k: pad with "no neighbour"
            pad = ((0, 0), (0, wanted - asked))
            dists, ids = np.pad(dists, pad, constant_values=np.inf), np.pad(ids, pad, constant_values=-1)
        return dists, ids

    def proposals(self, k: int) -> int:
        """Rows asked of the searcher for ``k`` neighbours: ``k`` from `TorchExactSearch` (exact already), else
        `candidate_count` (room for the exact ranking, or for ties at the k-th place decided by row)."""
        return k if isinstance(self.searcher, TorchExactSearch) else candidate_count(k)

    def search(self, rank: Callable[[np.ndarray, np.ndarray, int], Neighbours], queries: np.ndarray, k: int,
               exclude_rows: np.ndarray | None, exact: bool) -> Neighbours:
        """The ``k`` nearest rows of this shard to each query (global row ids), exactly ranked by ``rank`` (queries,
        candidate rows, k): see `KnnIndex.search`."""
        rerank = exact and not isinstance(self.searcher, TorchExactSearch)
        wanted = self.proposals(k)
        dists, ids = self.raw(queries, wanted + (exclude_rows is not None))
        if rerank:
            return rank(queries, select_neighbours(dists, ids, wanted, exclude_rows).ids, k)
        return select_neighbours(dists, ids, k, exclude_rows, lower_row_first=True)


@dataclass
class KnnIndex:
    """An opened index, its meta, and the datastore keys it indexes (for the exact ranking).

    ``shards`` are the parts this process searches: the whole index, or, for an index built with
    ``--index_shards``, the shards this process holds (all of them in a single process). ``collective``: the
    shards are spread over the processes of a ``torch.distributed`` group, so every search is a collective
    step that every process must take (knn_utils/sharded.py), and a process out of queries calls `finish`.
    """

    shards: list[Shard]
    meta: dict
    path: Path
    keys: torch.Tensor  # (N, d) in the stored dtype: a view of the memory-mapped datastore, or a copy on a GPU
    nprobe: int | None = None  # IVF lists visited per query; None for an exact index
    collective: bool = False
    exchange: ShardExchange | None = field(default=None, repr=False)
    rerank_keys: torch.Tensor | None = field(default=None, repr=False)  # (N, d) on the exact ranking's device, if not the CPU
    read_ahead: ReadAhead | None = field(default=None, repr=False)  # reads the candidates' keys from disk ahead of ranking

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def rerank_device(self) -> torch.device:
        """Where the exact ranking runs: the CPU, or the device of ``rerank_keys``."""
        return torch.device("cpu") if self.rerank_keys is None else self.rerank_keys.device

    def rank_exactly(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> Neighbours:
        """Of the candidate rows (n, c >= k; -1 for none), the ``k`` nearest each query (n, d) by exact float32
        distance to the stored keys, equal distances to the lower row (knn_utils/exact_ranking.py): on the CPU, over
        the memory-mapped ``keys`` with as many threads as FAISS's search, or in torch on the device of
        ``rerank_keys``. `TorchExactSearch` ranks the same way."""
        if self.rerank_keys is None:
            if self.read_ahead is not None:
                self.read_ahead(candidates)
            dists, rows = rank_candidates(self.keys.numpy(), queries, candidates, k, threads=faiss.omp_get_max_threads())
            return Neighbours(ids=rows, dists=dists)
        device = self.rerank_keys.device
        dists, rows = exact_nearest(self.rerank_keys, torch.from_numpy(queries).to(device),
                                    torch.from_numpy(candidates).to(device), k)
        return Neighbours(ids=rows.cpu().numpy(), dists=dists.cpu().numpy())

    @property
    def index(self) -> faiss.Index | TorchExactSearch:
        """The searcher of the (first) shard this process holds."""
        return self.shards[0].searcher

    def search(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None = None, exact: bool = True) -> Neighbours:
        """The ``k`` nearest rows of each query (n, d), leaving out ``exclude_rows`` (see `select_neighbours`).

        ``exact`` (the default): the index proposes `candidate_count` rows (one more when ``exclude_rows`` is
        given), and the ``k`` nearest of them by exact float32 distance to the stored keys are kept, equal
        distances to the lower row (`rank_exactly`). The result then depends on each query alone, not on the
        other queries of the call: with an exact index it is the exact ``k`` nearest rows, for any batching.
        With IVFPQ it is the exact ``k`` nearest among the index's best candidates by PQ distance, which are
        themselves computed per query; only when the query's probed lists or the candidates at the margin's
        edge hang on a near-tie in FAISS's float32 arithmetic can the batching still change them.
        `TorchExactSearch` ranks this way already and is not re-ranked.
        ``exact=False``: the index's own ``k`` nearest and its distances (PQ approximations for IVFPQ), equal
        distances to the lower row (the index proposes `candidate_count` rows, so that ties at the k-th place are
        decided by row, not by FAISS's scan order); no keys are read. IVFPQ computes these distances per query
        (FAISS's coarse quantizer uses BLAS only from `faiss.cvar.distance_compute_blas_threshold` queries per
        call, 128,000 in FAISS 1.15), so the result does not depend on the batch either; a flat index's batched
        BLAS distances do, in their last bits.

        A sharded index does this in every shard and merges the shards' lists by distance, equal distances to
        the lower row (`knn_utils.sharded.merge_neighbours`), across processes when ``collective``.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.collective:
            return self.search_local(queries, k, exclude_rows, exact)
        step = self.exchange.gather_queries(queries, exclude_rows, k, exact)
        return self.answer(step, k)

    def search_local(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None, exact: bool) -> Neighbours:
        """`search` over the shards this process holds, one after another, merged."""
        found = [shard.search(self.rank_exactly, queries, k, exclude_rows, exact) for shard in self.shards]
        if len(found) == 1:
            return found[0]
        if not found:  # a process of a group with more processes than shards
            return Neighbours(ids=np.full((len(queries), k), -1, dtype=np.int64),
                              dists=np.full((len(queries), k), np.inf, dtype=np.float32))
        dists, ids = merge_neighbours([f.dists for f in found], [f.ids for f in found], k)
        return Neighbours(ids=ids, dists=dists)

    def answer(self, step: GatheredQueries, k: int) -> Neighbours:
        """Search this process's shards for every process's queries of ``step``, and merge everyone's lists of ours."""
        found = self.search_local(step.queries, step.k, step.exclude_rows, step.exact)  # (N, step.k)
        dists, ids = self.exchange.merge_results(found.dists, found.ids, step.mine, k)
        return Neighbours(ids=ids, dists=dists)

    def finish(self) -> None:
        """A collective index: answer the other processes' searches until every process has called this."""
        if not self.collective:
            return
        empty = np.zeros((0, self.meta["dim"]), dtype=np.float32)
        while not (step := self.exchange.gather_queries(empty, None, 0, False, done=True)).all_done:
            self.answer(step, 0)


def key_tensor(datastore: Datastore) -> torch.Tensor:
    """The datastore's keys as a CPU tensor sharing the read-only memory map (it is only ever read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(datastore.keys))


def torch_search_device(index_type: str, use_gpu: bool) -> str | None:
    """"cuda" when an exact index is wanted on a GPU that FAISS cannot use (faiss-cpu) but torch can, else None."""
    if index_type == "flat" and use_gpu and not faiss_gpu_available() and torch.cuda.is_available():
        return "cuda"
    return None


def rerank_keys_for(datastore: Datastore, use_gpu: bool, rerank_device: str | None) -> torch.Tensor | None:
    """The keys on the device where the exact ranking runs, or None for the CPU (over the memory-mapped keys).

    ``rerank_device`` ("cpu", "cuda:1" ...) says where; by default, with ``use_gpu`` (``--knn_gpu``), this process's
    GPU when the keys take at most `GPU_KEYS_SHARE` of its free memory (whether FAISS searches there, with
    faiss-gpu, or on the CPU, with faiss-cpu), else the CPU, which reads the candidates' keys from the memory map
    and copies nothing. The GPU sums a distance's terms in another order than the CPU: targets computed with and
    without ``--knn_gpu`` can differ in their last bits (each is the same for any batch size and process count).
    """
    if rerank_device is None and use_gpu and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if datastore.keys.nbytes <= GPU_KEYS_SHARE * free:
            rerank_device = f"cuda:{torch.cuda.current_device()}"
        else:
            logger.info("The exact ranking runs on the CPU: the keys (%.1f GB) take more than %.0f%% of the GPU's free "
                        "memory (%.1f GB)", datastore.keys.nbytes / 1e9, 100 * GPU_KEYS_SHARE, free / 1e9)
    if rerank_device is None:
        return None
    with timed(f"Copying {datastore.num_rows} keys to {rerank_device} for the exact ranking", logger):
        return keys_on_device(datastore.keys, rerank_device)


def memory_available() -> int | None:
    """Bytes of memory the kernel can give without swapping (``MemAvailable``, Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def read_ahead_for(datastore: Datastore, read_ahead: bool | None) -> ReadAhead | None:
    """A `ReadAhead` over the datastore's keys when asked (``read_ahead``); else None.

    Not by default: with 23 GB of keys on a 24 GB machine and a cold page cache (benchmarks/bench_scale.py, 20M rows)
    the exact ranking through the plain memory map made 16.1 queries/s and with the reads queued ahead 13.1. When the
    keys take more than half the memory available, the log says what the exact ranking will cost and what
    ``--recompute_dists False`` trades for it."""
    if read_ahead is None:
        read_ahead = False
        available = memory_available()
        if available is not None and datastore.keys.nbytes > available / 2:
            logger.info("The keys (%.1f GB) do not fit in the page cache (%.1f GB available): the exact ranking reads "
                        "most candidate keys from disk (at 20M rows on our 2-core machine 5.5x the time of FAISS's "
                        "ranking, --recompute_dists False, which finds 93%% of the same neighbours; README, 'Scaling "
                        "to WikiText-103')", datastore.keys.nbytes / 1e9, available / 1e9)
    return ReadAhead(datastore.keys) if read_ahead else None


def load_index(index_path: str | os.PathLike, datastore: Datastore, probe: int | None = None,
               use_gpu: bool = False, torch_device: str | None = None, verify: bool = True,
               allow_unverified: bool = False, rerank_device: str | None = None,
               read_ahead: bool | None = None) -> KnnIndex:
    """Open the index of ``datastore`` for searching, with ``probe`` lists per query (default: the one it was built with).

    On the CPU the index file is memory-mapped read-only, so processes on one machine share one copy.
    An exact index asked for on a GPU (``use_gpu``) that FAISS cannot use is searched by `TorchExactSearch`
    on CUDA over the datastore's keys; ``torch_device`` ("cpu", "cuda:1" ...) forces that backend (the index
    file is not read then). With ``verify``, the index file is checked against its block checksums first (an index
    without them is refused unless ``allow_unverified``).
    The exact ranking of a FAISS index's candidates runs where `rerank_keys_for` says (``rerank_device``); on the
    CPU, it reads the candidates' keys ahead from disk where `read_ahead_for` says (``read_ahead``).

    A sharded index (``--index_shards``) under a ``torch.distributed`` group of several processes: this process
    opens only its shards (`knn_utils.sharded.shards_of_process`) and searches collectively; in one process,
    all the shards. With faiss-gpu and one process, the index is spread over all the GPUs FAISS sees (an
    unsharded one through FAISS's own sharding, shard ``s`` of a sharded one on GPU ``s`` mod their number).
    """
    index_path = Path(index_path)
    meta = read_index_meta(index_path, datastore)
    if meta["index_type"] == "flat" and probe is not None:
        logger.info("--probe %d does not apply: %s is an exact (flat) index", probe, index_path)
    rank, world_size = distributed_world()
    parts = index_parts(meta)
    sharded = len(parts) > 1
    held = [parts[s] for s in shards_of_process(len(parts), rank, world_size)] if sharded else parts
    if sharded:
        logger.info("%s has %d shards; process %d of %d searches %s", index_path, len(parts), rank, world_size,
                    ", ".join(part["file"] for part in held) or "none (more processes than shards)")
    device = torch_device or torch_search_device(meta["index_type"], use_gpu)
    common = {"meta": meta, "path": index_path, "collective": sharded and world_size > 1}
    if common["collective"]:
        common["exchange"] = ShardExchange()
    if device is not None:
        if meta["index_type"] != "flat":
            raise ValueError(f"torch_device {device!r}: the torch search is exact, but {index_path} is an "
                             f"{meta['index_type']} index")
        logger.info("Exact search of %s runs in torch on %s, over the datastore's keys%s", index_path, device,
                    "" if torch_device else " (FAISS has no GPU here: faiss-cpu)")
        with timed(f"Loading {sum(p['end'] - p['begin'] for p in held)} keys onto {device}", logger):
            shards = [Shard(TorchExactSearch(datastore.keys[p["begin"] : p["end"]], device), p["begin"], p["end"], p["begin"])
                      for p in held]
        keys = shards[0].searcher.keys if not sharded else key_tensor(datastore)
        return KnnIndex(shards=shards, keys=keys, **common)
    nprobe, num_gpus = None, faiss.get_num_gpus() if use_gpu and faiss_gpu_available() else 0
    shards = []
    for position, part in enumerate(held):
        index = read_index_file(index_path, meta, mmap=not use_gpu, verify=verify, part=part,
                                allow_unverified=allow_unverified)
        if meta["index_type"] == "ivfpq":
            if probe is not None and not 1 <= probe <= index.nlist:
                raise UsageError(f"--probe must be between 1 and the index's {index.nlist} lists, got {probe}")
            index.nprobe = nprobe = probe or meta["probe"]
            check_gpu_probe(nprobe, use_gpu)
        if num_gpus > 1 and world_size == 1:  # one process drives every GPU
            index = to_device(index, use_gpu, all_gpus=True) if not sharded else to_device(index, use_gpu, position % num_gpus)
        else:
            index = to_device(index, use_gpu)
        shards.append(Shard(index, part["begin"], part["end"], part["id_offset"]))
    rerank_keys = rerank_keys_for(datastore, use_gpu, rerank_device)
    return KnnIndex(shards=shards, keys=key_tensor(datastore), nprobe=nprobe, rerank_keys=rerank_keys,
                    read_ahead=read_ahead_for(datastore, read_ahead) if rerank_keys is None else None, **common)


def check_gpu_k(k: int, use_gpu: bool, exact: bool = True) -> None:
    """FAISS-GPU returns at most `GPU_MAX_K` rows per query: the ``k`` neighbours (with the margin of an exact
    ranking, `candidate_count`) and the query's own row."""
    asked = candidate_count(k) if exact else k
    if use_gpu and faiss_gpu_available() and asked + 1 > GPU_MAX_K:
        raise UsageError(f"--k {k}: FAISS-GPU returns at most {GPU_MAX_K} rows per query, and --k {k} asks for {asked + 1} "
                         f"({k} neighbours, a margin of {asked - k} for the exact ranking, the query's own row); "
                         f"use --k {max_gpu_k(exact)} or less, or search on the CPU")


def max_gpu_k(exact: bool = True) -> int:
    """The largest ``--k`` `check_gpu_k` lets through."""
    return max(k for k in range(1, GPU_MAX_K) if (candidate_count(k) if exact else k) + 1 <= GPU_MAX_K)


def check_gpu_probe(probe: int, use_gpu: bool) -> None:
    """FAISS-GPU visits at most `GPU_MAX_K` IVF lists per query."""
    if use_gpu and faiss_gpu_available() and probe > GPU_MAX_K:
        raise UsageError(f"--probe {probe}: FAISS-GPU visits at most {GPU_MAX_K} lists per query; use --probe "
                         f"{GPU_MAX_K} or less, or search on the CPU")
