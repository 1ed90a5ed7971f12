"""Capture the kNN key (the input of a block's feed-forward layer) with a forward pre-hook.

The base model is not modified: the hook only records the tensor its feed-forward layer receives on
each forward pass, so a single pass gives both the logits and the keys.
"""

from __future__ import annotations

import torch

from utils.architectures import key_module


class HiddenStateHook:
    """Records the input of the key module on every forward pass.

    Use as a context manager; ``hook.hidden`` is the last captured tensor of shape (B, T, d).
    """

    def __init__(self, model: torch.nn.Module, layer: int = -1):
        self.module = key_module(model, layer)
        self.hidden: torch.Tensor | None = None
        self._handle = None

    def _capture(self, module, args, kwargs):
        self.hidden = args[0] if args else next(iter(kwargs.values()))

    def __enter__(self) -> "HiddenStateHook":
        self._handle = self.module.register_forward_pre_hook(self._capture, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
        self.hidden = None
