"""Build a self-contained joint model directory (`models.joint.causal_lm`) from a base model and a memory.

    python -m models.convert --joint --base_model BASE --memory MEMORY --output JOINT_DIR --lmbda 0.25 [--memory_temp 1]
    python -m models.convert --joint --base_model JOINT_DIR --output JOINT_DIR2 --lmbda 0.5   # other settings

``MEMORY`` is an MLP memory (train_mlpmem_*), a released one, or a Memory Decoder (a causal LM over the base's
tokens); ``BASE`` may be a joint directory, which brings its memory (and its settings unless given). The
memory flags are `models.joint.settings.MemoryArguments` (``--knn_generator_path`` and ``--knn_temp`` are the
released names of ``--memory`` and ``--memory_temp``), read by the one loader, `models.joint.loading`;
``--lmbda`` has no default here: the directory records it for every later use.
``JOINT_DIR`` holds config.json, model.safetensors (base and memory), generation_config.json, the base's
tokenizer, README.md (its model card, `models.model_card`) and meta.json (kind "mlp_memory_joint": what it was
built from, the settings, the base model check and the block checksums of the model files). It is written under a
temporary name and renamed when complete; an existing ``JOINT_DIR`` is replaced only with ``--overwrite_output_dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from models.joint.causal_lm import MLPMemoryForCausalLM
from models.joint.loading import load_joint
from models.joint.settings import BUILD, MemoryArguments
from models.model_card import joint_card, write_card
from utils.arguments import PretrainedModelArguments
from utils.checksums import model_files, record_checksums
from utils.cli import UsageError, parse_args, setup_logging
from utils.io import META_NAME, output_directory, partial_path, timed, write_json
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

KIND = "mlp_memory_joint"
FORMAT_VERSION = 1


@dataclass
class JointBuildArguments:
    """The base model and where the joint model is written (the memory and its settings: `MemoryArguments`)."""

    base_model: str = field(metadata={"help": "Hub name or local directory of the base causal LM, or a joint model "
                                              "directory (its memory comes along)."})
    output: str = field(metadata={"help": "Directory to write the joint model to."})
    torch_dtype: str = field(default="float32", metadata={
        "help": "Dtype of the saved weights: float32 or bfloat16 (float16 changes the base's fingerprint).",
        "choices": ["float32", "bfloat16", "float16"]})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output directory."})


def build_joint(args: JointBuildArguments, memory_args: MemoryArguments) -> dict:
    """Load and check the base and the memory (`load_joint`), save them as one `MLPMemoryForCausalLM` with the
    tokenizer and meta.json; returns the meta written."""
    output = output_directory(args.output)
    if output.exists() and not args.overwrite_output_dir:
        raise UsageError(f"--output {output} already exists; pass --overwrite_output_dir to replace it")
    memory_args.one_lmbda()  # a joint directory records one
    model_args = PretrainedModelArguments(model_name_or_path=args.base_model, torch_dtype=args.torch_dtype)
    loaded = load_joint(model_args, memory_args, BUILD)
    if loaded.memory is None:
        raise UsageError("Give --memory (--knn_generator_path): the memory to build the joint model with")
    record = loaded.record
    joint = MLPMemoryForCausalLM.from_parts(loaded.model, loaded.memory, loaded.lmbda, loaded.memory_temp,
                                            checked=record["base_check"])
    staging = partial_path(output)
    if staging.exists():
        shutil.rmtree(staging)
    with timed(f"Saving the joint model to {output}", logger):
        joint.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "base_model": record["model"],
            "memory": record["memory"], "memory_kind": loaded.memory.kind, "memory_layer": loaded.memory.layer,
            "lmbda": joint.lmbda, "lmbda_source": record["lmbda_source"], "memory_temp": joint.memory_temp,
            "memory_temp_source": record["memory_temp_source"], "torch_dtype": args.torch_dtype,
            "tokenizer_fingerprint": record["tokenizer_fingerprint"], "base_check": record["base_check"],
            "parameters": {"base": loaded.model.num_parameters(), "memory": loaded.memory.num_parameters()},
            "checksums": record_checksums(staging, model_files(staging))}
    write_card(staging, joint_card(meta, output.name))
    write_json(staging / META_NAME, meta)
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    logger.info("Wrote the joint model %s: base %s + %s %s, lmbda %g, memory_temp %g", output, args.base_model,
                meta["memory_kind"], record["memory"], joint.lmbda, joint.memory_temp)
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m models.convert --joint ...`` (argv without ``--joint``); 0 once the directory is written."""
    setup_logging()
    args, memory_args = parse_args((JointBuildArguments, MemoryArguments), argv)
    logger.info("Arguments: %s %s", args, memory_args)
    with artifact_lock(args.output, "--output"):
        build_joint(args, memory_args)
    return 0
