"""The one loader: a base model and any memory, or a joint directory, as one checked `LoadedJoint`.

    loaded = load_joint(model_args, memory_args, PERPLEXITY)      # or DOWNSTREAM
    loaded.model, loaded.memory, loaded.lmbdas, loaded.memory_temp, loaded.record
    with loaded.joint(lmbda).attached(): ...                        # or loaded.joint(lmbda).generate(...)

``model_args`` (`utils.arguments.PretrainedModelArguments`) names the base: a hub name, a directory, a GGUF
file in one, or a joint directory (``python -m models.convert --joint``), which holds its memory, its
``lmbda`` and its ``memory_temp``; its files are first checked against the checksums its meta.json records.
``memory_args`` (`models.joint.settings.MemoryArguments`) names the memory, if any: this project's memory
directory, a released one (`models.official`), or a Memory Decoder (safetensors, or a ``pytorch_model.bin``
read with ``weights_only=True``). Either way the memory is checked once against the base (its fingerprint,
the tokenizer, the width, the vocabulary: `JointMemory.check_fits`) and cast to the base's dtype, so every
entry point computes the same numbers (the mixing itself is in float32). The settings are resolved by the
one policy of `models.joint.settings` (``purpose``, and a QA ``preset`` that carries an ``lmbda``).
``record`` is what results files carry: paths, kind, layer, the base check, and where the settings came from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.joint.causal_lm import MLPMemoryForCausalLM, MLPMemoryJointConfig
from models.joint.hooks import JointLM
from models.joint.memories import JointMemory, as_joint_memory
from models.joint.settings import MemoryArguments, resolve_lmbdas, resolve_memory_temp
from models.joint.token_memory import load_any_memory
from utils.arguments import PretrainedModelArguments
from utils.checksums import verify_files
from utils.cli import UsageError
from utils.io import META_NAME, read_json
from utils.modeling import (describe_model, load_causal_lm, load_tokenizer, loading, local_path_or_name,
                            model_tokenizer_path)
from utils.modeling import tokenizer_fingerprint as fingerprint_of

logger = logging.getLogger(__name__)


def is_joint_directory(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` holds an `MLPMemoryForCausalLM` (a config.json of model_type mlp_memory_joint)."""
    config_file = os.path.join(path, "config.json") if path else ""
    if not os.path.isfile(config_file):
        return False
    try:
        return read_json(config_file).get("model_type") == MLPMemoryJointConfig.model_type
    except ValueError:  # not JSON: whoever loads it says so
        return False


def verify_joint_directory(path: str | os.PathLike, allow_unverified: bool = False) -> bool:
    """Check a joint directory's files against the block checksums its meta.json records (`ArtifactError` naming the
    file and block at fault). A directory without them (saved by ``save_pretrained`` alone, or its record removed)
    is an `ArtifactError` too unless ``allow_unverified`` (``--allow_unverified``): then False, after a warning."""
    meta_file = Path(path) / META_NAME
    return verify_files(path, read_json(meta_file) if meta_file.is_file() else {}, allow_unverified=allow_unverified)


@dataclass
class LoadedJoint:
    """A base causal LM and its memory (None: the base alone), checked against each other, with the settings in
    force and the record that results carry."""

    model: PreTrainedModel  # the base model, in eval mode
    tokenizer: PreTrainedTokenizerBase | None  # None when the caller gave the tokenizer's fingerprint
    memory: JointMemory | None  # in the base's dtype, in eval mode
    lmbdas: list[float]  # empty without a memory
    memory_temp: float | None
    record: dict

    @property
    def lmbda(self) -> float | None:
        """The first ``lmbda`` (the headline of a run that scores several)."""
        return self.lmbdas[0] if self.lmbdas else None

    def to(self, device) -> LoadedJoint:
        self.model.to(device)
        if self.memory is not None:
            self.memory.to(device)
        return self

    def joint(self, lmbda: float | None = None) -> JointLM:
        """The base with the memory at ``lmbda`` (default: the first), without checking the memory again."""
        if self.memory is None:
            raise UsageError("No memory: give --memory (--knn_generator_path), or a joint model directory as "
                             "--model_name_or_path")
        return JointLM(self.model, self.memory, self.lmbda if lmbda is None else lmbda, self.memory_temp,
                       checked=self.record["base_check"])


