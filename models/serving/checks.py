"""Read and check a joint directory before vLLM serves it.

`check_joint_directory` runs in vLLM's front-end process (the API server, or the process that builds ``LLM(...)``)
before any engine starts, so a directory that cannot be served is refused in one line there. After the checks of
the config alone (`serving_settings`), it loads the directory through the loader every other entry point uses,
`models.joint.loading.load_joint`: the block checksums of ``meta.json`` (a directory without them is refused unless
``allow_unverified``), and the memory's fit to its base (hidden size, vocabulary, key layer, the tokenizer, and
the base model's fingerprint, so a memory of another base is refused unless ``allow_base_mismatch``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from models.joint.causal_lm import MLPMemoryJointConfig
from models.joint.interpolation import check_joint_settings
from models.joint.loading import is_joint_directory, load_joint
from models.joint.memories import MLP_MEMORY
from models.joint.settings import DOWNSTREAM, MemoryArguments
from utils.architectures import arch_spec
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError
from utils.io import timed
from utils.modeling import loading

logger = logging.getLogger(__name__)

JOINT_KIND = "mlp_memory_joint"


@dataclass(frozen=True)
class ServingSettings:
    """What the vLLM model needs from a joint config: the key layer, the memory's weight and temperature."""

    memory_layer: int
    lmbda: float
    memory_temp: float


def serving_settings(config: MLPMemoryJointConfig) -> ServingSettings:
    """The settings of a joint config (``lmbda``, ``memory_temp`` or the older ``knn_temp``), checked without weights:
    an MLP memory (a Memory Decoder is refused), a base family of `utils.architectures`, settings in range."""
    if config.memory_kind != MLP_MEMORY:
        raise UsageError(f"The joint model holds a {config.memory_kind} memory: vLLM serving takes an MLP memory only "
                         "(a Memory Decoder runs a transformer with its own KV cache); use JointLM or the HF joint "
                         "model")
    arch_spec(config.text_config.model_type)  # a one-line error for a family without a known key module
    temp = getattr(config, "memory_temp", None)
    temp = config.knn_temp if temp is None else temp
    check_joint_settings(config.lmbda, temp)
    if config.memory_layer is None:
        raise UsageError("The joint config records no memory_layer: rebuild it with python -m models.convert --joint")
    return ServingSettings(memory_layer=int(config.memory_layer), lmbda=float(config.lmbda), memory_temp=float(temp))


def check_joint_directory(path: str, allow_base_mismatch: bool = False, allow_unverified: bool = False) -> dict:
    """Refuse a joint directory vLLM must not serve (`UsageError` / `ArtifactError`, one line); returns the base
    model check's record. Config-only checks come first, then `load_joint` (checksums, and the memory's fit, on
    weights loaded in bfloat16, which the fingerprint does not see)."""
    if not is_joint_directory(path):
        raise UsageError(f"{path}: not a joint model directory (a config.json of model_type {JOINT_KIND}); build one "
                         "with python -m models.convert --joint")
    with loading(path, "--model"):
        config = MLPMemoryJointConfig.from_pretrained(path)
    serving_settings(config)
    with timed(f"Checking that the memory of {path} fits its base model", logger):
        loaded = load_joint(PretrainedModelArguments(model_name_or_path=path, torch_dtype="bfloat16"),
                            MemoryArguments(allow_base_mismatch=allow_base_mismatch, allow_unverified=allow_unverified),
                            DOWNSTREAM)
    record = loaded.record["base_check"]
    del loaded
    return record
