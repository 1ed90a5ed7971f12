"""kNN targets: the distribution a kNN-LM retriever gives each datastore row, stored sparsely (pipeline step 4).

Every datastore key is a query (or every key of a second datastore, ``val_path``). Its ``k`` nearest
rows are searched -- leaving out the query's own row by id -- each weighted by
``softmax(-d / knn_temp)`` over their squared L2 distances, and the weights summed onto the
neighbours' value tokens. Tokens with probability above ``threshold`` (and, optionally, only the
``max_targets`` most likely; the most likely one always) are kept and renormalised to sum to 1.

By default (``recompute_dists``) the neighbours are the ``k`` nearest of the index's candidates by exact
float32 distance to the stored keys, equal distances to the lower row, and are weighted by those
distances (`knn_utils.index_search.KnnIndex.search`): a row's target depends on that row alone, not on
``batch_size`` or the number of processes.

The result is stored sparsely (CSR): utils/artifacts/knn_targets.py holds the layout and reads it.

The rows are cut into chunks of ``chunk_rows``, each searched in fixed batches of ``batch_size``
queries; under ``accelerate launch`` each process takes a contiguous range of chunks and writes each
chunk atomically into ``<output>.partial/chunks/``, so any number of processes gives the same bytes
and a killed run resumes after its last finished chunk. With an index sharded over the processes
(``build_index --index_shards``), each search is a collective step in which every process searches its
shard for all processes' queries (knn_utils/sharded.py); the chunks are split and written as above. The main process then merges the chunks in
row order and renames the directory.

On a GPU (``--knn_gpu``, one unsharded index, the index's own distances or an exact torch search), the work after
each search -- ordering the neighbours, leaving out the query's row, the weights and the sums -- runs there too
(`knn_utils.torch_targets`, the same targets): at k 1024 it costs more than the search on a CPU core. An exact
torch search (``torch_device``) builds its targets on its own device.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from knn_utils.faiss_devices import configure_threads
from knn_utils.index_search import KnnIndex, Neighbours, check_gpu_k, load_index
from knn_utils.torch_search import TorchExactSearch
from knn_utils.torch_targets import torch_sparse_targets
from utils.artifacts.datastore import Datastore, datastore_summary, open_datastore
from utils.artifacts.index import default_index_path
from utils.artifacts.knn_targets import (FORMAT_VERSION, ID_DTYPE, PROB_DTYPE, SparseRows, chunk_dir, merge_chunks,
                                         missing_chunks, write_chunk)
from utils.cli import UsageError, check_finite_floats
from utils.distributed import process_state
from utils.io import ArtifactError, chunk_ranges, partial_path, reuse_staging, timed, write_json
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)


@dataclass
class TargetSettings:
    """How the kNN distribution of each row is computed and stored."""

    k: int = field(default=1024, metadata={"help": "Neighbours per query (after leaving out the query's own row)."})
    knn_temp: float = field(default=16.0, metadata={
        "help": "Temperature T of the kNN distribution: neighbour weights softmax(-d / T) over squared L2 distances "
                "(not the memory's logit temperature, --memory_temp of evaluate_joint and QA)."})
    probe: int | None = field(default=None, metadata={"help": "IVF lists visited per query (default: the index's own, from build_index --probe)."})
    batch_size: int = field(default=16000, metadata={"help": "Queries per FAISS search call."})
    ignore_first: bool = field(
        default=True,
        metadata={"help": "Leave out each query's own datastore row (matched by id, so exact duplicates stay). "
                  "Takes True/False. Does not apply with --val_path."},
    )
    threshold: float = field(default=1e-8, metadata={"help": "Keep the tokens whose kNN probability is above this."})
    max_targets: int | None = field(default=None, metadata={"help": "Keep at most this many tokens per row (the most likely)."})
    recompute_dists: bool = field(
        default=True,
        metadata={"help": "Rank the index's candidates (k plus a margin) by exact float32 distances recomputed from the stored "
                  "keys, ties to the lower row, and weight the neighbours by those: the targets are then the same for any "
                  "--batch_size and number of processes (see knn_utils/index_search.py KnnIndex.search). Takes True/False; False "
                  "(the released default) uses the index's own k nearest and distances, reads no keys, and lets near-ties "
                  "and rounding depend on --batch_size."},
    )
    chunk_rows: int = field(
        default=1_048_576, metadata={"help": "Rows per chunk file (rounded up to a multiple of --batch_size); the unit of resuming."}
    )

    def __post_init__(self):
        check_finite_floats(self)
        for flag in ("k", "batch_size", "chunk_rows"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.knn_temp <= 0:
            raise UsageError(f"--knn_temp must be > 0, got {self.knn_temp}")
        if not 0 <= self.threshold < 1:
            raise UsageError(f"--threshold must be in [0, 1), got {self.threshold}")
        if self.max_targets is not None and self.max_targets < 1:
            raise UsageError(f"--max_targets must be >= 1, got {self.max_targets}")
        if self.probe is not None and self.probe < 1:
            raise UsageError(f"--probe must be >= 1, got {self.probe}")
        self.chunk_rows = -(-self.chunk_rows // self.batch_size) * self.batch_size  # chunks hold whole batches


# ---------------------------------------------------------------------------------------------------
# The distribution of one batch of queries


def neighbour_weights(dists: np.ndarray, valid: np.ndarray, knn_temp: float) -> np.ndarray:
    """``softmax(-d / knn_temp)`` over the valid neighbours of each row, float64 (n, k); 0 where invalid."""
    logits = np.where(valid, -dists.astype(np.float64) / knn_temp, -np.inf)  # (n, k)
    top = logits.max(axis=1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def sum_by_token(tokens: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add up the weights of equal tokens in each row: (n, k), (n, k) -> rows, tokens, sums of the groups.

    Groups come out ordered by row, then token id. Tokens < 0 mark empty slots and form their own group.
    """
    n, k = tokens.shape
    order = np.argsort(tokens, axis=1, kind="stable")
    tokens = np.take_along_axis(tokens, order, axis=1).ravel()  # (n * k,) sorted within each row
    weights = np.take_along_axis(weights, order, axis=1).ravel()
    starts_group = np.ones(n * k, dtype=bool)
    starts_group[1:] = tokens[1:] != tokens[:-1]
    starts_group[::k] = True  # a new row always starts a new group
    starts = np.flatnonzero(starts_group)
    return starts // k, tokens[starts], np.add.reduceat(weights, starts)


