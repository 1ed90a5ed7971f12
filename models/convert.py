"""Convert memories between layouts, and build a self-contained joint model.

    python -m models.convert --from official --input DIR --output DIR --base_model BASE [--layer L]
    python -m models.convert --to official --input DIR --output DIR [--base_model BASE]
    python -m models.convert --joint --base_model BASE --memory DIR --output DIR --lmbda 0.25

The first two convert between the released implementation's memory layout and ours
(`models.official` reads and writes it): ``--from official`` records the base model, its fingerprint and
the layer, which the released files lack; ``--to official`` writes the base model's config with the
memory's depth and the released weight names, and refuses, in one line, a base family the released code
has no memory for. The third writes one Hugging Face causal LM holding the base model and the memory
(`models.joint.build`), which ``AutoModelForCausalLM.from_pretrained`` loads after ``import models``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from models.configuration_mlp_memory import check_memory_matches
from models.memory_directory import load_memory, save_memory
from models.model_card import released_card, write_card
from models.official import (LAYER_FILE, known_layouts, load_released, released_config, released_directory,
                             released_layer, released_state_dict, released_style, write_released)
from utils.architectures import arch_spec, transformer_blocks
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError, parse_args, run, setup_logging
from utils.io import check_writable, output_directory, partial_path, read_json, timed
from utils.locking import artifact_lock
from utils.modeling import (check_exists, describe_model, load_causal_lm, load_tokenizer, loading, model_fingerprint,
                            tokenizer_fingerprint)

logger = logging.getLogger(__name__)


@dataclass
class ConvertArguments:
    """``python -m models.convert --from official`` / ``--to official``."""

    input: str = field(metadata={"help": "The memory to convert: a released directory (--from official) or one of "
                                         "this project's memory directories (--to official)."})
    output: str = field(metadata={"help": "Directory to write (built under <output>.partial, renamed when complete)."})
    from_layout: str | None = field(default=None, metadata={
        "aliases": ["--from"], "choices": ["official"],
        "help": "Read the released implementation's layout from --input and write this project's format."})
    to_layout: str | None = field(default=None, metadata={
        "aliases": ["--to"], "choices": ["official"],
        "help": "Read this project's memory from --input and write the released implementation's layout."})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub name or local directory of the base model. --from official: required, recorded with its "
                "fingerprint and tokenizer fingerprint. --to official: its config becomes the root config.json "
                "(default: the base model the memory records)."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file inside --base_model, when the base model is one (dequantised to float on load)."})
    layer: int | None = field(default=None, metadata={
        "help": "--from official: the base block whose feed-forward input the memory reads (default: the "
                "layer_position of mlp_memory_config.json if present, else -1, the last block, as the released code)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace --output if it exists."})

    def __post_init__(self):
        if (self.from_layout is None) == (self.to_layout is None):
            raise UsageError("Give exactly one of --from official or --to official (or --joint, see python -m "
                             "models.convert --help)")
        if self.from_layout and not self.base_model:
            raise UsageError("--from official needs --base_model: the released files do not record the base model, "
                             "which this project's format records and checks")
        if self.layer is not None and self.to_layout:
            raise UsageError("--layer applies to --from official (--to official writes the layer the memory records)")
        if self.gguf_file and not self.base_model:
            raise UsageError("--gguf_file names a file inside --base_model; give --base_model too")
        if os.path.abspath(self.input) == os.path.abspath(self.output):
            raise UsageError(f"--output {self.output} is --input: write the conversion to another directory")


def from_official(args: ConvertArguments) -> dict:
    """Read the released memory, record the base model (fingerprint at the layer, tokenizer) and save it in our
    format with `models.memory_directory.save_memory`; returns the meta.json written."""
    if released_directory(args.input) is None:
        raise UsageError(f"--input {args.input}: not a released memory directory (" +
                         ("it is in this project's format already: use --to official to export it" if
                          os.path.isfile(os.path.join(args.input, "meta.json")) else known_layouts()) + ")")
    memory = load_released(args.input, "--input")
    base_args = PretrainedModelArguments(model_name_or_path=args.base_model, gguf_file=args.gguf_file)
    with timed("Loading the base model", logger):
        base = load_causal_lm(base_args).eval()
    style = arch_spec(base.config.model_type).memory_style
    if style != memory.config.memory_style:
        raise UsageError(f"--base_model {args.base_model} is a {base.config.model_type} model (a {style}-style memory), "
                         f"but --input {args.input} holds a released {memory.config.memory_style} memory")
    check_memory_matches(memory.config, base, memory_path=args.input)
    num_blocks = len(transformer_blocks(base))
    layer = args.layer
    flag = "--layer"
    if layer is None:
        layer = released_layer(released_directory(args.input))
        layer, flag = (-1, "--layer") if layer is None else (layer, f"layer_position of {LAYER_FILE}")
    if not -num_blocks <= layer < num_blocks:
        raise UsageError(f"{flag} {layer} is out of range for --base_model {args.base_model} ({num_blocks} blocks)")
    layer %= num_blocks
    try:
        fingerprint = tokenizer_fingerprint(load_tokenizer(args.base_model, args.gguf_file, "--base_model"))
    except (OSError, ValueError):
        fingerprint = None
        logger.warning("No tokenizer beside --base_model %s: the memory records no tokenizer fingerprint", args.base_model)
    record = {"base_model": describe_model(base_args), "base_architecture": base.config.model_type, "layer": layer,
              "tokenizer_fingerprint": fingerprint, "base_model_fingerprint": model_fingerprint(base, layer)}
    for name, value in record.items():
        setattr(memory.config, name, value)
    del base
    source = {"layout": memory.config.released_layout, "path": os.path.abspath(args.input)}
    with staged_output(args) as staging:
        return save_memory(staging, memory, {}, {**record, "converted_from": source})


def to_official(args: ConvertArguments) -> Path:
    """Write our memory in the released layout: the base model's config with the memory's depth, its tensors under
    the released names, and the layer as ``mlp_memory_config.json``'s ``layer_position``."""
    if released_directory(args.input) is not None:
        raise UsageError(f"--input {args.input} is in the released layout already (use --from official to import it)")
    memory = load_memory(args.input, "--input")
    if memory.config.base_architecture and not args.base_model:  # refuse a family without a released form first
        released_style(memory.config, memory.config.base_architecture, f"the base model of --input {args.input}")
    recorded = memory.config.base_model or {}
    base, flag = (args.base_model, "--base_model") if args.base_model else \
        (recorded.get("model_name_or_path"), f"the base model recorded in {args.input}/config.json")
    if not base:
        raise UsageError(f"--input {args.input} records no base model: give --base_model, whose config the released "
                         "layout's config.json is")
    check_exists(base, flag)
    gguf_file = args.gguf_file if args.base_model else recorded.get("gguf_file")
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    with loading(base, flag):
        base_config = AutoConfig.from_pretrained(base, **gguf)
    config = released_config(memory.config, base_config, flag)  # refuses what the released classes cannot express
    layout = memory.config.style.released
    layer_position = released_layer_position(memory.config.layer, getattr(base_config, layout.depth_field))
    with staged_output(args) as staging:
        write_released(config, released_state_dict(memory), staging, layer_position)
        source_meta = Path(args.input) / "meta.json"
        write_card(staging, released_card(read_json(source_meta) if source_meta.is_file() else {},
                                          Path(args.output).name, base, layer_position))
    logger.info("Wrote %s in the released %s layout (%d blocks, base config from %s)", args.output,
                layout.memory_class, memory.config.num_layers, base)
    return Path(args.output)


