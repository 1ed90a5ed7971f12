"""Matmul FLOPs per token of a base model and a memory: the bound the speed benchmarks compare against.

Kept apart from the benchmarks that use it so that importing it loads neither FAISS nor the kNN code (vLLM's
process, `benchmarks.bench_serve`, must not import numba's llvmlite: vLLM 0.32's kernel scan fails over it).
"""

from __future__ import annotations

import torch


def linear_weights(module: torch.nn.Module) -> int:
    """Weights of every ``nn.Linear`` in ``module`` (a tied LM head counts: it is a matmul per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(model: torch.nn.Module, memory: torch.nn.Module, context: float) -> tuple[float, float]:
    """Matmul FLOPs per scored token of the base (linear layers and attention at mean ``context``) and the memory."""
    config = model.config
    attention = 4 * config.hidden_size * context * config.num_hidden_layers  # q.k and the weighted sum of v
    return 2 * linear_weights(model) + attention, 2 * linear_weights(memory)
