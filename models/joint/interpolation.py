"""The joint model's formula: a base LM's distribution interpolated with another one (the memory's, or p_knn).

    log p = logaddexp(log p_lm + log(1 - lmbda), log q + log lmbda)

One function, `interpolate_log_probs`, serves the kNN-LM (knn_utils/knnlm.py, q = p_knn), the joint
perplexity evaluation (`models.joint.perplexity`), generation and QA (`models.joint.hooks`, q = the memory's
``log_softmax(memory(h) / memory_temp)``, `memory_log_probs`). The formula is elementwise, so it takes whole
distributions (n, V) where they are used (generation's last position) and gold-token log-probabilities (n,)
where only those are (perplexity):

    log p(gold) = logaddexp(log(1 - lmbda) + z[gold] - LSE(z), log(lmbda) + m[gold] / T - LSE(m / T))

with one log-sum-exp per distribution (`gold_log_probs`), whatever the number of ``lmbda`` values: no
(rows x vocab) interpolation is built.
"""

from __future__ import annotations

import math

import torch

from models.joint.settings import check_lmbdas  # noqa: F401 - imported from here by knn_utils.knnlm
from utils.cli import UsageError
from utils.scoring import token_nll

ROWS_PER_SLICE = 1024  # rows scored at once, to bound the (rows, V) tensors


def check_joint_settings(lmbda: float, memory_temp: float) -> None:
    """One ``lmbda`` in [0, 1] and a finite ``memory_temp`` > 0 (written so that NaN fails both), for Python callers
    (`JointLM`, `attach_memory`, the joint config); flags are checked by `models.joint.settings.MemoryArguments`."""
    if not 0 <= lmbda <= 1:
        raise UsageError(f"lmbda must be in [0, 1], got {lmbda}")
    if not 0 < memory_temp < math.inf:
        raise UsageError(f"memory_temp must be a finite number > 0, got {memory_temp}")


def interpolate_log_probs(lm_log_probs: torch.Tensor, other_log_probs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``logaddexp(lm + log(1 - lmbda), other + log(lmbda))``; lmbda 0 gives ``lm_log_probs`` exactly."""
    log_lmbda = math.log(lmbda) if lmbda > 0 else -math.inf
    log_rest = math.log1p(-lmbda) if lmbda < 1 else -math.inf
    return torch.logaddexp(lm_log_probs + log_rest, other_log_probs + log_lmbda)


def memory_log_probs(memory: torch.nn.Module, hidden: torch.Tensor, memory_temp: float) -> torch.Tensor:
    """``log_softmax(memory(hidden) / memory_temp)`` in float32, (n, d) -> (n, V)."""
    logits = memory(hidden.to(memory.dtype))  # (n, V)
    return torch.log_softmax(logits.float() / memory_temp, dim=-1)


def gold_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)[label]`` of each row in float32, (n, V), (n,) -> (n,).

    One log-sum-exp per row: ``token_nll``'s fused log-softmax and gather, which on CPU is about twice as fast as
    ``logits[gold] - torch.logsumexp(logits)`` (that allocates two (n, V) temporaries).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -token_nll(logits, labels)


def memory_gold_log_probs(memory: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                          memory_temp: float) -> torch.Tensor:
    """``memory_log_probs(memory, hidden, memory_temp)[label]`` of each row, (n, d), (n,) -> (n,), from one
    log-sum-exp per row instead of the (n, V) distribution."""
    return gold_log_probs(memory(hidden.to(memory.dtype)), labels, memory_temp)  # (n, V) logits -> (n,)