def released_layer_position(layer: int | None, num_blocks: int) -> int:
    """The ``layer_position`` to record: -1 (the released default) for the last block; another block with one
    warning, since the released scripts never pass ``layer_position`` and would run the memory at the last block."""
    if layer is None or layer == num_blocks - 1:
        return -1
    logger.warning("--to official: this memory reads block %d of the base model's %d, but the released "
                   "evaluate_joint builds MLPMemory without layer_position, so the released scripts run it at the last "
                   "block, silently giving wrong results; %s records layer_position %d, which only code that passes "
                   "MLPMemory(..., layer_position=%d) uses", layer, num_blocks, LAYER_FILE, layer, layer)
    return layer


@contextmanager
def staged_output(args: ConvertArguments) -> Iterator[Path]:
    """Build --output under ``<output>.partial`` and rename it into place when complete, holding its lock
    (`utils.locking`); an existing --output is replaced only with --overwrite_output_dir, once the new one is complete."""
    output = output_directory(args.output)
    staging = partial_path(output)
    with artifact_lock(output, "--output"):
        check_output(output, args.overwrite_output_dir)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:  # nothing to resume: a conversion is redone from the start
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing --output without --overwrite_output_dir, a file, or a place that cannot be written."""
    if output.exists() and not overwrite:
        raise UsageError(f"--output {output} already exists; pass --overwrite_output_dir to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a directory")
    check_writable(output, "--output")


def convert_layouts(argv: list[str]) -> int:
    """``--from official`` / ``--to official``."""
    (args,) = parse_args((ConvertArguments,), argv)
    logger.info("Converting: %s", args)
    check_output(Path(args.output), args.overwrite_output_dir)  # before any reading
    if not os.path.exists(args.input):
        raise UsageError(f"--input {args.input}: no such directory")
    if args.from_layout:
        meta = from_official(args)
        print(f"Wrote {args.output}: {json.dumps(meta['memory'])}, base model {args.base_model}, layer {meta['layer']}")
    else:
        to_official(args)
        print(f"Wrote {args.output} in the released layout")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--joint" in argv:
        from models.joint.build import main as build_joint
        return build_joint([arg for arg in argv if arg != "--joint"])
    setup_logging()
    return convert_layouts(argv)


if __name__ == "__main__":
    setup_logging()
    run(main)
