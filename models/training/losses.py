"""The memory's training loss, straight from the sparse kNN targets (no dense (rows x vocab) target).

    loss = alpha * KL(p_knn || softmax(z)) + (1 - alpha) * CE(z, gold)

A batch of kNN targets is three flat arrays over its stored entries (`KnnTargets.batch`): the batch
row of each entry, its token id and its probability. With ``log q[i, t] = z[i, t] - lse_i`` and
``lse_i = logsumexp(z[i])``,

    KL_i = sum_{entries j of row i} p_j * (log p_j - z[i, token_j] + lse_i)
    CE_i = lse_i - z[i, gold_i]

so only the logits at the stored ids and one logsumexp per row are needed. `_SparseNLL` computes
both and writes the gradient into a single (n, V) tensor, so memory is O(nnz + n * V): the logits,
their gradient and one transient for the logsumexp -- no (n, V) target, no log-softmax kept for the
backward pass. Entries with ``p = 0`` contribute 0 (``xlogy``). The KL is averaged over the rows that
have a target (a row with no neighbour has none); the CE over all rows.
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


class _SparseNLL(torch.autograd.Function):
    """``-log softmax(logits)[rows[j], tokens[j]]`` for m entries (m,), with a lean backward pass.

    Autograd through ``log_softmax`` and a gather would keep an (n, V) log-softmax alive for the backward
    pass and build two more (n, V) gradients; this writes the gradient straight into one (n, V) tensor:
    ``d/dz[i] = (sum of the entry gradients of row i) * softmax(z[i]) - (each entry's gradient at its token)``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        flat = rows * logits.shape[-1] + tokens  # (m,) positions in the flat (n * V,) view
        ctx.save_for_backward(logits, lse, rows, flat)
        return lse[rows] - logits.reshape(-1)[flat]  # (m,)

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, lse, rows, flat = ctx.saved_tensors
        row_weight = torch.zeros_like(lse).index_add_(0, rows, grad_nll)  # (n,)
        grad = torch.sub(logits, lse[:, None]).exp_().mul_(row_weight[:, None])  # (n, V) weighted softmax, in place
        grad.view(-1).index_add_(0, flat, -grad_nll)
        return grad, None, None


def sparse_nll(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[rows[j], tokens[j]]`` for every entry j, in float32: (n, V), (m,), (m,) -> (m,)."""
    return _SparseNLL.apply(logits.float().contiguous(), rows, tokens)


def kl_and_gold_nll(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``KL(p_knn || softmax(logits))`` over the stored entries, and ``-log q(gold)``: (n, V) -> (n,), (n,).

    One `sparse_nll` call over the kNN entries and the gold tokens together, so the backward pass builds
    a single (n, V) gradient.
    """
    n, nnz = logits.shape[0], len(targets.token_ids)
    rows = torch.cat([targets.entry_row, torch.arange(n, device=logits.device)])  # (nnz + n,)
    nll = sparse_nll(logits, rows, torch.cat([targets.token_ids, labels]))  # (nnz + n,)
    p = targets.probs.float()
    terms = torch.xlogy(p, p) + p * nll[:nnz]  # (nnz,) p log p - p log q
    kl = torch.zeros(n, dtype=terms.dtype, device=logits.device).index_add_(0, targets.entry_row, terms)
    return kl, nll[nnz:]


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
    kl_rows, gold_nll = kl_and_gold_nll(logits, targets, labels)
    kl = kl_rows.sum() / rows_with_targets(targets).sum().clamp(min=1)
    ce = gold_nll.mean()
    return LossTerms(alpha * kl + (1.0 - alpha) * ce, kl.detach(), ce.detach())


def sparse_argmax(targets: SparseTargets, vocab_size: int) -> torch.Tensor:
    """The most likely token of each row's kNN distribution (lowest id among ties); ``vocab_size`` for an empty row."""
    row_max = torch.full((targets.num_rows,), -1.0, device=targets.probs.device)
    row_max = row_max.scatter_reduce(0, targets.entry_row, targets.probs, reduce="amax")  # (n,)
    is_max = targets.probs == row_max[targets.entry_row]  # (nnz,)
    candidates = torch.where(is_max, targets.token_ids, torch.full_like(targets.token_ids, vocab_size))
    best = torch.full((targets.num_rows,), vocab_size, dtype=torch.long, device=targets.token_ids.device)
    return best.scatter_reduce(0, targets.entry_row, candidates, reduce="amin")
