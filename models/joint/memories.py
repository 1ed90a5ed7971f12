"""One interface for every kind of memory, so that the joint model's code never asks which kind it holds.

The hooks (`models.joint.hooks`), the perplexity loop (`models.joint.perplexity`) and the HF joint class
(`models.joint.causal_lm`) call a `JointMemory`; two classes implement it:

=====================  ==========================================  =============================================
                       `HiddenStateMemory` (the MLP memory)         `TokenMemory` (a Memory Decoder,
                                                                    `models.joint.token_memory`)
=====================  ==========================================  =============================================
captures during the    the feed-forward input of block ``layer``   the input ids (and, during ``generate``, the
base's forward         (`reader`)                                  whole prefix: ``reads_prefix``)
checked against the    hidden size, vocabulary, layer, tokenizer,  vocabulary, tokenizer (`check_fits`)
base                   the base's fingerprint (`check_fits`)
log-probabilities of   ``log_softmax(memory(h) / T)`` of the       its own forward over the ids, the same
the kept positions     captured states (`MemoryReader.log_probs`)  positions
perplexity             reads the scored batch's hidden states      scores the same windows itself
                       (`scored_inputs`, `gold_log_probs`)         (`scored_inputs`), then `gold_log_probs`
=====================  ==========================================  =============================================

`as_joint_memory` wraps a loaded network (the one place that tells the kinds apart). The wrapper holds the
network (``module``), not a copy.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch

from models.configuration_mlp_memory import check_memory_matches
from models.joint.interpolation import memory_gold_log_probs, memory_log_probs
from models.modeling_mlp_memory import MLPMemoryPreTrainedModel
from utils.architectures import normalize_layer
from utils.hidden_state import HiddenStateHook
from utils.modeling import model_fingerprint
from utils.scoring import ScoredBatch

logger = logging.getLogger(__name__)

MEMORY_DECODER = "memory_decoder"
MLP_MEMORY = "mlp_memory"


class PrefixStage:
    """The whole input of the next forward, for a memory that reads the prefix while the base sees only new tokens."""

    def __init__(self):
        self.prefix: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def stage(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self.prefix = (input_ids, attention_mask)

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        prefix, self.prefix = self.prefix, None
        return prefix


class MemoryReader(ABC):
    """What a memory reads during one attachment to a base model: a context manager around the hooks' lifetime."""

    def __enter__(self) -> MemoryReader:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def see_forward(self, args: tuple, kwargs: dict) -> None:
        """Called with the base model's forward arguments, before it runs."""

    @abstractmethod
    def log_probs(self, num: int, positions, memory_temp: float) -> torch.Tensor:
        """The memory's log-probabilities (B, num, V) in float32 for the positions the LM head received
        (``positions``: a slice or index tensor from ``logits_to_keep``, None when unknown: the last ``num``)."""


class ScoredInputs:
    """The base's scored batches paired with what the memory reads for their rows; ``seconds`` is the time spent
    running the memory while producing them (0 when it reads the base's own hidden states)."""

    def __init__(self, pairs: Iterator[tuple[ScoredBatch, torch.Tensor]]):
        self.pairs, self.seconds = pairs, 0.0

    def __iter__(self):
        return self.pairs