def keep_targets(rows: np.ndarray, tokens: np.ndarray, probs: np.ndarray, num_rows: int, threshold: float,
                 max_targets: int | None) -> np.ndarray:
    """Which (row, token) groups to keep: above ``threshold``, among the ``max_targets`` most likely, and
    always the most likely of its row."""
    real = (tokens >= 0) & (probs > 0)
    # rank of each group within its row, most likely first (ties: lower token id first)
    order = np.lexsort((tokens, -probs, rows))
    row_start = np.searchsorted(rows[order], np.arange(num_rows))
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - row_start[rows[order]]
    keep = probs > threshold
    if max_targets is not None:
        keep &= rank < max_targets
    return real & (keep | (rank == 0))


def sparse_targets(neighbours: Neighbours, vals: np.ndarray, knn_temp: float, threshold: float = 1e-8,
                   max_targets: int | None = None) -> SparseRows:
    """The sparse kNN distribution of each query of ``neighbours`` (n rows), renormalised after thresholding."""
    valid = neighbours.valid
    weights = neighbour_weights(neighbours.dists, valid, knn_temp)  # (n, k)
    tokens = np.where(valid, np.asarray(vals[np.where(valid, neighbours.ids, 0)]), -1).astype(np.int64)  # (n, k)
    rows, group_tokens, sums = sum_by_token(tokens, weights)
    num_rows = len(tokens)
    keep = keep_targets(rows, group_tokens, sums, num_rows, threshold, max_targets)
    rows, group_tokens, sums = rows[keep], group_tokens[keep], sums[keep]
    probs = (sums / np.bincount(rows, weights=sums, minlength=num_rows)[rows]).astype(PROB_DTYPE)
    stored = probs > 0  # below float16's smallest value (6e-8) a probability would be stored as 0: drop it
    rows, group_tokens, probs = rows[stored], group_tokens[stored], probs[stored]
    return SparseRows(counts=np.bincount(rows, minlength=num_rows).astype(np.int64),
                      token_ids=group_tokens.astype(ID_DTYPE), probs=probs)


# ---------------------------------------------------------------------------------------------------
# The search over all rows, in resumable chunks


@dataclass
class SearchJob:
    """Everything one process needs to compute chunks."""

    index: KnnIndex
    datastore: Datastore  # searched
    queries: Datastore  # the rows that get a target (the datastore itself, or --val_path)
    settings: TargetSettings
    exclude_self: bool
    device_vals: torch.Tensor | None = None  # the datastore's next tokens on the GPU that builds the targets, if any


