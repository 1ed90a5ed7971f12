"""Per-architecture facts, written once.

For every supported decoder we record where its transformer blocks live and which sub-module of a
block is the feed-forward layer whose *input* (the output of the block's second norm: ``ln_2`` in
GPT-2, ``post_attention_layernorm`` in Llama/Mistral/Qwen2) is the kNN-LM key and the MLP memory's
input. ``memory_style`` names the block type an MLP memory for that base model uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.cli import UsageError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted attribute path from the *ForCausalLM model to its list of blocks
    ffn: str  # attribute of a block whose input is the key
    final_norm: str  # dotted path of the norm before the LM head (copied by the memory's --init_lm_head)
    memory_style: str  # "gpt2" (LayerNorm + GELU) or "llama" (RMSNorm + SwiGLU)


ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(layers="transformer.h", ffn="mlp", final_norm="transformer.ln_f", memory_style="gpt2"),
    "llama": ArchSpec(layers="model.layers", ffn="mlp", final_norm="model.norm", memory_style="llama"),
    "mistral": ArchSpec(layers="model.layers", ffn="mlp", final_norm="model.norm", memory_style="mistral"),
    "qwen2": ArchSpec(layers="model.layers", ffn="mlp", final_norm="model.norm", memory_style="llama"),
    "qwen3": ArchSpec(layers="model.layers", ffn="mlp", final_norm="model.norm", memory_style="llama"),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The spec of ``model_type``, or a clear error naming the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UsageError(
            f"Unsupported architecture {model_type!r}: the kNN key hook knows "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an entry to utils/architectures.py::ARCHITECTURES."
        ) from None


def submodule(model: torch.nn.Module, dotted_path: str) -> torch.nn.Module:
    """``model.a.b`` for ``"a.b"``."""
    for name in dotted_path.split("."):
        model = getattr(model, name)
    return model


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM of a supported architecture."""
    return submodule(model, arch_spec(model.config.model_type).layers)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm a causal LM applies before its LM head."""
    return submodule(model, arch_spec(model.config.model_type).final_norm)


def key_module(model: torch.nn.Module, layer: int = -1) -> torch.nn.Module:
    """The feed-forward module of block ``layer`` whose input is the key."""
    blocks = transformer_blocks(model)
    if not -len(blocks) <= layer < len(blocks):
        raise UsageError(f"--dstore_layer {layer} is out of range for a model with {len(blocks)} blocks")
    return getattr(blocks[layer], arch_spec(model.config.model_type).ffn)


def normalize_layer(model: torch.nn.Module, layer: int, what: str = "--dstore_layer") -> int:
    """``layer`` as a non-negative block index (so -1 and L-1 are recorded the same way); a block the model does not
    have is a `UsageError` naming ``what`` (it would otherwise wrap round to another block and be recorded as it)."""
    blocks = len(transformer_blocks(model))
    if not -blocks <= layer < blocks:
        raise UsageError(f"{what} {layer} is out of range for a base model with {blocks} blocks "
                         f"(0 to {blocks - 1}, or -{blocks} to -1 from the last)")
    return layer % blocks
