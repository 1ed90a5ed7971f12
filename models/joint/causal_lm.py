"""The joint model as one Hugging Face causal LM: base model + memory in one directory, for any HF tool.

    python -m models.convert --joint --base_model BASE --memory MEMORY --output JOINT_DIR --lmbda 0.25

    import models                                        # registers the classes (no trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(JOINT_DIR)
    pipeline("text-generation", model=JOINT_DIR)

`MLPMemoryJointConfig` holds the base model's config (``text_config``, so that ``generate`` sizes its KV
cache from it), the memory's config (``memory_config``: an MLP memory's, or a causal LM's for a Memory
Decoder), ``lmbda``, ``knn_temp`` and the memory's layer. `MLPMemoryForCausalLM` holds the two models as
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
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from models.configuration_mlp_memory import MemoryConfig
from models.joint.hooks import PrefixStage, check_memory_fits, load_checked_memory, mixing_hooks
from models.joint.interpolation import check_joint_settings
from models.joint.token_memory import MEMORY_DECODER, MLP_MEMORY, memory_kind
from models.modeling_mlp_memory import MEMORY_MODELS
from utils.cli import UsageError
from utils.io import read_json
from utils.modeling import loading

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
    lmbda: float = 0.25  # weight of the memory
    knn_temp: float = 1.0  # temperature of the memory's softmax
    memory_layer: int | None = None  # the base block whose feed-forward input an MLP memory reads (None: tokens)
    memory_kind: str = MLP_MEMORY  # "mlp_memory" or "memory_decoder"
    tie_word_embeddings: bool = False  # the joint model has no head of its own; the base ties its own

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_joint_settings(self.lmbda, self.knn_temp)
        self.vocab_size = self.text_config.vocab_size
        self.hidden_size = self.text_config.hidden_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name, None) is None:
                setattr(self, name, getattr(self.text_config, name, None))

    def describe(self) -> dict:
        return {"base": self.text_config.model_type, "memory": self.memory_config.model_type,
                "memory_kind": self.memory_kind, "lmbda": self.lmbda, "knn_temp": self.knn_temp,
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
    def from_parts(cls, base: PreTrainedModel, memory: torch.nn.Module, lmbda: float = 0.25, knn_temp: float = 1.0,
                   tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> MLPMemoryForCausalLM:
        """The joint model of loaded models (not copied), after `check_memory_fits`."""
        layer, _ = check_memory_fits(base, memory, tokenizer_fingerprint, allow_base_mismatch)
        attention = base.config._attn_implementation
        config = MLPMemoryJointConfig(text_config=base.config, memory_config=memory.config, lmbda=lmbda,
                                      knn_temp=knn_temp, memory_layer=layer, memory_kind=memory_kind(memory))
        config._attn_implementation = attention  # a new composite config resets its sub-configs' (the base's own)
        memory.to(device=base.device, dtype=base.dtype)
        model = cls(config, base=base, memory=memory)
        model.generation_config = base.generation_config
        return model.eval()

    @classmethod
    def from_pretrained(cls, *args, allow_base_mismatch: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained``, then `check_memory_fits` on the loaded weights."""
        model = super().from_pretrained(*args, **kwargs)
        model.check_fits(allow_base_mismatch=allow_base_mismatch)
        return model

    def check_fits(self, tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> dict:
        """`check_memory_fits` (a `UsageError` if the memory does not belong to the base); returns its record."""
        layer, record = check_memory_fits(self.base, self.memory, tokenizer_fingerprint, allow_base_mismatch)
        if layer != self.config.memory_layer:
            raise UsageError(f"The joint config says the memory reads block {self.config.memory_layer}, "
                             f"but the memory reads {layer}")
        return record

    @property
    def lmbda(self) -> float:
        return self.config.lmbda

    @property
    def knn_temp(self) -> float:
        return self.config.knn_temp

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return None  # the joint distribution is no single linear layer's output

    def get_decoder(self):
        return self.base.get_decoder() if hasattr(self.base, "get_decoder") else self.base

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """As the base model's, and the whole prefix handed to a Memory Decoder (the base sees only new tokens)."""
        if self.config.memory_kind == MEMORY_DECODER:
            self._stage.stage(input_ids, kwargs.get("attention_mask"))
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs):
        """The base model's forward (same arguments, KV cache included) with logits = joint log-probabilities (float32)
        and, given ``labels``, loss = the joint NLL (the base's shifted cross-entropy of those log-probabilities)."""
        stage = self._stage if self.config.memory_kind == MEMORY_DECODER else None
        with mixing_hooks(self.base, self.memory, self.config.memory_layer, self.config.lmbda, self.config.knn_temp,
                          stage):
            try:
                return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                 logits_to_keep=logits_to_keep, **kwargs)
            finally:
                self._stage.take()  # a staged prefix serves one forward only


