"""What a memory style is: one record per block type, which everything that depends on the style reads.

A memory is a stack of pre-norm residual FFN blocks, ``x = x + FFN(Norm(x))``, a final norm and a head
(`models.modeling_mlp_memory`). Its *style* says which norm and which FFN, mirroring the base model's
blocks (`utils.architectures.ArchSpec.memory_style`):

=======  =========  ========================================  =======  ========================  ===============
style    norm       FFN                                       dropout  FFN bias                  released layout
=======  =========  ========================================  =======  ========================  ===============
gpt2     LayerNorm  ``proj(gelu_tanh(fc(x)))``, d -> 4d -> d  0.1      always                    GPT2MLPModel
llama    RMSNorm    ``down(silu(gate(x)) * up(x))``           0        the base's ``mlp_bias``   LlamaMLPModel
mistral  RMSNorm    ``down(silu(gate(x)) * up(x))``           0        never                     MistralMLPModel
gemma    RMSNorm    ``down(gelu_tanh(gate(x)) * up(x))``      0        no                        none
=======  =========  ========================================  =======  ========================  ===============

A `MemoryStyle` record holds all of it: the norm and FFN classes (each counts its own parameters), the
defaults of a config of the style, how `MemoryConfig.from_base` reads a base model's config, the named
presets, and how the weights map to the released implementation's layout (`ReleasedLayout`, or None
where the released code has no such memory). The config class (``config.json``'s ``model_type`` is
``mlp_memory_<style>``) and the network class of each style are made from its record
(`models.configuration_mlp_memory`, `models.modeling_mlp_memory`); the released reader and writer
(`models.official`) read ``released``. A new style is one record in `MEMORY_STYLES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from utils.architectures import ArchSpec

# ---------------------------------------------------------------------------------------------------
# The building blocks; ``config`` is a models.configuration_mlp_memory.MemoryConfig


class LayerNorm(nn.LayerNorm):
    """GPT-2's norm: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension."""

    def __init__(self, config):
        super().__init__(config.hidden_size, eps=config.norm_eps)

    @staticmethod
    def parameters_for(d: int) -> int:
        return 2 * d


class RMSNorm(nn.Module):
    """Llama's norm: ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (as the HF Llama)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = config.norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    @staticmethod
    def parameters_for(d: int) -> int:
        return d


class GeluFFN(nn.Module):
    """GPT-2's FFN: ``dropout(proj(gelu_tanh(fc(x))))``, d -> I -> d."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.ffn_bias)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.ffn_bias)
        self.proj.residual_projection = True  # scaled at init (GPT-2's residual scheme)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))

    @staticmethod
    def parameters_for(d: int, inner: int, bias: bool) -> int:
        return 2 * d * inner + (inner + d) * bias


class SwiGLUFFN(nn.Module):
    """Llama's FFN: ``down(silu(gate(x)) * up(x))``, d -> I -> d."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.ffn_bias)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.ffn_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.ffn_bias)
        self.down.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(self.gate(x)) * self.up(x)))

    @staticmethod
    def parameters_for(d: int, inner: int, bias: bool) -> int:
        return 3 * d * inner + (2 * inner + d) * bias


class GeGLUFFN(SwiGLUFFN):
    """Gemma's FFN: ``down(gelu_tanh(gate(x)) * up(x))``, d -> I -> d."""

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------------------------------------------
# The released implementation's layouts (github.com/Binn0/MLPMemory; models.official reads and writes them)


