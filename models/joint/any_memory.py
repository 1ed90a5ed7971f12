"""Any memory behind the one interface: which kind a directory or a loaded network is, told apart in one place.

An MLP memory reads the base's hidden states (`models.joint.memories.HiddenStateMemory`); any other causal LM is a
Memory Decoder that reads the tokens (`models.joint.token_memory.TokenMemory`). `load_any_memory` reads either
from disk, `as_joint_memory` wraps either for the joint model, the hooks and the loader.
"""

from __future__ import annotations

import os

import torch

from models.joint.memories import HiddenStateMemory, JointMemory
from models.joint.token_memory import TokenMemory, load_token_memory, reads_tokens
from models.memory_directory import load_memory
from models.modeling_mlp_memory import MLPMemoryPreTrainedModel


def load_any_memory(path: str | os.PathLike, flag: str = "--memory", **kwargs) -> torch.nn.Module:
    """The memory at ``path``: a Memory Decoder when it is a causal LM over tokens (`reads_tokens`), else an MLP
    memory (`models.load_memory`, which also names what it does not recognise, and verifies its checksums:
    ``allow_unverified=True`` reads one without them)."""
    path = str(path)
    if os.path.isdir(path) and reads_tokens(path, flag):  # a Hugging Face causal LM: no checksums of ours to verify
        kwargs.pop("allow_unverified", None)
        return load_token_memory(path, flag, **kwargs)
    return load_memory(path, flag, **kwargs)


def as_joint_memory(memory: torch.nn.Module | JointMemory, layer: int | None = None,
                    path: str | None = None) -> JointMemory:
    """``memory`` behind the one interface: an MLP memory reads hidden states, any other causal LM is a Memory
    Decoder (`models.joint.token_memory.TokenMemory`). A `JointMemory` is returned as it is."""
    if isinstance(memory, JointMemory):
        return memory
    if isinstance(memory, MLPMemoryPreTrainedModel):
        return HiddenStateMemory(memory, layer, path)
    return TokenMemory(memory, None, path)