class JointMemory(ABC):
    """A memory interpolated with a base causal LM (see the module docstring)."""

    kind: ClassVar[str]
    reads_prefix: ClassVar[bool] = False  # during generate, it needs each step's whole prefix (`PrefixStage`)

    def __init__(self, module: torch.nn.Module, layer: int | None = None, path: str | None = None):
        self.module = module
        self.layer = layer
        self.path = path or getattr(getattr(module, "config", None), "_name_or_path", None) or None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> JointMemory:
        self.module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> JointMemory:
        self.module.eval()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @abstractmethod
    def check_fits(self, model: torch.nn.Module, tokenizer_fingerprint: str | None = None,
                   allow_base_mismatch: bool = False) -> dict:
        """A `UsageError` unless the memory belongs to ``model``; sets ``layer`` and returns the record of the base
        model check that results carry. Cheap to repeat: the base's fingerprint is cached on the model."""

    @abstractmethod
    def reader(self, model: torch.nn.Module, stage: PrefixStage | None = None) -> MemoryReader:
        """What captures the memory's input during ``model``'s forward (`models.joint.hooks.mixing_hooks`)."""

    @property
    @abstractmethod
    def capture_layer(self) -> int | None:
        """The base block whose feed-forward input a scoring pass must capture for the memory (None: none)."""

    @abstractmethod
    def scored_inputs(self, batches: Iterator[ScoredBatch], tokens, windows, batch_size: int, state) -> ScoredInputs:
        """Each of the base's scored ``batches`` with what the memory reads for its rows (perplexity)."""

    @abstractmethod
    def gold_log_probs(self, inputs: torch.Tensor, labels: torch.Tensor, memory_temp: float) -> torch.Tensor:
        """``log_softmax(memory_logits / memory_temp)[label]`` of each row (n,) from what `scored_inputs` paired."""


class HiddenStateMemory(JointMemory):
    """An MLP memory (`models.modeling_mlp_memory`): it reads the base's hidden state at one block."""

    kind = MLP_MEMORY

    def check_fits(self, model, tokenizer_fingerprint=None, allow_base_mismatch=False) -> dict:
        layer = self.module.config.layer
        if layer is None:
            logger.warning("The memory does not record its layer: reading the last block of the base model")
            layer = -1
        self.layer = normalize_layer(model, layer)
        return check_memory_matches(self.module.config, model, tokenizer_fingerprint, layer=self.layer,
                                    memory_path=self.path, base_fingerprint=model_fingerprint(model, self.layer),
                                    allow_base_mismatch=allow_base_mismatch)

    def reader(self, model, stage=None) -> MemoryReader:
        return HiddenStateReader(self, model)

    @property
    def capture_layer(self) -> int | None:
        return self.layer

    def scored_inputs(self, batches, tokens, windows, batch_size, state) -> ScoredInputs:
        return ScoredInputs((batch, batch.hidden) for batch in batches)

    def gold_log_probs(self, inputs, labels, memory_temp) -> torch.Tensor:
        return memory_gold_log_probs(self.module, inputs, labels, memory_temp)


class HiddenStateReader(MemoryReader):
    """The hidden states of the memory's block, captured by a pre-hook on its feed-forward layer."""

    def __init__(self, memory: HiddenStateMemory, model: torch.nn.Module):
        self.memory, self.capture = memory, HiddenStateHook(model, memory.layer)

    def __enter__(self) -> HiddenStateReader:
        self.capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.capture.__exit__(*exc)

    def log_probs(self, num, positions, memory_temp) -> torch.Tensor:
        hidden, self.capture.hidden = self.capture.hidden, None  # never reuse the states of an earlier forward
        if hidden is None:
            raise RuntimeError("The LM head ran without a forward of the base model's blocks: the memory has no input")
        hidden = hidden[:, positions] if positions is not None else hidden
        if hidden.shape[-2] != num:  # unknown slicing: the head received the last positions
            if hidden.shape[-2] < num:
                raise RuntimeError(f"The LM head produced {num} positions but the memory's input has "
                                   f"{hidden.shape[-2]}")
            hidden = hidden[:, -num:]
        return memory_log_probs(self.memory.module, hidden, memory_temp)


def as_joint_memory(memory: torch.nn.Module | JointMemory, layer: int | None = None,
                    path: str | None = None) -> JointMemory:
    """``memory`` behind the one interface: an MLP memory reads hidden states, any other causal LM is a Memory
    Decoder (`models.joint.token_memory.TokenMemory`). A `JointMemory` is returned as it is."""
    if isinstance(memory, JointMemory):
        return memory
    if isinstance(memory, MLPMemoryPreTrainedModel):
        return HiddenStateMemory(memory, layer, path)
    from models.joint.token_memory import TokenMemory  # it builds on this module

    return TokenMemory(memory, None, path)
