"""Exact kNN search in torch: the GPU backend of an exact (flat) index for users of pip's faiss-cpu.

`knn_utils.index_search.load_index` uses it when an exact index is asked for on a GPU that FAISS cannot use.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from knn_utils.exact_ranking import exact_nearest
from utils.io import chunk_ranges

TORCH_SCORE_BYTES = 2 << 30  # TorchExactSearch keeps each block of scores (or gathered keys) under this


@contextmanager
def tf32_matmul(device: torch.device):
    """Float32 matmuls on ``device`` may use TF32 (CUDA only) inside the block; the setting is restored after."""
    previous = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class TorchExactSearch:
    """Exact squared-L2 search of a datastore's keys in torch: a GPU backend for users of faiss-cpu.

    Stands in for a ``faiss.IndexFlatL2`` over the same keys wherever `KnnIndex` uses one (``ntotal``,
    ``d``, ``search``) and finds the same neighbours up to ties. The keys live on ``device`` in their
    stored dtype (float16: half the memory of the FAISS index), with their squared norms in float32.
    A search ranks all keys by a fast float32 matmul (TF32 on CUDA) in blocks of ``query_rows`` queries
    x ``key_rows`` keys, keeps the ``2k + 8`` best candidates of each query, recomputes their distances
    exactly as ``||q - key||^2`` in float32, and returns the ``k`` nearest (ties: the lower row first).
    Unless ``query_rows`` is given, a block of scores (and of gathered candidate keys) stays under
    ``max_score_bytes``.
    """

    def __init__(self, keys: np.ndarray, device: str | torch.device, key_rows: int = 1 << 18,
                 query_rows: int | None = None, max_score_bytes: int = TORCH_SCORE_BYTES, load_rows: int = 1 << 18):
        self.device = torch.device(device)
        self.ntotal, self.d = keys.shape
        self.key_rows = max(1, min(key_rows, self.ntotal))
        self.query_rows = query_rows or max(1, max_score_bytes // (4 * self.key_rows))
        self.max_score_bytes = max_score_bytes
        self.keys = keys_on_device(keys, self.device, load_rows)  # (N, d)
        self.sq_norms = torch.empty(self.ntotal, dtype=torch.float32, device=self.device)  # (N,)
        for begin, end in chunk_ranges(self.ntotal, load_rows):
            self.sq_norms[begin:end] = self.keys[begin:end].float().square().sum(dim=1)

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances (float32) and rows (int64) of the ``k`` nearest keys of each query, (n, k) each,
        nearest first; like FAISS, id -1 and distance FLT_MAX where the datastore has fewer than ``k`` rows."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        found = min(k, self.ntotal)
        candidates = min(self.ntotal, 2 * k + 8)  # slack for the rounding of the fast matmul
        dists = np.full((len(queries), k), np.finfo(np.float32).max, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        for begin in range(0, len(queries), self.query_rows):
            end = min(begin + self.query_rows, len(queries))
            chunk = torch.from_numpy(np.ascontiguousarray(queries[begin:end], dtype=np.float32))
            chunk = chunk.to(self.device)  # (b, d)
            chunk_dists, chunk_ids = self.exact_nearest(chunk, self.candidates(chunk, candidates), found)  # (b, found)
            dists[begin:end, :found], ids[begin:end, :found] = chunk_dists.cpu().numpy(), chunk_ids.cpu().numpy()
        return dists, ids

    def candidates(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Rows of the ``count`` keys of best fast score for each query (b, d), (b, count), in no order."""
        best_scores = queries.new_empty((len(queries), 0))  # (b, <= count), the best so far
        best_rows = torch.empty((len(queries), 0), dtype=torch.int64, device=self.device)
        with tf32_matmul(self.device):
            for begin, end in chunk_ranges(self.ntotal, self.key_rows):
                tile = self.keys[begin:end].float()  # (T, d)
                # (b, T): ||q - key||^2 - ||q||^2, the same order of keys as the distance
                scores = torch.addmm(self.sq_norms[begin:end], queries, tile.T, alpha=-2)
                top = scores.topk(min(count, end - begin), dim=1, largest=False, sorted=False)
                scores = torch.cat([best_scores, top.values], dim=1)
                rows = torch.cat([best_rows, top.indices + begin], dim=1)
                keep = scores.topk(min(count, scores.shape[1]), dim=1, largest=False, sorted=False).indices
                best_scores, best_rows = scores.gather(1, keep), rows.gather(1, keep)
        return best_rows

    def exact_nearest(self, queries: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`exact_nearest` over this search's keys."""
        return exact_nearest(self.keys, queries, rows, k, self.max_score_bytes)


def keys_on_device(keys: np.ndarray, device: str | torch.device, load_rows: int = 1 << 18) -> torch.Tensor:
    """A copy of ``keys`` (N, d), in their dtype, on ``device``, read ``load_rows`` rows at a time (a memory-mapped
    datastore is never loaded whole into host memory)."""
    dtype = torch.from_numpy(np.empty(0, keys.dtype)).dtype
    copy = torch.empty(keys.shape, dtype=dtype, device=device)  # (N, d)
    for begin, end in chunk_ranges(len(keys), load_rows):
        copy[begin:end] = torch.from_numpy(np.array(keys[begin:end])).to(device)
    return copy