def search_rows(job: SearchJob, begin: int, end: int) -> SparseRows:
    """The sparse targets of query rows ``[begin, end)``, one fixed batch after another (the work after each search
    on the GPU when `targets_device` gives one)."""
    settings, parts = job.settings, []
    for start in range(begin, end, settings.batch_size):
        stop = min(start + settings.batch_size, end)
        queries = np.asarray(job.queries.keys[start:stop], dtype=np.float32)  # (b, d)
        exclude = np.arange(start, stop) if job.exclude_self else None
        if job.device_vals is not None:
            shard = job.index.shards[0]  # one shard: targets_device; its proposals as in Shard.search, ties to the lower row
            dists, ids = shard.raw(queries, shard.proposals(settings.k) + (exclude is not None))
            parts.append(torch_sparse_targets(dists, ids, settings.k, job.device_vals, settings.knn_temp, exclude,
                                              settings.threshold, settings.max_targets, lower_row_first=True))
            continue
        neighbours = job.index.search(queries, settings.k, exclude, exact=settings.recompute_dists)
        parts.append(sparse_targets(neighbours, job.datastore.vals, settings.knn_temp, settings.threshold,
                                    settings.max_targets))
    return SparseRows.concatenate(parts)


def targets_device(index: KnnIndex, settings: TargetSettings, use_gpu: bool,
                   torch_device: str | None = None) -> torch.device | None:
    """Where the neighbours are ordered and the targets built in torch (`knn_utils.torch_targets`): the device of an
    exact torch search (``torch_device``), else the GPU when one is asked for and visible; only for an index of one
    shard searched by this process, with its own distances (no exact re-ranking, or an exact torch search). None:
    NumPy on the CPU."""
    exact_torch = isinstance(index.index, TorchExactSearch)
    if index.collective or len(index.shards) != 1 or (settings.recompute_dists and not exact_torch):
        return None
    if torch_device is not None and exact_torch:
        return torch.device(torch_device)
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu and torch.cuda.is_available() else None


def my_chunks(num_chunks: int, rank: int, world_size: int) -> range:
    """The contiguous range of chunk ids process ``rank`` computes."""
    bounds = np.linspace(0, num_chunks, world_size + 1).round().astype(int)
    return range(bounds[rank], bounds[rank + 1])


def run_chunks(job: SearchJob, staging: Path, state, max_new_chunks: int | None) -> None:
    """Compute this process's chunks that are not on disk yet (at most ``max_new_chunks`` of them)."""
    ranges = chunk_ranges(job.queries.num_rows, job.settings.chunk_rows)
    mine = my_chunks(len(ranges), state.process_index, state.num_processes)
    todo = [c for c in mine if not chunk_dir(staging, c).exists()][:max_new_chunks]
    with tqdm(total=sum(ranges[c][1] - ranges[c][0] for c in todo), desc="Searching neighbours", unit="row",
              unit_scale=True, disable=not state.is_main_process) as progress:
        for c in todo:
            begin, end = ranges[c]
            write_chunk(staging, c, search_rows(job, begin, end))
            progress.update(end - begin)
    job.index.finish()  # a sharded index searched by several processes: answer theirs until all are done


def check_queries(queries: Datastore, datastore: Datastore) -> None:
    """Queries from another datastore must live in the same key space (model, layer, tokenizer)."""
    for name in ("dim", "architecture", "layer", "tokenizer_fingerprint", "model"):
        theirs, ours = queries.meta.get(name), datastore.meta.get(name)
        if theirs != ours:
            raise UsageError(f"--val_path {queries.path} has {name} {theirs!r} but the datastore {datastore.path} "
                             f"has {ours!r}: queries and keys must come from the same model, layer and tokenizer")


def prepare_staging(staging: Path, identity: dict, state) -> None:
    """On the main process: keep a staging directory of the same run, wipe any other; then sync."""
    if state.is_main_process and reuse_staging(staging, identity, lambda path: (path / "chunks").mkdir()):
        done = len(list((staging / "chunks").glob("[0-9]*[0-9]")))
        logger.info("Resuming the search in %s: %d chunks already written", staging, done)
    state.wait_for_everyone()


def open_inputs(dstore_path: str, index_path: str | None, val_path: str | None, settings: TargetSettings,
                use_gpu: bool, torch_device: str | None = None, verify: bool = True,
                allow_unverified: bool = False, rerank_device: str | None = None) -> SearchJob:
    """Open and cross-check the datastore, the queries and the index (their files verified, with ``verify``)."""
    datastore = open_datastore(dstore_path, "--dstore_path", verify, allow_unverified)
    queries = datastore if val_path is None else open_datastore(val_path, "--val_path", verify, allow_unverified)
    if val_path is not None:
        check_queries(queries, datastore)
        if settings.ignore_first:
            logger.info("--val_path queries are not datastore rows: there is no own row to leave out (--ignore_first ignored)")
    elif not settings.ignore_first:
        logger.warning("--ignore_first False: each row retrieves itself, so its target contains its own gold token")
    check_gpu_k(settings.k, use_gpu, exact=settings.recompute_dists)
    index = load_index(index_path or default_index_path(dstore_path), datastore, settings.probe, use_gpu, torch_device,
                       verify, allow_unverified, rerank_device)
    if settings.k > datastore.num_rows - (val_path is None and settings.ignore_first):
        logger.warning("--k %d is more neighbours than the datastore can give; rows get fewer", settings.k)
    device = targets_device(index, settings, use_gpu, torch_device)
    if device is not None:
        logger.info("Neighbours ordered and targets built on %s (knn_utils.torch_targets)", device)
    return SearchJob(index=index, datastore=datastore, queries=queries, settings=settings,
                     exclude_self=val_path is None and settings.ignore_first,
                     device_vals=None if device is None else torch.from_numpy(np.asarray(datastore.vals)).to(device))


