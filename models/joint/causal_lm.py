"""The joint model as one Hugging Face causal LM: base model + memory in one directory, for any HF tool.

    python -m models.convert --joint --base_model BASE --memory MEMORY --output JOINT_DIR --lmbda 0.25

    import models                                        # registers the classes (no trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(JOINT_DIR)
    pipeline("text-generation", model=JOINT_DIR)

`MLPMemoryJointConfig` holds the base model's config (``text_config``, so that ``generate`` sizes its KV
cache from it), the memory's config (``memory_config``: an MLP memory's, or a causal LM's for a Memory
Decoder), ``lmbda``, ``memory_temp`` (the temperature of the memory's logits; a config written before the
rename, with ``knn_temp``, still loads) and the memory's layer. `MLPMemoryForCausalLM` holds the two models as
``base`` and ``memory``; its forward runs the base with the hooks of `models.joint.hooks` attached, so
the logits it returns are the joint log-probabilities (the same code as `JointLM` and evaluate_joint's
formula, `models.joint.interpolation`) and ``loss`` with ``labels`` is the joint NLL. Every ``generate``
strategy works: the KV cache is the base model's, and a Memory Decoder gets each step's whole prefix from
`prepare_inputs_for_generation`.

``save_pretrained`` writes config.json and model.safetensors (keys ``base.*`` and ``memory.*``; the
base's tied embedding is stored once). ``from_pretrained`` checks that the memory fits the base
(`check_memory_fits`: sizes, layer, and the base's fingerprint for an MLP memory) once the weights are
loaded, and so does `from_parts`; ``allow_base_mismatch=True`` accepts another base. The head is not
one linear layer, so ``get_output_embeddings()`` is None.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from models.configuration_mlp_memory import MemoryConfig
from models.joint.hooks import mixing_hooks
from models.joint.interpolation import check_joint_settings
from models.joint.memories import MLP_MEMORY, JointMemory, PrefixStage, as_joint_memory
from models.joint.settings import DEFAULT_LMBDA, DEFAULT_MEMORY_TEMP, PERPLEXITY
from models.modeling_mlp_memory import MEMORY_MODELS
from utils.cli import UsageError

logger = logging.getLogger(__name__)


class MLPMemoryJointConfig(PreTrainedConfig):
    """A base causal LM (``text_config``), a memory (``memory_config``) and how they are interpolated."""

    model_type = "mlp_memory_joint"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
        "memory_config": SubConfigSpec(config_class=AutoConfig, model_type="mlp_memory_gpt2"),
    }

    text_config: dict | PreTrainedConfig | None = None
    memory_config: dict | PreTrainedConfig | None = None
    lmbda: float = DEFAULT_LMBDA[PERPLEXITY]  # weight of the memory
    memory_temp: float = DEFAULT_MEMORY_TEMP  # temperature of the memory's logits
    memory_layer: int | None = None  # the base block whose feed-forward input an MLP memory reads (None: tokens)
    memory_kind: str = MLP_MEMORY  # "mlp_memory" or "memory_decoder"
    tie_word_embeddings: bool = False  # the joint model has no head of its own; the base ties its own

    def __post_init__(self, **kwargs):
        if "knn_temp" in kwargs:  # a config written before memory_temp had its own name
            self.memory_temp = kwargs.pop("knn_temp")
        super().__post_init__(**kwargs)
        check_joint_settings(self.lmbda, self.memory_temp)
        self.vocab_size = self.text_config.vocab_size
        self.hidden_size = self.text_config.hidden_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name, None) is None:
                setattr(self, name, getattr(self.text_config, name, None))

    def describe(self) -> dict:
        return {"base": self.text_config.model_type, "memory": self.memory_config.model_type,
                "memory_kind": self.memory_kind, "lmbda": self.lmbda, "memory_temp": self.memory_temp,
                "memory_layer": self.memory_layer}


def _memory_from_config(config: PreTrainedConfig) -> torch.nn.Module:
    if isinstance(config, MemoryConfig):
        return MEMORY_MODELS[config.memory_style](config)
    return AutoModelForCausalLM.from_config(config)


class MLPMemoryForCausalLM(PreTrainedModel, GenerationMixin):
    """Base causal LM + memory; logits are the joint log-probabilities, ``loss`` the joint NLL."""

    config_class = MLPMemoryJointConfig
    base_model_prefix = "joint"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # hooks are registered per forward

    def __init__(self, config: MLPMemoryJointConfig, base: PreTrainedModel | None = None,
                 memory: torch.nn.Module | None = None):
        super().__init__(config)
        self.base = base if base is not None else AutoModelForCausalLM.from_config(config.text_config)
        self.memory = memory if memory is not None else _memory_from_config(config.memory_config)
        self._no_split_modules = list({*(self.base._no_split_modules or []),
                                       *(getattr(self.memory, "_no_split_modules", None) or [])})
        self._stage = PrefixStage()
        self.post_init()

    @classmethod
    def from_parts(cls, base: PreTrainedModel, memory: torch.nn.Module | JointMemory,
                   lmbda: float = DEFAULT_LMBDA[PERPLEXITY], memory_temp: float = DEFAULT_MEMORY_TEMP, tokenizer_fingerprint: str | None = None,
                   allow_base_mismatch: bool = False, *, checked: dict | None = None) -> MLPMemoryForCausalLM:
        """The joint model of loaded models (not copied), after `JointMemory.check_fits` (unless ``checked`` is the
        record of that check already made, by `models.joint.loading.load_joint`)."""
        joint_memory = as_joint_memory(memory)
        if checked is None:
            joint_memory.check_fits(base, tokenizer_fingerprint, allow_base_mismatch)
        attention = base.config._attn_implementation
        config = MLPMemoryJointConfig(text_config=base.config, memory_config=joint_memory.module.config, lmbda=lmbda,
                                      memory_temp=memory_temp, memory_layer=joint_memory.layer,
                                      memory_kind=joint_memory.kind)
        config._attn_implementation = attention  # a new composite config resets its sub-configs' (the base's own)
        joint_memory.to(device=base.device, dtype=base.dtype)
        model = cls(config, base=base, memory=joint_memory.module)
        model.generation_config = base.generation_config
        return model.eval()

    @classmethod
    def from_pretrained(cls, *args, allow_base_mismatch: bool = False, tokenizer_fingerprint: str | None = None,
                        **kwargs):
        """``PreTrainedModel.from_pretrained``, then `check_fits` on the loaded weights (its record: ``base_check``)."""
        model = super().from_pretrained(*args, **kwargs)
        model.base_check = model.check_fits(tokenizer_fingerprint, allow_base_mismatch)
        return model

    @property
    def joint_memory(self) -> JointMemory:
        """The memory behind the interface the hooks call (a view of ``self.memory``, not a copy)."""
        return as_joint_memory(self.memory, self.config.memory_layer)

    def check_fits(self, tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> dict:
        """`JointMemory.check_fits` (a `UsageError` if the memory does not belong to the base); returns its record."""
        joint_memory = self.joint_memory
        record = joint_memory.check_fits(self.base, tokenizer_fingerprint, allow_base_mismatch)
        if joint_memory.layer != self.config.memory_layer:
            raise UsageError(f"The joint config says the memory reads block {self.config.memory_layer}, "
                             f"but the memory reads {joint_memory.layer}")
        return record

    @property
    def lmbda(self) -> float:
        return self.config.lmbda

    @property
    def memory_temp(self) -> float:
        return self.config.memory_temp

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return None  # the joint distribution is no single linear layer's output

    def get_decoder(self):
        return self.base.get_decoder() if hasattr(self.base, "get_decoder") else self.base

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """As the base model's, and the whole prefix handed to a memory that reads it (the base sees only new
        tokens)."""
        if self.joint_memory.reads_prefix:
            self._stage.stage(input_ids, kwargs.get("attention_mask"))
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs):
        """The base model's forward (same arguments, KV cache included) with logits = joint log-probabilities (float32)
        and, given ``labels``, loss = the joint NLL (the base's shifted cross-entropy of those log-probabilities)."""
        with mixing_hooks(self.base, self.joint_memory, self.config.lmbda, self.config.memory_temp, self._stage):
            try:
                return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                 logits_to_keep=logits_to_keep, **kwargs)
            finally:
                self._stage.take()  # a staged prefix serves one forward only
