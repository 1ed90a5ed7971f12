"""The memory's training loss, straight from the sparse kNN targets (no dense (rows x vocab) target).

    loss = alpha * KL(p_knn || softmax(z)) + (1 - alpha) * CE(z, gold)

A batch of kNN targets is three flat arrays over its stored entries (`KnnTargets.batch`): the batch
row of each entry, its token id and its probability. With ``log_q = log_softmax(z)`` (n, V),

    KL_i = sum_{entries j of row i} p_j * (log p_j - log_q[i, token_j])

so only ``log_q`` gathered at the stored ids is needed: memory O(nnz + n * V), the second term being
the logits themselves. Entries with ``p = 0`` contribute 0 (``xlogy``). The KL is averaged over the
rows that have a target (a row with no neighbour has none); the CE over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SparseTargets:
    """The kNN targets of a batch of n rows, flat over their nnz stored entries."""

    entry_row: torch.Tensor  # int64 (nnz,) batch row of each entry
    token_ids: torch.Tensor  # int64 (nnz,)
    probs: torch.Tensor  # float32 (nnz,)
    num_rows: int

    @staticmethod
    def from_numpy(entry_row: np.ndarray, token_ids: np.ndarray, probs: np.ndarray, num_rows: int) -> "SparseTargets":
        """From the arrays of `KnnTargets.batch` (any integer / float dtypes)."""
        return SparseTargets(torch.from_numpy(np.asarray(entry_row, dtype=np.int64)),
                             torch.from_numpy(np.asarray(token_ids, dtype=np.int64)),
                             torch.from_numpy(np.asarray(probs, dtype=np.float32)), num_rows)

    def to(self, device) -> "SparseTargets":
        return SparseTargets(self.entry_row.to(device, non_blocking=True), self.token_ids.to(device, non_blocking=True),
                             self.probs.to(device, non_blocking=True), self.num_rows)


@dataclass
class LossTerms:
    """The loss and its parts (all scalars; ``loss`` carries the gradient)."""

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def gather_log_probs(log_q: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log_q[rows[j], token_ids[j]]`` for every entry j: (n, V), (m,), (m,) -> (m,)."""
    vocab = log_q.shape[-1]
    return log_q.reshape(-1).index_select(0, rows * vocab + token_ids)  # (m,) from the flat (n * V,) view


def sparse_kl_per_row(log_q: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """``KL(p_knn || q)`` of each row from the stored entries only: (n, V) log-probs -> (n,)."""
    p = targets.probs.to(log_q.dtype)
    terms = torch.xlogy(p, p) - p * gather_log_probs(log_q, targets.entry_row, targets.token_ids)  # (nnz,)
    return torch.zeros(log_q.shape[0], dtype=log_q.dtype, device=log_q.device).index_add_(0, targets.entry_row, terms)


def rows_with_targets(targets: SparseTargets) -> torch.Tensor:
    """Boolean (n,): which rows have at least one stored entry."""
    has = torch.zeros(targets.num_rows, dtype=torch.bool, device=targets.entry_row.device)
    return has.index_fill_(0, targets.entry_row, True)


def memory_loss(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, alpha: float = 0.5) -> LossTerms:
    """``alpha * KL(p_knn || softmax(logits)) + (1 - alpha) * CE(logits, labels)``, means over rows.

    ``logits`` (n, V) in any float dtype (the loss is computed in float32), ``labels`` (n,) int64.
    An empty batch gives a zero loss that still reaches every logit (so data-parallel ranks stay in step).
    """
    if logits.shape[0] == 0:
        zero = logits.float().sum() * 0.0
        return LossTerms(zero, zero.detach(), zero.detach())
    log_q = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    kl_rows = sparse_kl_per_row(log_q, targets)  # (n,)
    kl = kl_rows.sum() / rows_with_targets(targets).sum().clamp(min=1)
    ce = -gather_log_probs(log_q, torch.arange(len(labels), device=labels.device), labels).mean()
    return LossTerms(alpha * kl + (1.0 - alpha) * ce, kl.detach(), ce.detach())


def sparse_argmax(targets: SparseTargets, vocab_size: int) -> torch.Tensor:
    """The most likely token of each row's kNN distribution (lowest id among ties); ``vocab_size`` for an empty row."""
    row_max = torch.full((targets.num_rows,), -1.0, device=targets.probs.device)
    row_max = row_max.scatter_reduce(0, targets.entry_row, targets.probs, reduce="amax")  # (n,)
    is_max = targets.probs == row_max[targets.entry_row]  # (nnz,)
    candidates = torch.where(is_max, targets.token_ids, torch.full_like(targets.token_ids, vocab_size))
    best = torch.full((targets.num_rows,), vocab_size, dtype=torch.long, device=targets.token_ids.device)
    return best.scatter_reduce(0, targets.entry_row, candidates, reduce="amin")
