"""The sparse kNN targets of a batch in torch, on the GPU: the same rows as the NumPy path, without its CPU cost.

At k 1024 the CPU work after a search dominates a kNN-target run: ordering each query's candidates and leaving
out its own row (`knn_utils.index_search.select_neighbours`), then weighting the neighbours, adding up equal tokens and
thresholding (`knn_utils.knn_targets.sparse_targets`) run at a few thousand rows a second on one core, against
tens of thousands a second for a GPU search. `torch_sparse_targets` does both steps on a torch device with the
same arithmetic (stable sorts with the same keys, float64 weights and sums, the same threshold and float16
probabilities), so the stored targets are those of the NumPy path; only the order in which a row's float64
weights are added may differ on a GPU (atomic adds), which can move a probability by one float16 step at most
where it sits on a rounding boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from utils.artifacts.knn_targets import ID_DTYPE, SparseRows

FLOAT16 = torch.float16  # utils.artifacts.knn_targets.PROB_DTYPE


def _stable_order(*keys: torch.Tensor) -> torch.Tensor:
    """The permutation sorting by ``keys[0]``, ties by ``keys[1]``, ... (NumPy's ``lexsort`` with the keys reversed)."""
    order = torch.arange(len(keys[0]), device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


@torch.no_grad()
def torch_sparse_targets(dists: np.ndarray, ids: np.ndarray, k: int, vals: torch.Tensor, knn_temp: float,
                         exclude_rows: np.ndarray | None = None, threshold: float = 1e-8,
                         max_targets: int | None = None, lower_row_first: bool = False) -> SparseRows:
    """``sparse_targets(select_neighbours(dists, ids, k, exclude_rows, lower_row_first), vals, ...)``, computed on
    ``vals.device``.

    ``dists`` / ``ids`` (n, c >= k) are an index's results (id -1 for none), ``vals`` (N,) the datastore's next
    tokens already on the device; ``lower_row_first``: equal distances to the lower row, as `KnnIndex.search` orders
    them, instead of the index's order.
    """
    device = vals.device
    dists_t = torch.from_numpy(np.ascontiguousarray(dists, dtype=np.float32)).to(device)  # (n, c)
    ids_t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device)  # (n, c)
    n = len(ids_t)
    invalid = ids_t < 0
    if exclude_rows is not None:
        invalid |= ids_t == torch.from_numpy(np.asarray(exclude_rows, dtype=np.int64)).to(device)[:, None]
    if lower_row_first:  # select_neighbours(lower_row_first=True): the results in row order first
        by_row = torch.sort(ids_t.masked_fill(invalid, torch.iinfo(torch.int64).max), dim=1, stable=True).indices
        dists_t, ids_t, invalid = (t.gather(1, by_row) for t in (dists_t, ids_t, invalid))
    # select_neighbours: the k nearest valid results, in a stable order of distance
    order = torch.sort(dists_t.masked_fill(invalid, float("inf")), dim=1, stable=True).indices[:, :k]  # (n, k)
    valid = ~invalid.gather(1, order)
    near_ids = torch.where(valid, ids_t.gather(1, order), 0)
    near_dists = dists_t.gather(1, order).double()
    # neighbour_weights: softmax(-d / knn_temp) over the valid neighbours, float64
    logits = torch.where(valid, -near_dists / knn_temp, float("-inf"))
    top = logits.max(dim=1, keepdim=True).values
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 0.0)
    tokens = torch.where(valid, vals[near_ids].long(), -1)  # (n, k)
    # sum_by_token: groups of equal tokens in each row, ordered by row then token
    by_token = torch.sort(tokens, dim=1, stable=True)
    tokens, weights = by_token.values.reshape(-1), weights.gather(1, by_token.indices).reshape(-1)  # (n * k,)
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[1:] = tokens[1:] != tokens[:-1]
    starts[::k] = True
    first = torch.nonzero(starts).squeeze(1)
    rows, group_tokens = first // k, tokens[first]
    sums = torch.zeros(len(first), dtype=torch.float64, device=device).index_add_(0, torch.cumsum(starts, 0) - 1, weights)
    # keep_targets: above the threshold, within max_targets, and always each row's most likely token
    ranked = _stable_order(rows, -sums, group_tokens)
    row_start = torch.searchsorted(rows[ranked], torch.arange(n, device=device))
    rank = torch.empty_like(rows)
    rank[ranked] = torch.arange(len(rows), device=device) - row_start[rows[ranked]]
    keep = sums > threshold
    if max_targets is not None:
        keep &= rank < max_targets
    keep = (group_tokens >= 0) & (sums > 0) & (keep | (rank == 0))
    rows, group_tokens, sums = rows[keep], group_tokens[keep], sums[keep]
    row_totals = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, rows, sums)
    probs = (sums / row_totals[rows]).to(FLOAT16)
    stored = probs > 0  # below float16's smallest value a probability would be stored as 0: dropped, as in NumPy
    rows, group_tokens, probs = rows[stored], group_tokens[stored], probs[stored]
    return SparseRows(counts=torch.bincount(rows, minlength=n).cpu().numpy().astype(np.int64),
                      token_ids=group_tokens.cpu().numpy().astype(ID_DTYPE), probs=probs.cpu().numpy())