# ---------------------------------------------------------------------------------------------------
# A joint directory in place of --model_name_or_path + --knn_generator_path (evaluate_joint, eval_qa, the demo)

DEFAULT_LMBDA = 0.25
DEFAULT_KNN_TEMP = 1.0


def is_joint_directory(path: str | None) -> bool:
    """Whether ``path`` is a directory holding an `MLPMemoryForCausalLM` (config.json of model_type mlp_memory_joint)."""
    config_file = os.path.join(path, "config.json") if path else ""
    if not os.path.isfile(config_file):
        return False
    try:
        return read_json(config_file).get("model_type") == MLPMemoryJointConfig.model_type
    except ValueError:  # not JSON: whoever loads it says so
        return False


@dataclass
class BaseAndMemory:
    """What an entry point evaluates: the base model, the memory (None: the base alone) and the settings in force."""

    model: PreTrainedModel
    memory: torch.nn.Module | None
    layer: int | None
    base_check: dict | None
    lmbda: float
    knn_temp: float
    memory_path: str | None  # the memory's directory, or the joint directory it came from
    joint_dir: str | None  # the joint directory, when --model_name_or_path was one


def load_base_and_memory(model_args, memory_path: str | None, load_base: Callable[[], PreTrainedModel],
                         lmbda: float | None = None, knn_temp: float | None = None,
                         tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False,
                         default_lmbda: float = DEFAULT_LMBDA) -> BaseAndMemory:
    """The base model and the memory from ``--model_name_or_path`` (a joint directory, split into its base and its
    memory, with its lmbda / knn_temp unless given) or from ``load_base()`` and ``memory_path`` (None: no memory),
    checked against each other (`check_memory_fits`)."""
    path = model_args.model_name_or_path
    if is_joint_directory(path):
        if memory_path:
            raise UsageError(f"--model_name_or_path {path} is a joint model (base + memory): drop "
                             f"--knn_generator_path {memory_path}, or give the base model instead")
        if getattr(model_args, "gguf_file", None):
            raise UsageError(f"--model_name_or_path {path} is a joint model, not a GGUF directory: drop --gguf_file")
        with loading(path, "--model_name_or_path"):
            joint = MLPMemoryForCausalLM.from_pretrained(path, dtype=getattr(torch, model_args.torch_dtype),
                                                         allow_base_mismatch=allow_base_mismatch)
        base_check = joint.check_fits(tokenizer_fingerprint, allow_base_mismatch)
        logger.info("--model_name_or_path %s: a joint model (%s)", path, joint.config.describe())
        resolved = BaseAndMemory(joint.base.eval(), joint.memory.eval(), joint.config.memory_layer, base_check,
                                 joint.lmbda if lmbda is None else lmbda,
                                 joint.knn_temp if knn_temp is None else knn_temp,
                                 os.path.abspath(path), os.path.abspath(path))
    else:
        base = load_base()
        memory = layer = base_check = None
        if memory_path:
            memory, layer, base_check = load_checked_memory(memory_path, base, tokenizer_fingerprint,
                                                            allow_base_mismatch)
        resolved = BaseAndMemory(base, memory, layer, base_check, default_lmbda if lmbda is None else lmbda,
                                 DEFAULT_KNN_TEMP if knn_temp is None else knn_temp, memory_path, None)
    check_joint_settings(resolved.lmbda, resolved.knn_temp)
    return resolved
