"""Serving base + memory from vLLM: a ``vllm.general_plugins`` entry point (pyproject.toml) and its model.

    vllm serve JOINT_DIR                 # a directory built by python -m models.convert --joint
    LLM(model=JOINT_DIR)                 # inside `if __name__ == "__main__":`

`register` runs in every vLLM process. It registers the joint config with transformers' AutoConfig (``import
models``), the architecture ``MLPMemoryForCausalLM`` with vLLM's model registry (lazily: vLLM imports
`models.serving.vllm_model` only where it builds the model), and a config hook that vLLM's front end runs before any
engine starts: `models.serving.checks.check_joint_directory` then refuses, in one line, a directory whose memory does
not fit its base (``hf_overrides={"allow_base_mismatch": true}`` accepts it, as ``--allow_base_mismatch`` does
elsewhere), files that fail their checksums or have none (``{"allow_unverified": true}`` reads the latter, as
``--allow_unverified`` does), a Memory Decoder memory, or a base family without a known key module. ``lmbda`` and the memory's
temperature come from the joint config; ``hf_overrides`` changes them (``{"lmbda": 0.25}``).

vLLM is optional: nothing outside this package imports it, and `models/__init__.py` does not import this package.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ARCHITECTURE = "MLPMemoryForCausalLM"  # config.json's architectures, as models.convert --joint writes it
MODEL_CLASS = "models.serving.vllm_model:MLPMemoryJointForCausalLM"


class JointModelRefused(RuntimeError):
    """A joint directory vLLM must not serve, with the one-line reason (`models.serving.checks`). Not a ValueError,
    so that vLLM's config validation (pydantic) passes it on as it is instead of wrapping it."""


class JointDirectoryCheck:
    """vLLM's per-architecture config hook (its ``MODELS_CONFIG_MAP``), run once in the front end."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from models.serving.checks import check_joint_directory, serving_settings
        from utils.cli import UsageError

        model_config = vllm_config.model_config
        allow = bool(getattr(model_config.hf_config, "allow_base_mismatch", False))
        unverified = bool(getattr(model_config.hf_config, "allow_unverified", False))
        try:
            check_joint_directory(resolve_local(model_config.model, model_config.revision), allow, unverified)
            serving_settings(model_config.hf_config)  # with hf_overrides applied (lmbda, memory_temp)
        except UsageError as error:  # ArtifactError too
            raise JointModelRefused(str(error)) from None


def resolve_local(model: str, revision: str | None = None) -> str:
    """A local directory as it is; a hub name as the local snapshot vLLM reads."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (may run several times in one process)."""
    import models  # noqa: F401  registers the joint config and the memory configs with AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, JointDirectoryCheck)
