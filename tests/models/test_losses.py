"""models/training/losses.py: the sparse loss against the dense formula (values and gradients), built only here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.training.losses import SparseTargets, kl_and_gold_nll, memory_loss, sparse_argmax, sparse_nll

VOCAB = 50


def random_targets(num_rows: int, seed: int, empty_rows=(3,), zero_entry: bool = True) -> SparseTargets:
    """Sparse rows of 1..12 distinct token ids with random probabilities; some rows empty, one entry with p = 0."""
    rng = np.random.default_rng(seed)
    rows, ids, probs = [], [], []
    for i in range(num_rows):
        if i in empty_rows:
            continue
        count = int(rng.integers(1, 13))
        tokens = np.sort(rng.choice(VOCAB, size=count, replace=False))
        p = rng.random(count)
        if zero_entry and i == 0 and count > 1:
            p[0] = 0.0
        rows.append(np.full(count, i))
        ids.append(tokens)
        probs.append((p / p.sum()).astype(np.float16))
    return SparseTargets.from_numpy(np.concatenate(rows), np.concatenate(ids), np.concatenate(probs), num_rows)


def dense_loss(logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """The released implementation's way: expand the targets to (n, V) and use kl_div over the full vocabulary."""
    dense = torch.zeros(targets.num_rows, VOCAB, dtype=torch.float64)
    dense[targets.entry_row, targets.token_ids] = targets.probs.double()
    log_q = torch.log_softmax(logits.double(), dim=-1)
    kl_rows = F.kl_div(log_q, dense, reduction="none").sum(-1)  # (n,)
    has_target = dense.sum(-1) > 0
    kl = kl_rows[has_target].mean()
    ce = F.cross_entropy(logits.double(), labels)
    return alpha * kl + (1 - alpha) * ce


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sparse_loss_and_gradient_equal_dense(alpha):
    num_rows = 9
    targets = random_targets(num_rows, seed=1)
    labels = torch.from_numpy(np.random.default_rng(2).integers(VOCAB, size=num_rows))
    logits = (3 * torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(0))).requires_grad_()
    dense_logits = logits.detach().clone().requires_grad_()

    sparse = memory_loss(logits, targets, labels, alpha)
    sparse.loss.backward()
    reference = dense_loss(dense_logits, targets, labels, alpha)
    reference.backward()

    assert sparse.loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logits.grad.double(), dense_logits.grad.double(), rtol=1e-4, atol=1e-6)


def test_kl_is_zero_when_q_equals_p_and_empty_rows_contribute_nothing():
    targets = SparseTargets.from_numpy(np.array([0, 0, 0, 2, 2]), np.array([1, 4, 9, 0, 3]),
                                       np.array([0.5, 0.25, 0.25, 0.75, 0.25]), 3)  # exact in float16
    logits = torch.full((3, VOCAB), -200.0)
    logits[targets.entry_row, targets.token_ids] = targets.probs.log()
    kl, gold_nll = kl_and_gold_nll(logits, targets, torch.tensor([1, 5, 0]))
    torch.testing.assert_close(kl, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(gold_nll[[0, 2]], -targets.probs[[0, 3]].log())


def test_sparse_nll_gradient_matches_autograd_of_log_softmax():
    logits = torch.randn(4, VOCAB, dtype=torch.float32, requires_grad=True)
    rows, tokens = torch.tensor([0, 0, 2, 3, 3, 3]), torch.tensor([5, 5, 1, 7, 8, 0])
    weights = torch.rand(6)
    (sparse_nll(logits, rows, tokens) * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    (-torch.log_softmax(reference, -1)[rows, tokens] * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(logits.grad[1], torch.zeros(VOCAB))  # a row without entries gets no gradient


def test_reported_parts_match_alpha_mix():
    targets = random_targets(6, seed=4)
    labels = torch.arange(6)
    logits = torch.randn(6, VOCAB)
    terms = memory_loss(logits, targets, labels, alpha=0.3)
    assert terms.loss.item() == pytest.approx(0.3 * terms.kl.item() + 0.7 * terms.ce.item(), rel=1e-6)
    assert terms.ce.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_empty_batch_gives_zero_loss_with_gradient():
    logits = torch.zeros(0, VOCAB, requires_grad=True)
    targets = SparseTargets.from_numpy(np.zeros(0), np.zeros(0), np.zeros(0), 0)
    terms = memory_loss(logits, targets, torch.zeros(0, dtype=torch.long))
    terms.loss.backward()
    assert terms.loss.item() == 0 and logits.grad is not None


def test_sparse_argmax_breaks_ties_by_lowest_id_and_marks_empty_rows():
    targets = SparseTargets.from_numpy(np.array([0, 0, 0, 2, 2]), np.array([7, 3, 9, 4, 1]),
                                       np.array([0.25, 0.5, 0.25, 0.5, 0.5]), 3)
    assert sparse_argmax(targets, VOCAB).tolist() == [3, VOCAB, 1]
