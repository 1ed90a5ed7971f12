"""The memory directory: what train_mlpmem_offline / train_mlpmem_online write, and `load_memory` to read it.

Layout::

    config.json, model.safetensors   the memory (save_pretrained; models.load_memory / AutoModel)
    meta.json                        kind "mlp_memory": what it was trained from, sizes, settings, results,
                                     the block checksums of config.json and the weights (utils/checksums.py)
    training_results.json            final metrics
    metrics.jsonl                    one JSON line per logging step and per validation
    checkpoints/step-00001234/       the latest checkpoint(s); the run resumes from the newest: model, optimizer,
                                     scheduler and RNG states in safetensors and JSON (never pickle), and
                                     trainer_state.json (the step and the run's identity); layout in
                                     models/training/checkpoints.py

`save_memory` writes the memory, then training_results.json and, last, meta.json: a directory with a
meta.json holds a finished memory (models.training refuses to train over it without
--overwrite_output_dir). The network alone is an ordinary Hugging Face model directory: `load_memory`
reads it (from safetensors only: a pickled ``pytorch_model.bin`` is never loaded) with a clear error for
anything else, after checking the files against meta.json's block checksums. It also recognises the
released implementation's layout (`models.official`) and reads it into our classes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.configuration_mlp_memory import MemoryConfig
from models.modeling_mlp_memory import MEMORY_MODELS, MLPMemoryPreTrainedModel
from models.official import known_layouts, load_released, released_directory
from utils.checksums import model_files, record_checksums, refuse_unverifiable, verify_files
from utils.cli import UsageError
from utils.io import META_NAME, ArtifactError, check_fields, read_meta_file, timed, write_json
from utils.modeling import loading, weight_files

logger = logging.getLogger(__name__)

KIND = "mlp_memory"
FORMAT_VERSION = 1
CONFIG = "config.json"
META = META_NAME
TRAINING_RESULTS = "training_results.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
CONFIG_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_layers")  # what a memory's config.json must say


def save_memory(output_dir: str | os.PathLike, memory: MLPMemoryPreTrainedModel, results: dict, record: dict) -> dict:
    """Save the memory with save_pretrained, then training_results.json and (last, marking completion) meta.json.

    ``results`` are the final metrics; ``record`` (what the memory was trained from and how) goes into
    meta.json beside the memory's sizes, the results and the block checksums of the saved files. Returns
    the meta written.
    """
    with timed("Saving the memory", logger):
        memory.save_pretrained(output_dir)
    write_json(Path(output_dir) / TRAINING_RESULTS, results)
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "memory": memory.config.describe(), **record,
            "results": results, "checksums": record_checksums(output_dir, model_files(output_dir))}
    write_json(Path(output_dir) / META, meta)
    return meta


def load_memory(path: str | os.PathLike, flag: str = "--knn_generator_path", verify: bool = True,
                allow_unverified: bool = False, **kwargs) -> MLPMemoryPreTrainedModel:
    """A memory saved with ``save_pretrained``, or a released checkpoint; a clear error naming ``flag`` for anything else.

    With ``verify``, its files (config.json and every weight file) are first checked against the block checksums in
    its meta.json; a directory without them (no meta.json, e.g. written by ``save_pretrained`` alone, or a record
    removed) is refused unless ``allow_unverified`` (``--allow_unverified``), then read after a warning. A directory in the
    released implementation's layout (a base model's config.json with the memory's depth, `models.official`)
    is recognised and read into our classes (its ``pytorch_model.bin`` with ``weights_only=True`` only); it
    carries no checksums and records no base model.
    """
    from transformers import AutoConfig

    if released_directory(path) is not None:
        memory = load_released(path, flag, dtype=kwargs.get("dtype"))
        check_finite_weights(memory, path, flag)
        return memory
    if not os.path.isfile(os.path.join(path, CONFIG)):
        raise UsageError(f"{flag} {path}: no config.json there (expected a directory saved by train_mlpmem_*, "
                         f"or a released memory: {known_layouts()})")
    try:
        config_json = read_meta_file(Path(path) / CONFIG, "the JSON configuration of an MLP memory")
    except ArtifactError as err:
        raise ArtifactError(f"{flag} {err}") from None
    is_memory = str(config_json.get("model_type", "")).startswith(KIND)  # another model is refused as such below
    if is_memory:
        check_fields(config_json, CONFIG_FIELDS, f"{flag} {Path(path) / CONFIG}")
    if verify and is_memory:
        verify_memory_files(Path(path), flag, allow_unverified)
    with loading(str(path), flag):
        config = AutoConfig.from_pretrained(path)
    if not isinstance(config, MemoryConfig):
        raise UsageError(f"{flag} {path} holds a {config.model_type!r} model, not an MLP memory; {known_layouts()}")
    with loading(str(path), flag):  # a truncated or corrupt safetensors file
        try:
            memory = MEMORY_MODELS[config.memory_style].from_pretrained(path, use_safetensors=True, **kwargs)
        except OSError as err:  # e.g. only a pickled pytorch_model.bin, which is never loaded
            raise UsageError(f"{flag} {path}: {err} (a memory is read from safetensors only)") from None
    check_finite_weights(memory, path, flag)
    return memory


def verify_memory_files(path: Path, flag: str, allow_unverified: bool = False) -> bool:
    """Check a memory's config.json and weight files against its meta.json's block checksums (`verify_files`); a
    memory without meta.json, or whose meta.json records none, is an `ArtifactError` naming ``flag`` unless
    ``allow_unverified``. Returns whether every file was verified."""
    meta_file = path / META
    try:
        if not meta_file.is_file():
            return refuse_unverifiable(path, f"it has no {META} (train_mlpmem_* writes one; save_pretrained alone does "
                                             "not)", allow_unverified)
        meta = read_meta_file(meta_file, "the JSON description of a memory")
        return verify_files(path, meta, model_files(path), allow_unverified)
    except ArtifactError as err:
        raise ArtifactError(f"{flag} {err}") from None


def check_finite_weights(memory: MLPMemoryPreTrainedModel, path: str | os.PathLike, flag: str) -> None:
    """A memory whose weights hold NaN or infinities (flipped bytes, a diverged run) is refused: its log-probabilities
    would be NaN, and so would every perplexity and answer computed with it."""
    for name, parameter in memory.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ArtifactError(f"{flag} {path}: the memory's weights hold NaN or infinite values ({name}): "
                                f"{weight_files(str(path))} is corrupt, or the training diverged; retrain or restore it")
