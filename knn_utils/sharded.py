"""Searching an index sharded by rows across the processes of a ``torch.distributed`` group.

An index built with ``build_index --index_shards N`` is N indexes over contiguous row ranges of one datastore
(utils/artifacts/index.py). Under ``accelerate launch`` / ``torchrun`` with P processes, process ``r`` opens
only the shards of `shards_of_process` (with P = N: shard ``r``), and every search is a collective step:

1. every process's queries (and the rows to leave out) are all-gathered, so each process holds the whole
   batch of every process (`ShardExchange.gather_queries`);
2. each process searches its shards for that whole batch (`knn_utils.index_search.KnnIndex.search_local`: per shard,
   the candidates are re-ranked by exact distance to the stored keys, as for an unsharded index);
3. the (rows, k) lists of every process are all-gathered and each process merges those of its own queries
   (`merge_neighbours`): nearest first by distance, equal distances to the lower global row.

With exact (flat) shards the merged lists are exactly the ``k`` nearest rows of the whole datastore, ties to the
lower row: the neighbours, and so the kNN targets and the kNN-LM perplexity, are those of one unsharded index,
for any number of processes (one process searches all its shards in turn and merges them the same way).
IVFPQ shards each have their own coarse quantizer and product quantizer, trained on their own rows: the
candidates differ from those of one IVFPQ index over all rows (each shard proposes its own best ``k`` plus a
margin, so the union holds more candidates than one index would), but they are re-ranked exactly in the same
way, and the result again does not depend on the number of processes.

Processes that run out of queries before the others (an uneven split of the rows, or a resumed run) keep
answering the others' steps in `ShardExchange`-driven `KnnIndex.finish` until every process is done.
Tensors travel over the group's backend: gloo on CPU, NCCL on the process's GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """This process's rank and the number of processes of the default ``torch.distributed`` group ((0, 1) without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shards_of_process(num_shards: int, rank: int, world_size: int) -> range:
    """The contiguous range of shards process ``rank`` of ``world_size`` holds (empty when there are more processes
    than shards)."""
    bounds = np.linspace(0, num_shards, world_size + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def merge_neighbours(dists: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest of several (n, k_i) lists of the same n queries, by distance, equal distances to the lower
    row; id -1 (distance inf) stands for no neighbour and comes last. Returns float32 (n, k) and int64 (n, k)."""
    dists, ids = np.concatenate(dists, axis=1), np.concatenate(ids, axis=1)  # (n, sum k_i)
    dists = np.where(ids < 0, np.inf, dists).astype(np.float32)
    tie_break = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_break, dists), axis=1)[:, :k]  # by distance, then row
    dists, ids = np.take_along_axis(dists, order, axis=1), np.take_along_axis(ids, order, axis=1)
    if dists.shape[1] < k:  # fewer candidates than k in all: pad with "no neighbour"
        pad = ((0, 0), (0, k - dists.shape[1]))
        dists, ids = np.pad(dists, pad, constant_values=np.inf), np.pad(ids, pad, constant_values=-1)
    return dists, ids


@dataclass
class GatheredQueries:
    """One collective step's queries: every process's, concatenated in rank order."""

    queries: np.ndarray  # float32 (N, d), N = the sum of every process's queries
    exclude_rows: np.ndarray | None  # int64 (N,), or None when no process leaves rows out
    k: int  # the largest k asked
    exact: bool
    mine: slice  # this process's queries within ``queries``
    all_done: bool  # every process has finished: no step follows


class ShardExchange:
    """The collective steps of a sharded search over the default ``torch.distributed`` group."""

    def __init__(self):
        self.rank, self.world_size = distributed_world()
        on_gpu = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every process (the same shape on all), in rank order, on the CPU."""
        tensor = tensor.to(self.device)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return [part.cpu() for part in parts]

    def gather_queries(self, queries: np.ndarray, exclude_rows: np.ndarray | None, k: int, exact: bool,
                       done: bool = False) -> GatheredQueries:
        """All-gather every process's queries (n_r, d) and rows to leave out; ``done`` processes send none."""
        header = torch.tensor([len(queries), k, exclude_rows is not None, exact, done], dtype=torch.int64)
        headers = torch.stack(self.all_gather(header))  # (P, 5)
        counts, working = headers[:, 0].tolist(), headers[:, 4] == 0
        begin = sum(counts[: self.rank])
        longest = max(counts)
        padded = np.zeros((longest, queries.shape[1]), dtype=np.float32)  # (max n_r, d)
        padded[: len(queries)] = queries
        rows = np.full(longest, -1, dtype=np.int64)  # -1: no row to leave out (matches no datastore row)
        if exclude_rows is not None:
            rows[: len(queries)] = exclude_rows
        gathered_queries = self.all_gather(torch.from_numpy(padded)) if longest else []
        gathered_rows = self.all_gather(torch.from_numpy(rows)) if longest else []
        return GatheredQueries(
            queries=np.concatenate([q[:n].numpy() for q, n in zip(gathered_queries, counts)]) if longest
            else queries[:0].astype(np.float32),
            exclude_rows=(np.concatenate([r[:n].numpy() for r, n in zip(gathered_rows, counts)]) if longest
                          else np.zeros(0, dtype=np.int64)) if bool(headers[:, 2].any()) else None,
            k=int(headers[:, 1].max()), exact=bool(headers[working, 3].any()), mine=slice(begin, begin + len(queries)),
            all_done=not bool(working.any()),
        )

    def merge_results(self, dists: np.ndarray, ids: np.ndarray, mine: slice, k: int) -> tuple[np.ndarray, np.ndarray]:
        """All-gather every process's (N, k') results for the whole batch and merge the rows of ``mine``: (n, k) each."""
        all_dists = self.all_gather(torch.from_numpy(np.ascontiguousarray(dists, dtype=np.float32)))
        all_ids = self.all_gather(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
        return merge_neighbours([d[mine].numpy() for d in all_dists], [i[mine].numpy() for i in all_ids], k)
