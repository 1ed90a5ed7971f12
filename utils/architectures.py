"""Per-architecture facts, written once.

For every supported decoder family (one row per Hugging Face ``model_type``) we record where its
transformer blocks live, which sub-module of a block is the feed-forward layer whose *input* is the
kNN-LM key and the MLP memory's input, the norm before its LM head, and what a user must not have to
know about it: which memory style (`models.memory_styles`) mirrors its blocks, where its config keeps
the norms' epsilon, whether its final norm scales by ``1 + weight`` (Gemma), and whether it transforms
the logits after its LM head (Gemma 2's final soft-capping).

The key is always the input of the block's ``mlp``; what that tensor is depends on the block:

* pre-norm blocks (GPT-2, Llama, Mistral, Qwen2/3, Phi-3): the output of the block's second norm
  (``ln_2`` / ``post_attention_layernorm``) applied to the residual after attention;
* Gemma 2/3 (a norm after each sub-layer as well): the output of ``pre_feedforward_layernorm``;
* OLMo 2 (post-norm: its norms act on the sub-layers' outputs): the residual after attention itself,
  which has gone through no norm;
* GPT-NeoX / Pythia with ``use_parallel_residual`` (their default): ``post_attention_layernorm`` of the
  block's *input*, since attention and FFN both read it; without it, of the residual after attention.

``tests/models/test_architectures.py`` checks every row against a reference written per family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from utils.cli import UsageError


@dataclass(frozen=True)
class ArchSpec:
    family: str  # the name users know, for messages and the README
    layers: str  # dotted attribute path from the *ForCausalLM model to its list of blocks
    ffn: str  # attribute of a block whose input is the key
    key: str  # what that input is, in words
    final_norm: str  # dotted path of the norm before the LM head (copied by the memory's --init_lm_head)
    norm_eps: str  # config attribute of the norms' epsilon (the memory's norms take it)
    memory_style: str  # the memory's block type: a key of models.memory_styles.MEMORY_STYLES
    final_norm_offset: float = 0.0  # the final norm scales by (offset + weight): 1.0 for Gemma's RMSNorm
    logit_softcapping: str | None = None  # config attribute of a soft-capping applied after the LM head


_PRE_NORM = "output of `post_attention_layernorm`"
_GEMMA = "output of `pre_feedforward_layernorm`"

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("GPT-2", "transformer.h", "mlp", "output of `ln_2`", "transformer.ln_f", "layer_norm_epsilon",
                     "gpt2"),
    "llama": ArchSpec("Llama 2 / 3, SmolLM2", "model.layers", "mlp", _PRE_NORM, "model.norm", "rms_norm_eps", "llama"),
    "mistral": ArchSpec("Mistral", "model.layers", "mlp", _PRE_NORM, "model.norm", "rms_norm_eps", "mistral"),
    "qwen2": ArchSpec("Qwen2 / Qwen2.5", "model.layers", "mlp", _PRE_NORM, "model.norm", "rms_norm_eps", "llama"),
    "qwen3": ArchSpec("Qwen3", "model.layers", "mlp", _PRE_NORM, "model.norm", "rms_norm_eps", "llama"),
    "phi3": ArchSpec("Phi-3", "model.layers", "mlp", _PRE_NORM, "model.norm", "rms_norm_eps", "llama"),
    "olmo2": ArchSpec("OLMo 2", "model.layers", "mlp", "the residual after attention (post-norm block: no norm)",
                      "model.norm", "rms_norm_eps", "llama"),
    "gemma2": ArchSpec("Gemma 2", "model.layers", "mlp", _GEMMA, "model.norm", "rms_norm_eps", "gemma",
                       final_norm_offset=1.0, logit_softcapping="final_logit_softcapping"),
    "gemma3_text": ArchSpec("Gemma 3 (text)", "model.layers", "mlp", _GEMMA, "model.norm", "rms_norm_eps", "gemma",
                            final_norm_offset=1.0, logit_softcapping="final_logit_softcapping"),
    "gpt_neox": ArchSpec("GPT-NeoX, Pythia", "gpt_neox.layers", "mlp",
                         "output of `post_attention_layernorm` (of the block's input with parallel residual)",
                         "gpt_neox.final_layer_norm", "layer_norm_eps", "gpt2"),
}

# Model types refused with a reason more useful than the list of supported ones.
REFUSED: dict[str, str] = {
    "gemma3": "it is the multimodal Gemma 3 (Gemma3ForConditionalGeneration, image + text), whose text decoder sits "
              "inside it with a composite config; use a text-only checkpoint (model_type gemma3_text, such as "
              "Gemma 3 1B)",
}


def arch_spec(model_type: str) -> ArchSpec:
    """The spec of ``model_type``, or a clear error naming the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        reason = f"{REFUSED[model_type]}. " if model_type in REFUSED else ""
        raise UsageError(
            f"Unsupported architecture {model_type!r}: {reason}the kNN key hook knows "
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


@contextmanager
def logits_transform_taken(model: torch.nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Take over the transform ``model`` applies to its LM head's output (Gemma 2's final soft-capping,
    ``cap * tanh(logits / cap)``): within the context the model no longer applies it, and the function
    yielded does (the identity where there is none). Whoever replaces the head's output -- the joint
    model mixes there -- applies it to the base's logits, so it is not applied to the mixture.

    An architecture outside the table (a Memory Decoder needs no key hook) is checked for the attribute
    Hugging Face models use, ``final_logit_softcapping``.
    """
    spec = ARCHITECTURES.get(model.config.model_type)
    attribute = spec.logit_softcapping if spec is not None else "final_logit_softcapping"
    cap = getattr(model.config, attribute, None) if attribute else None
    if cap is None:
        yield lambda logits: logits
        return
    setattr(model.config, attribute, None)
    try:
        yield lambda logits: torch.tanh(logits / cap) * cap
    finally:
        setattr(model.config, attribute, cap)