def load_joint(model_args: PretrainedModelArguments, memory_args: MemoryArguments, purpose: str, *,
               preset: tuple[str, float] | None = None, tokenizer_fingerprint: str | None = None) -> LoadedJoint:
    """The base of ``model_args`` and the memory of ``memory_args`` (or both from a joint directory), checked once.

    ``purpose`` picks the default ``lmbda`` (`models.joint.settings`: PERPLEXITY, DOWNSTREAM or BUILD); ``preset``
    is (source, lmbda) of a QA protocol preset. With ``tokenizer_fingerprint`` (a dataset's, already checked against
    the model's tokenizer) no tokenizer is loaded; otherwise the base's tokenizer is, and returned.
    """
    path = model_args.model_name_or_path
    joint_directory = is_joint_directory(path)
    if not memory_args.memory and not joint_directory:
        if memory_args.use_neural_knn:
            raise UsageError("--use_neural_knn needs --memory (--knn_generator_path), or a joint model directory as "
                             "--model_name_or_path")
        if memory_args.lmbda is not None or memory_args.memory_temp is not None:
            raise UsageError("--lmbda and --memory_temp (--knn_temp) are only used with a memory: add --memory "
                             "(--knn_generator_path), or drop them")
    tokenizer = None
    if tokenizer_fingerprint is None:
        tok_path, tok_gguf = model_tokenizer_path(model_args)
        tokenizer = load_tokenizer(tok_path, tok_gguf,
                                   "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
        tokenizer_fingerprint = fingerprint_of(tokenizer)
    allow = memory_args.allow_base_mismatch
    recorded_lmbda = recorded_temp = None
    if joint_directory:
        model, memory, base_check, verified, config = _split_joint_directory(path, model_args, memory_args,
                                                                             tokenizer_fingerprint)
        recorded_lmbda = (f"the joint directory {path}", config.lmbda)
        recorded_temp = (f"the joint directory {path}", config.memory_temp)
        memory_path, joint_dir = local_path_or_name(path), local_path_or_name(path)
    else:
        model = load_causal_lm(model_args).eval()
        memory = base_check = verified = joint_dir = None
        memory_path = local_path_or_name(memory_args.memory)
        if memory_args.memory:
            memory = as_joint_memory(load_any_memory(memory_args.memory, "--memory",
                                                       allow_unverified=memory_args.allow_unverified), path=memory_args.memory)
            base_check = memory.check_fits(model, tokenizer_fingerprint, allow)
    if memory is None:
        lmbdas, lmbda_source, memory_temp, temp_source = [], None, None, None
    else:
        memory.to(dtype=model.dtype).eval()  # one policy for every entry point: the memory in the base's dtype
        lmbdas, lmbda_source = resolve_lmbdas(memory_args.lmbda, purpose, preset, recorded_lmbda)
        memory_temp, temp_source = resolve_memory_temp(memory_args.memory_temp, recorded_temp)
    record = {
        "model": describe_model(model_args), "joint_dir": joint_dir, "joint_dir_verified": verified,
        "memory": memory_path, "memory_kind": memory.kind if memory else None,
        "memory_layer": memory.layer if memory else None, "lmbda": lmbdas or None, "lmbda_source": lmbda_source,
        "memory_temp": memory_temp, "memory_temp_source": temp_source, "dtype": str(model.dtype).removeprefix("torch."),
        "base_check": base_check, "tokenizer_fingerprint": tokenizer_fingerprint,
    }
    logger.info("Loaded %s%s", path, f" + {memory.kind} {memory_path} (block {memory.layer}), lmbda {lmbdas} "
                f"({lmbda_source}), memory_temp {memory_temp:g} ({temp_source})" if memory else " (no memory)")
    return LoadedJoint(model, tokenizer, memory, lmbdas, memory_temp, record)


def _split_joint_directory(path: str, model_args: PretrainedModelArguments, memory_args: MemoryArguments,
                           tokenizer_fingerprint: str) -> tuple[PreTrainedModel, JointMemory, dict, bool,
                                                                MLPMemoryJointConfig]:
    """The base and the memory of a joint directory, after checking its files against its checksums: the base, the
    memory, the record of the base check, whether the checksums were there to check, and the joint config."""
    if memory_args.memory:
        raise UsageError(f"--model_name_or_path {path} is a joint model (base + memory): drop --memory "
                         f"(--knn_generator_path) {memory_args.memory}, or give the base model instead")
    if model_args.gguf_file:
        raise UsageError(f"--model_name_or_path {path} is a joint model, not a GGUF directory: drop --gguf_file")
    verified = verify_joint_directory(path, memory_args.allow_unverified)
    with loading(path, "--model_name_or_path"):
        joint = MLPMemoryForCausalLM.from_pretrained(path, dtype=getattr(torch, model_args.torch_dtype),
                                                     allow_base_mismatch=memory_args.allow_base_mismatch,
                                                     tokenizer_fingerprint=tokenizer_fingerprint)
    logger.info("--model_name_or_path %s: a joint model (%s)", path, joint.config.describe())
    memory = as_joint_memory(joint.memory.eval(), joint.config.memory_layer, path)
    return joint.base.eval(), memory, joint.base_check, verified, joint.config
