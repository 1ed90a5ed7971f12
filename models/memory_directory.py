"""The memory directory: what train_mlpmem_offline / train_mlpmem_online write, and `load_memory` to read it.

Layout::

    config.json, model.safetensors   the memory (save_pretrained; models.load_memory / AutoModel)
    meta.json                        kind "mlp_memory": what it was trained from, sizes, settings, results
    training_results.json            final metrics
    metrics.jsonl                    one JSON line per logging step and per validation
    checkpoints/step-00001234/       the latest checkpoint(s); the run resumes from the newest
                                     (accelerate's state plus trainer_state.json: the step and the run's identity)

`save_memory` writes the memory, then training_results.json and, last, meta.json: a directory with a
meta.json holds a finished memory (models.training refuses to train over it without
--overwrite_output_dir). The network alone is an ordinary Hugging Face model directory: `load_memory`
reads it with a clear error for anything else.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.configuration_mlp_memory import MemoryConfig
from models.modeling_mlp_memory import MEMORY_MODELS, MLPMemoryPreTrainedModel
from utils.cli import UsageError
from utils.io import META_NAME, ArtifactError, timed, write_json
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


def save_memory(output_dir: str | os.PathLike, memory: MLPMemoryPreTrainedModel, results: dict, record: dict) -> dict:
    """Save the memory with save_pretrained, then training_results.json and (last, marking completion) meta.json.

    ``results`` are the final metrics; ``record`` (what the memory was trained from and how) goes into
    meta.json beside the memory's sizes and the results. Returns the meta written.
    """
    with timed("Saving the memory", logger):
        memory.save_pretrained(output_dir)
    write_json(Path(output_dir) / TRAINING_RESULTS, results)
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "memory": memory.config.describe(), **record,
            "results": results}
    write_json(Path(output_dir) / META, meta)
    return meta


def load_memory(path: str | os.PathLike, flag: str = "--knn_generator_path", **kwargs) -> MLPMemoryPreTrainedModel:
    """A memory saved with ``save_pretrained``; a clear error naming ``flag`` for anything else."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, CONFIG)):
        raise UsageError(f"{flag} {path}: no config.json there (expected a directory saved by train_mlpmem_*)")
    with loading(str(path), flag):
        config = AutoConfig.from_pretrained(path)
    if not isinstance(config, MemoryConfig):
        raise UsageError(f"{flag} {path} holds a {config.model_type!r} model, not an MLP memory")
    with loading(str(path), flag):
        memory = MEMORY_MODELS[config.memory_style].from_pretrained(path, **kwargs)
    check_finite_weights(memory, path, flag)
    return memory


def check_finite_weights(memory: MLPMemoryPreTrainedModel, path: str | os.PathLike, flag: str) -> None:
    """A memory whose weights hold NaN or infinities (flipped bytes, a diverged run) is refused: its log-probabilities
    would be NaN, and so would every perplexity and answer computed with it."""
    for name, parameter in memory.named_parameters():
        if not torch.isfinite(parameter).all():
            raise ArtifactError(f"{flag} {path}: the memory's weights hold NaN or infinite values ({name}): "
                                f"{weight_files(str(path))} is corrupt, or the training diverged; retrain or restore it")
