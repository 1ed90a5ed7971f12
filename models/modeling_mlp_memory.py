"""The MLP memory network: pre-norm residual FFN blocks over the base LM's hidden state, then a vocabulary head.

    x = h                               # (n, d) the input of the base model's key FFN (the kNN key)
    x = x + FFN(Norm(x))                # L times
    logits = head(Norm(x))              # (n, V), untied, no bias

`MLPMemoryPreTrainedModel` builds this from the norm and FFN classes of its config's memory style
(`models.memory_styles`: LayerNorm + GELU FFN for GPT-2, RMSNorm + SwiGLU for Llama / Mistral, RMSNorm +
GeGLU for Gemma); each style has a subclass (`MEMORY_MODELS`: `GPT2MemoryModel`, `LlamaMemoryModel`, ...)
that only names its config class, for `AutoModel`.

The networks are ordinary `PreTrainedModel`s: ``save_pretrained`` writes ``model.safetensors`` and
``config.json``, and once ``models`` is imported ``AutoModel.from_pretrained(dir)`` returns the right
class (no remote code). `models.memory_directory.load_memory` does that with a clear error for a directory
that is not a memory.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from models.configuration_mlp_memory import STYLE_CONFIGS, MemoryConfig
from utils.architectures import arch_spec, final_norm
from utils.cli import UsageError

logger = logging.getLogger(__name__)


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
    """The shared network, of ``config.style``'s norm and FFN; a style's subclass declares its ``config_class``."""

    config_class = MemoryConfig
    base_model_prefix = "memory"
    main_input_name = "hidden_states"

    def __init__(self, config: MemoryConfig):
        super().__init__(config)
        norm, ffn = config.style.norm, config.style.ffn
        self.blocks = nn.ModuleList(MemoryBlock(config, norm, ffn) for _ in range(config.num_layers))
        self.final_norm = norm(config)
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


def style_model_class(config_class: type[MemoryConfig]) -> type[MLPMemoryPreTrainedModel]:
    """The network class of a style's config class (`AutoModel` maps one to the other)."""
    name = config_class.__name__.replace("Config", "Model")
    return type(name, (MLPMemoryPreTrainedModel,), {"__module__": __name__, "__qualname__": name,
                                                    "__doc__": config_class.__doc__, "config_class": config_class})


MEMORY_MODELS: dict[str, type[MLPMemoryPreTrainedModel]] = {
    name: style_model_class(config_class) for name, config_class in STYLE_CONFIGS.items()}
# Importable by name (pickling finds a class by its module and name).
GPT2MemoryModel, LlamaMemoryModel = MEMORY_MODELS["gpt2"], MEMORY_MODELS["llama"]
MistralMemoryModel, GemmaMemoryModel = MEMORY_MODELS["mistral"], MEMORY_MODELS["gemma"]


def build_memory(config: MemoryConfig) -> MLPMemoryPreTrainedModel:
    """A freshly initialised memory of the class that ``config``'s style declares."""
    return MEMORY_MODELS[config.memory_style](config)


@torch.no_grad()
def init_lm_head_from_base(memory: MLPMemoryPreTrainedModel, base_model: nn.Module) -> None:
    """Copy the base model's output embedding (V, d) into the memory's head and its final norm into the memory's.

    The memory then starts out predicting what the base model would from the same hidden state passed
    through its final norm; the blocks (residual, small at init) learn the difference. A final norm that
    scales by ``offset + weight`` (Gemma's RMSNorm: 1 + weight, `utils.architectures.ArchSpec.final_norm_offset`)
    is copied as ``offset + weight`` into the memory's plain one.
    """
    head = base_model.get_output_embeddings().weight  # (V, d)
    if head.shape != memory.lm_head.weight.shape:
        raise UsageError(f"--init_lm_head: the base model's output embedding is {tuple(head.shape)}, the memory's head "
                         f"{tuple(memory.lm_head.weight.shape)}")
    memory.lm_head.weight.copy_(head)
    base_norm = final_norm(base_model)
    state = dict(base_norm.state_dict())
    offset = arch_spec(base_model.config.model_type).final_norm_offset
    if offset and "weight" in state:
        state["weight"] = state["weight"] + offset
    missing, unexpected = memory.final_norm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"--init_lm_head: the base model's final norm ({type(base_norm).__name__}, {sorted(state)}) does "
                         f"not fit the memory's {type(memory.final_norm).__name__}")
    logger.info("Initialised the memory's head and final norm from the base model (%s)", base_model.config.model_type)