@dataclass(frozen=True)
class ReleasedLayout:
    """One released memory class: its config fields and its weight names, each mapped to ours.

    ``block`` maps a released key inside block ``i`` (after ``{blocks}.{i}.``) to (our key inside
    ``blocks.{i}.``, whether the tensor is transposed: GPT-2's ``Conv1D`` stores ``[in, out]``);
    ``biases`` likewise for the FFN's biases, which ``bias`` says the released class has "always",
    "never" or "optional" (switched by the config field ``bias_field``).
    """

    model_type: str  # the base's model_type, which the released config.json keeps (the released code's dispatch)
    memory_class: str  # the released class, for messages
    blocks: str  # "h" or "layers"
    depth_field: str
    hidden_field: str
    eps_field: str
    activation_field: str
    activations: tuple[str, ...]  # the activations our FFN computes
    block: dict[str, tuple[str, bool]]
    biases: dict[str, tuple[str, bool]]
    bias: str  # "always", "never" or "optional"
    final: dict[str, str]
    width_key: str  # the released key inside a block whose rows (in our orientation) are the FFN width
    width_field: str | None = None  # config field of the width; None: the released class uses 4 * hidden size
    bias_field: str | None = None  # config field switching optional biases (Llama's mlp_bias)
    dropout_field: str | None = None  # config field of the FFN's dropout (GPT-2's resid_pdrop)

    def names(self, num_layers: int, bias: bool) -> dict[str, tuple[str, bool]]:
        """Every released key of a memory of ``num_layers`` blocks -> (our key, transposed)."""
        block = {**self.block, **(self.biases if bias else {})}
        names = {f"{self.blocks}.{i}.{key}": (f"blocks.{i}.{ours}", transposed)
                 for i in range(num_layers) for key, (ours, transposed) in block.items()}
        return {**names, **{key: (ours, False) for key, ours in self.final.items()}}

    def describe(self) -> str:
        block = ", ".join(f"{self.blocks}.{{i}}.{key}" for key in self.block)
        return f"{self.model_type} ({self.memory_class}: {block}, {', '.join(self.final)})"


_SWIGLU = {"input_layernorm.weight": ("norm.weight", False), "mlp.gate_proj.weight": ("ffn.gate.weight", False),
           "mlp.up_proj.weight": ("ffn.up.weight", False), "mlp.down_proj.weight": ("ffn.down.weight", False)}
_SWIGLU_BIASES = {"mlp.gate_proj.bias": ("ffn.gate.bias", False), "mlp.up_proj.bias": ("ffn.up.bias", False),
                  "mlp.down_proj.bias": ("ffn.down.bias", False)}
_RMS_FINAL = {"norm.weight": "final_norm.weight", "lm_head.weight": "lm_head.weight"}
_LLAMA_FIELDS = dict(blocks="layers", depth_field="num_hidden_layers", hidden_field="hidden_size",
                     eps_field="rms_norm_eps", activation_field="hidden_act", activations=("silu",), block=_SWIGLU,
                     final=_RMS_FINAL, width_key="mlp.up_proj.weight", width_field="intermediate_size")

GPT2_LAYOUT = ReleasedLayout(
    model_type="gpt2", memory_class="GPT2MLPModel", blocks="h", depth_field="n_layer", hidden_field="n_embd",
    eps_field="layer_norm_epsilon", activation_field="activation_function",
    activations=("gelu_new", "gelu_pytorch_tanh"),
    block={"ln_1.weight": ("norm.weight", False), "ln_1.bias": ("norm.bias", False),
           "mlp.c_fc.weight": ("ffn.fc.weight", True), "mlp.c_proj.weight": ("ffn.proj.weight", True)},
    biases={"mlp.c_fc.bias": ("ffn.fc.bias", False), "mlp.c_proj.bias": ("ffn.proj.bias", False)}, bias="always",
    final={"ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"},
    width_key="mlp.c_fc.weight", dropout_field="resid_pdrop")
LLAMA_LAYOUT = ReleasedLayout(model_type="llama", memory_class="LlamaMLPModel", biases=_SWIGLU_BIASES, bias="optional",
                              bias_field="mlp_bias", **_LLAMA_FIELDS)
MISTRAL_LAYOUT = ReleasedLayout(model_type="mistral", memory_class="MistralMLPModel", biases={}, bias="never",
                                **_LLAMA_FIELDS)


