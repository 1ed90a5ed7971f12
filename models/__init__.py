"""The MLP memory: configuration, networks for GPT-2 / Llama / Mistral / Gemma style blocks, loading and checks.

Importing this package registers the memory configs and networks with `AutoConfig` / `AutoModel`, so
``AutoModel.from_pretrained(memory_dir)`` works without ``trust_remote_code``, and the joint model
(`models.joint.causal_lm`) with `AutoConfig` / `AutoModelForCausalLM`, so
``AutoModelForCausalLM.from_pretrained(joint_dir)`` and ``pipeline("text-generation", model=joint_dir)`` do.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from models.configuration_mlp_memory import (PRESETS, GemmaMemoryConfig, GPT2MemoryConfig, LlamaMemoryConfig,
                                             MemoryConfig, MistralMemoryConfig, check_memory_matches, parameter_count)
from models.memory_directory import load_memory
from models.memory_styles import MEMORY_STYLES
from models.modeling_mlp_memory import (MEMORY_MODELS, GemmaMemoryModel, GPT2MemoryModel, LlamaMemoryModel,
                                        MistralMemoryModel, MLPMemoryPreTrainedModel, build_memory,
                                        init_lm_head_from_base)

for _style, _model in MEMORY_MODELS.items():
    AutoConfig.register(_model.config_class.model_type, _model.config_class, exist_ok=True)
    AutoModel.register(_model.config_class, _model, exist_ok=True)

from models.joint.causal_lm import MLPMemoryForCausalLM, MLPMemoryJointConfig  # after the memory configs it needs

AutoConfig.register(MLPMemoryJointConfig.model_type, MLPMemoryJointConfig, exist_ok=True)
AutoModelForCausalLM.register(MLPMemoryJointConfig, MLPMemoryForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS", "MEMORY_STYLES", "MemoryConfig", "GPT2MemoryConfig", "LlamaMemoryConfig", "MistralMemoryConfig",
    "GemmaMemoryConfig", "check_memory_matches", "parameter_count", "MEMORY_MODELS", "MLPMemoryPreTrainedModel",
    "GPT2MemoryModel", "LlamaMemoryModel", "MistralMemoryModel", "GemmaMemoryModel", "build_memory",
    "init_lm_head_from_base", "load_memory", "MLPMemoryJointConfig", "MLPMemoryForCausalLM",
]
