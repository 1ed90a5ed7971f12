"""The MLP memory network: pre-norm residual FFN blocks over the base LM's hidden state, then a vocabulary head.

    x = h                               # (n, d) the input of the base model's key FFN (the kNN key)
    x = x + FFN(Norm(x))                # L times
    logits = head(Norm(x))              # (n, V), untied, no bias

`MLPMemoryPreTrainedModel` builds this from two declared classes, ``norm_class`` and ``ffn_class``; the
per-architecture networks only declare them (and their config class):

- `GPT2MemoryModel`: `LayerNorm` + `GeluFFN` (d -> I -> d, GELU tanh, dropout after the projection)
- `LlamaMemoryModel` / `MistralMemoryModel`: `RMSNorm` + `SwiGLUFFN` (``down(silu(gate(x)) * up(x))``)

The networks are ordinary `PreTrainedModel`s: ``save_pretrained`` writes ``model.safetensors`` and
``config.json``, and once ``models`` is imported ``AutoModel.from_pretrained(dir)`` returns the right
class (no remote code). `models.memory_directory.load_memory` does that with a clear error for a directory
that is not a memory.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from models.configuration_mlp_memory import (STYLE_CONFIGS, GPT2MemoryConfig, LlamaMemoryConfig, MemoryConfig,
                                             MistralMemoryConfig)
from utils.architectures import final_norm
from utils.cli import UsageError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.LayerNorm):
    """GPT-2's norm: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension."""

    def __init__(self, config: MemoryConfig):
        super().__init__(config.hidden_size, eps=config.norm_eps)


class RMSNorm(nn.Module):
    """Llama's norm: ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (as the HF Llama)."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = config.norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class GeluFFN(nn.Module):
    """GPT-2's FFN: ``dropout(proj(gelu_tanh(fc(x))))``, d -> I -> d."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.ffn_bias)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.ffn_bias)
        self.proj.residual_projection = True  # scaled at init (GPT-2's residual scheme)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class SwiGLUFFN(nn.Module):
    """Llama's FFN: ``down(silu(gate(x)) * up(x))``, d -> I -> d."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.ffn_bias)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.ffn_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.ffn_bias)
        self.down.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class MemoryBlock(nn.Module):
    """``x + ffn(norm(x))``."""

    def __init__(self, config: MemoryConfig, norm_class: type[nn.Module], ffn_class: type[nn.Module]):
        super().__init__()
        self.norm = norm_class(config)
        self.ffn = ffn_class(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


# ---------------------------------------------------------------------------------------------------
# The network


class MLPMemoryPreTrainedModel(PreTrainedModel):
    """The shared network; subclasses declare ``config_class``, ``norm_class`` and ``ffn_class``."""

    config_class = MemoryConfig
    base_model_prefix = "memory"
    main_input_name = "hidden_states"
    norm_class: type[nn.Module]
    ffn_class: type[nn.Module]

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(MemoryBlock(config, self.norm_class, self.ffn_class) for _ in range(config.num_layers))
        self.final_norm = self.norm_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for each hidden state: (..., d) -> (..., V)."""
        x = hidden_states
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) linears, unit norms; FFN output projections scaled by 1/sqrt(2L) (GPT-2)."""
        super()._init_weights(module)
        if getattr(module, "residual_projection", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_layers)
            init.normal_(module.weight, mean=0.0, std=std)


class GPT2MemoryModel(MLPMemoryPreTrainedModel):
    config_class = GPT2MemoryConfig
    norm_class = LayerNorm
    ffn_class = GeluFFN


class LlamaMemoryModel(MLPMemoryPreTrainedModel):
    config_class = LlamaMemoryConfig
    norm_class = RMSNorm
    ffn_class = SwiGLUFFN


class MistralMemoryModel(LlamaMemoryModel):
    config_class = MistralMemoryConfig


MEMORY_MODELS: dict[str, type[MLPMemoryPreTrainedModel]] = {
    "gpt2": GPT2MemoryModel, "llama": LlamaMemoryModel, "mistral": MistralMemoryModel,
}
assert set(MEMORY_MODELS) == set(STYLE_CONFIGS)


def build_memory(config: MemoryConfig) -> MLPMemoryPreTrainedModel:
    """A freshly initialised memory of the class that ``config``'s style declares."""
    return MEMORY_MODELS[config.memory_style](config)


@torch.no_grad()
def init_lm_head_from_base(memory: MLPMemoryPreTrainedModel, base_model: nn.Module) -> None:
    """Copy the base model's output embedding (V, d) into the memory's head and its final norm into the memory's.

    The memory then starts out predicting what the base model would from the same hidden state passed
    through its final norm; the blocks (residual, small at init) learn the difference.
    """
    head = base_model.get_output_embeddings().weight  # (V, d)
    if head.shape != memory.lm_head.weight.shape:
        raise UsageError(f"--init_lm_head: the base model's output embedding is {tuple(head.shape)}, the memory's head "
                         f"{tuple(memory.lm_head.weight.shape)}")
    memory.lm_head.weight.copy_(head)
    base_norm = final_norm(base_model)
    state = {k: v for k, v in base_norm.state_dict().items()}
    missing, unexpected = memory.final_norm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"--init_lm_head: the base model's final norm ({type(base_norm).__name__}, {sorted(state)}) does "
                         f"not fit the memory's {type(memory.final_norm).__name__}")
    logger.info("Initialised the memory's head and final norm from the base model (%s)", base_model.config.model_type)