# ---------------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class MemoryStyle:
    """Everything a memory style means."""

    name: str  # config.json's model_type is "mlp_memory_<name>"
    class_prefix: str  # its classes are <prefix>MemoryConfig and <prefix>MemoryModel
    summary: str  # one line, the classes' docstring
    norm: type[nn.Module]  # the blocks' and the final norm
    ffn: type[nn.Module]
    # Defaults of a config of this style
    norm_eps: float
    dropout: float
    ffn_bias: bool
    bias_allowed: bool = True  # False: a memory of this style never has FFN biases
    # How MemoryConfig.from_base reads the base model's config (the norm epsilon: ArchSpec.norm_eps)
    width_from_base: bool = True  # the FFN width is the base's intermediate_size (else the config's default, 4d)
    bias_from_base: str | None = None  # the base config's attribute saying its FFN has biases (default False)
    presets: dict[str, dict] = field(default_factory=dict)  # named sizes (--base_model_name) made for this style
    released: ReleasedLayout | None = None  # None: the released implementation has no such memory

    @property
    def model_type(self) -> str:
        return f"mlp_memory_{self.name}"

    def fields_from_base(self, base_config, spec: ArchSpec) -> dict:
        """The config fields a memory of this style takes from ``base_config`` (described by ``spec``)."""
        fields = dict(hidden_size=base_config.hidden_size, vocab_size=base_config.vocab_size,
                      norm_eps=getattr(base_config, spec.norm_eps))
        if self.width_from_base:
            fields["intermediate_size"] = base_config.intermediate_size
        if self.bias_from_base:
            fields["ffn_bias"] = bool(getattr(base_config, self.bias_from_base, False))
        return fields

    def norm_parameters(self, d: int) -> int:
        return self.norm.parameters_for(d)

    def block_parameters(self, d: int, inner: int, bias: bool) -> int:
        """One block: its norm and its FFN (8d^2 + 7d for GPT-2 with I = 4d; 3dI + d for a gated FFN, + biases)."""
        return self.norm.parameters_for(d) + self.ffn.parameters_for(d, inner, bias)


_LARGE_LLAMA = dict(hidden_size=4096, num_layers=8, intermediate_size=11008)

MEMORY_STYLES: dict[str, MemoryStyle] = {style.name: style for style in (
    MemoryStyle("gpt2", "GPT2", "LayerNorm (eps 1e-5) + GELU-tanh FFN d -> 4d -> d with bias, dropout 0.1.",
                LayerNorm, GeluFFN, norm_eps=1e-5, dropout=0.1, ffn_bias=True, width_from_base=False,
                presets={"small": dict(hidden_size=768, num_layers=18),  # GPT2-small, ~124M
                         "med": dict(hidden_size=1024, num_layers=36),  # GPT2-medium, ~355M
                         "large": dict(hidden_size=1280, num_layers=54)},  # GPT2-large, 772.6M
                released=GPT2_LAYOUT),
    MemoryStyle("llama", "Llama", "RMSNorm + SwiGLU FFN, no dropout, no bias unless the base model's MLP has one "
                "(``mlp_bias``).", RMSNorm, SwiGLUFFN, norm_eps=1e-6, dropout=0.0, ffn_bias=False,
                bias_from_base="mlp_bias", presets={"llama2": _LARGE_LLAMA, "llama3": _LARGE_LLAMA},
                released=LLAMA_LAYOUT),
    MemoryStyle("mistral", "Mistral", "As Llama, and never an FFN bias.", RMSNorm, SwiGLUFFN, norm_eps=1e-6,
                dropout=0.0, ffn_bias=False, bias_allowed=False,
                presets={"mistral": dict(hidden_size=4096, num_layers=8, intermediate_size=14336)},
                released=MISTRAL_LAYOUT),
    MemoryStyle("gemma", "Gemma", "RMSNorm + GeGLU FFN (GELU-tanh gate, as Gemma 2/3), no dropout, no bias.",
                RMSNorm, GeGLUFFN, norm_eps=1e-6, dropout=0.0, ffn_bias=False),
)}