def compute_knn_targets(dstore_path: str, output_path: str, index_path: str | None = None, val_path: str | None = None,
                        settings: TargetSettings | None = None, use_gpu: bool = False, state=None,
                        max_new_chunks: int | None = None, torch_device: str | None = None,
                        allow_unverified: bool = False, rerank_device: str | None = None) -> dict | None:
    """Compute and store the sparse kNN targets of every query row; return the artifact's meta.

    ``state`` is an ``accelerate.PartialState`` (one is made if not given): each process computes a
    contiguous range of chunks. ``max_new_chunks`` stops each process after that many new chunks,
    leaving the staging directory to resume from (returns None then); tests use it to simulate a kill.
    ``torch_device`` searches an exact index with `TorchExactSearch` on that device, ``rerank_device`` ranks the
    candidates of a FAISS index exactly on that device (see `load_index`).
    The inputs' files are verified once per machine, by its main process, before any process searches (inputs
    without block checksums are refused unless ``allow_unverified``).
    The returned meta is the main process's; other processes get None. The main process holds the lock of
    ``output_path`` (`utils.locking`) for the whole run.
    """
    state = state or process_state()
    with artifact_lock(output_path, "--output_path", state):
        return compute_locked(dstore_path, Path(output_path), index_path, val_path, settings or TargetSettings(),
                              use_gpu, state, max_new_chunks, torch_device, allow_unverified, rerank_device)


def compute_locked(dstore_path: str, output_path: Path, index_path: str | None, val_path: str | None,
                   settings: TargetSettings, use_gpu: bool, state, max_new_chunks: int | None,
                   torch_device: str | None, allow_unverified: bool = False,
                   rerank_device: str | None = None) -> dict | None:
    """`compute_knn_targets` once the main process holds the lock of ``output_path``."""
    if output_path.exists():
        raise ArtifactError(f"--output_path {output_path} already exists; delete it or choose another path")
    start = time.time()
    job = open_inputs(dstore_path, index_path, val_path, settings, use_gpu, torch_device,
                      verify=state.is_local_main_process,  # the others wait in prepare_staging
                      allow_unverified=allow_unverified, rerank_device=rerank_device)
    threads = configure_threads(state.num_processes)
    identity = {
        "datastore": datastore_summary(job.datastore), "queries": datastore_summary(job.queries),
        "index": {"path": str(job.index.path.resolve()), "index_type": job.index.meta["index_type"],
                  "settings": job.index.meta["settings"], "probe": job.index.nprobe},
        "settings": asdict(settings), "exclude_self": job.exclude_self,
    }
    if state.is_main_process:
        logger.info("kNN targets of %d rows: %s; %s index %s; %d processes x %d FAISS threads", job.queries.num_rows,
                    settings, job.index.meta["index_type"], job.index.path, state.num_processes, threads)
    staging = partial_path(output_path)
    prepare_staging(staging, identity, state)
    with timed(f"Searching (process {state.process_index})", logger) as search_time:
        run_chunks(job, staging, state, max_new_chunks)
    state.wait_for_everyone()
    meta = None
    if state.is_main_process and not missing_chunks(staging, job.queries.num_rows, settings.chunk_rows):
        with timed("Merging the chunks", logger):
            counts = merge_chunks(staging, job.queries, settings.chunk_rows)
        meta = {"kind": "knn_targets", "format_version": FORMAT_VERSION, **identity, **counts,
                "k": settings.k, "knn_temp": settings.knn_temp, "threshold": settings.threshold,
                "num_processes": state.num_processes, "search_seconds": round(search_time["seconds"], 3),
                "seconds": round(time.time() - start, 3)}
        if counts["empty_rows"]:
            logger.warning("%d rows found no neighbour and have an empty target", counts["empty_rows"])
        shutil.rmtree(staging / "chunks")
        (staging / "progress.json").unlink()
        write_json(staging / "meta.json", meta)
        os.replace(staging, output_path)
        logger.info("kNN targets written to %s: %d rows, %d entries (%.1f per row)", output_path, counts["rows"],
                    counts["nnz"], counts["mean_targets_per_row"])
    elif state.is_main_process:
        logger.info("Stopped early; rerun the same command to resume from %s", staging)
    state.wait_for_everyone()
    return meta
