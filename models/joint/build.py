"""Build a self-contained joint model directory (`models.joint.causal_lm`) from a base model and a memory.

    python -m models.convert --joint --base_model BASE --memory MEMORY --output JOINT_DIR --lmbda 0.25 [--knn_temp 1]

``MEMORY`` is an MLP memory (train_mlpmem_*) or a Memory Decoder (a causal LM over the base's tokens).
``JOINT_DIR`` holds config.json, model.safetensors (base and memory), generation_config.json, the base's
tokenizer, README.md (its model card, `models.model_card`), and meta.json (kind "mlp_memory_joint": what it was built from, the settings, the base model
check and the block checksums of the model files). It is written under a temporary name and renamed
when complete; an existing ``JOINT_DIR`` is replaced only with ``--overwrite_output_dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from models.joint.causal_lm import DEFAULT_KNN_TEMP, DEFAULT_LMBDA, MLPMemoryForCausalLM
from models.joint.hooks import load_checked_memory
from models.joint.token_memory import memory_kind
from models.model_card import joint_card, write_card
from utils.arguments import BaseCheckArguments, PretrainedModelArguments
from utils.checksums import model_files, record_checksums
from utils.cli import UsageError, check_finite_floats, parse_args, setup_logging
from utils.io import META_NAME, partial_path, timed, write_json
from utils.locking import artifact_lock
from utils.modeling import (describe_model, load_causal_lm, load_tokenizer, local_path_or_name, model_tokenizer_path,
                            tokenizer_fingerprint)

logger = logging.getLogger(__name__)

KIND = "mlp_memory_joint"
FORMAT_VERSION = 1


@dataclass
class JointBuildArguments:
    """What goes into the joint model and where it is written."""

    base_model: str = field(metadata={"help": "Hub name or local directory of the base causal LM."})
    memory: str = field(metadata={"help": "The memory: an MLP memory directory (train_mlpmem_*) or a Memory Decoder "
                                          "(a causal LM directory sharing the base's tokenizer)."})
    output: str = field(metadata={"help": "Directory to write the joint model to."})
    lmbda: float = field(default=DEFAULT_LMBDA, metadata={"help": "Weight of the memory in the interpolation, in [0, 1]."})
    knn_temp: float = field(default=DEFAULT_KNN_TEMP, metadata={"help": "Temperature T of softmax(memory_logits / T)."})
    torch_dtype: str = field(default="float32", metadata={
        "help": "Dtype of the saved weights: float32 or bfloat16 (float16 changes the base's fingerprint).",
        "choices": ["float32", "bfloat16", "float16"]})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output directory."})

    def __post_init__(self):
        check_finite_floats(self)
        from models.joint.interpolation import check_joint_settings

        check_joint_settings(self.lmbda, self.knn_temp)


def build_joint(args: JointBuildArguments, checks: BaseCheckArguments) -> dict:
    """Load and check the base and the memory, save them as one `MLPMemoryForCausalLM` with the tokenizer and
    meta.json; returns the meta written."""
    output = Path(args.output)
    if output.exists() and not args.overwrite_output_dir:
        raise UsageError(f"--output {output} already exists; pass --overwrite_output_dir to replace it")
    if not os.path.isfile(os.path.join(args.memory, "config.json")):
        raise UsageError(f"--memory {args.memory}: no config.json there (expected an MLP memory or a Memory Decoder "
                         "directory)")
    model_args = PretrainedModelArguments(model_name_or_path=args.base_model, torch_dtype=args.torch_dtype)
    tokenizer_path, gguf_file = model_tokenizer_path(model_args)
    tokenizer = load_tokenizer(tokenizer_path, gguf_file, "--base_model")
    fingerprint = tokenizer_fingerprint(tokenizer)
    base = load_causal_lm(model_args).eval()
    memory, layer, base_check = load_checked_memory(args.memory, base, fingerprint, checks.allow_base_mismatch)
    joint = MLPMemoryForCausalLM.from_parts(base, memory, args.lmbda, args.knn_temp, fingerprint,
                                            checks.allow_base_mismatch)
    staging = partial_path(output)
    if staging.exists():
        shutil.rmtree(staging)
    with timed(f"Saving the joint model to {output}", logger):
        joint.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "base_model": describe_model(model_args),
            "memory": local_path_or_name(args.memory), "memory_kind": memory_kind(memory), "memory_layer": layer,
            "lmbda": args.lmbda, "knn_temp": args.knn_temp, "torch_dtype": args.torch_dtype,
            "tokenizer_fingerprint": fingerprint, "base_check": base_check,
            "parameters": {"base": base.num_parameters(), "memory": sum(p.numel() for p in memory.parameters())},
            "checksums": record_checksums(staging, model_files(staging))}
    write_card(staging, joint_card(meta, output.name))
    write_json(staging / META_NAME, meta)
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    logger.info("Wrote the joint model %s: base %s + %s %s, lmbda %g, knn_temp %g", output, args.base_model,
                meta["memory_kind"], args.memory, args.lmbda, args.knn_temp)
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m models.convert --joint ...`` (argv without ``--joint``); 0 once the directory is written."""
    setup_logging()
    args, checks = parse_args((JointBuildArguments, BaseCheckArguments), argv)
    logger.info("Arguments: %s %s", args, checks)
    with artifact_lock(args.output, "--output"):
        build_joint(args, checks)
    return 0
