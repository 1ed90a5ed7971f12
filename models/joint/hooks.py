"""The joint model attached to an unmodified HF causal LM by hooks: generation through its own ``generate``.

The released implementation decodes with a hand-written greedy loop that runs the base model twice
per step and drops the attention mask. Here the memory is attached to an unmodified causal LM with
hooks instead, so every decoding strategy of ``model.generate`` (greedy, sampling, beam search,
batched left-padded prompts, KV cache, stopping criteria, logits processors) works unchanged:

* a forward pre-hook on the feed-forward layer of block ``memory.config.layer``
  (`utils.hidden_state.HiddenStateHook`) records the memory's input during the model's own forward;
* a forward hook on the LM head (``model.get_output_embeddings()``) replaces its logits (B, T, V) by
  the joint log-probabilities

      log p = logaddexp(log_softmax(lm_logits) + log(1 - lmbda), log_softmax(memory(h) / memory_temp) + log lmbda)

  in float32 (`mix`), where ``h`` are the recorded hidden states of the positions the head received. The
  head may see only the last positions (``logits_to_keep``): a pre-hook on the model reads that
  argument and the hidden states are sliced the same way.

What the memory reads is its own business (`models.joint.memories.JointMemory.reader`): the MLP memory the
hidden states above, a Memory Decoder (`models.joint.token_memory`) the input ids. During ``generate`` the
base model receives only the new tokens, so for a memory that ``reads_prefix`` the model's
``prepare_inputs_for_generation`` is wrapped within the context to hand it the whole prefix (rows reordered
by beam search included), which it recomputes each step. Outside ``generate``, a forward that continues a
filled KV cache is refused for such a memory.

Because the "logits" are normalised log-probabilities, softmax / log_softmax of them (sampling, beam
scores) give the joint distribution itself, and ``model(..., labels=...)`` returns the joint loss.
A transform the model applies after its head (Gemma 2's final soft-capping) is taken over while the
hooks are attached (`utils.architectures.logits_transform_taken`): the mix applies it to the base's
logits, and the model does not apply it again to the joint log-probabilities.

The memory is cast to the model's dtype and device; the mixing is in float32, as everywhere else
(`models.joint.loading` casts it the same way for every entry point).

    with attach_memory(model, memory, lmbda=0.25):
        out = model.generate(**batch, max_new_tokens=32)

    joint = JointLM(model, memory, lmbda=0.25)
    out = joint.generate(**batch, max_new_tokens=32, num_beams=4)
    log_probs = joint.log_probs(input_ids, attention_mask)  # (B, T, V)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from models.joint.interpolation import check_joint_settings, interpolate_log_probs
from models.joint.memories import JointMemory, PrefixStage, as_joint_memory
from models.joint.settings import DEFAULT_LMBDA, DEFAULT_MEMORY_TEMP, PERPLEXITY
from models.joint.token_memory import load_any_memory
from utils.architectures import logits_transform_taken
from utils.cli import UsageError

logger = logging.getLogger(__name__)

_ATTACHED = "_mlp_memory_attached"
DEFAULT_PYTHON_LMBDA = DEFAULT_LMBDA[PERPLEXITY]  # JointLM / attach_memory without lmbda: the paper's perplexity value


def check_memory_fits(model: torch.nn.Module, memory: torch.nn.Module | JointMemory,
                      tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False,
                      memory_path: str | None = None) -> tuple[int | None, dict]:
    """`JointMemory.check_fits` of ``memory`` against ``model`` (a `UsageError` if it does not belong to it); returns
    the (non-negative) block it reads (None: tokens) and the record of the base model check that results carry."""
    joint_memory = as_joint_memory(memory, path=memory_path)
    record = joint_memory.check_fits(model, tokenizer_fingerprint, allow_base_mismatch)
    return joint_memory.layer, record


def load_checked_memory(path: str, model: torch.nn.Module, tokenizer_fingerprint: str,
                        allow_base_mismatch: bool = False) -> tuple[torch.nn.Module, int | None, dict]:
    """The memory network at ``path`` (`load_any_memory`), the block it reads (None for a Memory Decoder) and the
    record of the base model check; a `UsageError` if it does not fit ``model``. Entry points use
    `models.joint.loading.load_joint`, which also casts the memory and resolves the settings."""
    memory = load_any_memory(path, "--memory").eval()
    layer, base_check = check_memory_fits(model, memory, tokenizer_fingerprint, allow_base_mismatch, memory_path=path)
    return memory, layer, base_check


def _kept_positions(logits_to_keep) -> slice | torch.Tensor | None:
    """The positions HF models pass to their LM head for a ``logits_to_keep`` argument (None: unknown)."""
    if logits_to_keep is None:
        return None
    if isinstance(logits_to_keep, int):
        return slice(-logits_to_keep, None)  # 0 keeps all positions, as in the models themselves
    return logits_to_keep


def mix(lm_logits: torch.Tensor, memory_log_probs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """The joint log-probabilities (B, T, V) in float32 from the LM head's logits and the memory's log-probabilities."""
    return interpolate_log_probs(torch.log_softmax(lm_logits.float(), dim=-1), memory_log_probs, lmbda)


@contextmanager
def mixing_hooks(model: torch.nn.Module, memory: JointMemory, lmbda: float, memory_temp: float,
                 stage: PrefixStage | None = None) -> Iterator[torch.nn.Module]:
    """The hooks alone (no checks, no device moves): within the context ``model``'s LM head returns the joint
    log-probabilities. For a memory that reads the prefix, ``stage`` may hold the whole prefix of the next forward."""
    head = model.get_output_embeddings()
    if head is None:
        raise UsageError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    reader = memory.reader(model, stage)
    seen: dict[str, object] = {"positions": None}

    def read_inputs(module, args, kwargs):
        seen["positions"] = _kept_positions(kwargs.get("logits_to_keep"))
        reader.see_forward(args, kwargs)

    def mix_head(module, args, lm_logits):
        positions, seen["positions"] = seen["positions"], None
        return mix(head_transform(lm_logits), reader.log_probs(lm_logits.shape[-2], positions, memory_temp), lmbda)

    handles = []
    with logits_transform_taken(model) as head_transform, reader:
        try:
            handles.append(model.register_forward_pre_hook(read_inputs, with_kwargs=True))
            handles.append(head.register_forward_hook(mix_head))
            yield model
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def staging_prefixes(model: torch.nn.Module, stage: PrefixStage) -> Iterator[None]:
    """Within the context, ``model.generate`` hands each step's whole prefix to ``stage`` (its
    ``prepare_inputs_for_generation`` is wrapped on the instance, and restored on exit)."""
    prepare = model.prepare_inputs_for_generation

    def staged_prepare(input_ids, *args, **kwargs):
        stage.stage(input_ids, kwargs.get("attention_mask"))
        return prepare(input_ids, *args, **kwargs)

    model.prepare_inputs_for_generation = staged_prepare
    try:
        yield
    finally:
        del model.prepare_inputs_for_generation  # the class's method again


@contextmanager
def _attached(model: torch.nn.Module, memory: JointMemory, lmbda: float,
              memory_temp: float) -> Iterator[torch.nn.Module]:
    """The memory (already checked against ``model``) moved to the model's device and dtype, in eval mode (its mode
    is restored on exit), and the hooks (`mixing_hooks`), with the prefix staged for a memory that reads it."""
    if getattr(model, _ATTACHED, False):
        raise UsageError("A memory is already attached to this model; leave that attach_memory context first")
    param = next(model.parameters())
    memory.to(device=param.device, dtype=param.dtype)
    was_training = memory.module.training
    memory.eval()
    stage = PrefixStage() if memory.reads_prefix else None
    setattr(model, _ATTACHED, True)
    try:
        with mixing_hooks(model, memory, lmbda, memory_temp, stage):
            if stage is None:
                yield model
            else:
                with staging_prefixes(model, stage):
                    yield model
    finally:
        setattr(model, _ATTACHED, False)
        memory.module.train(was_training)


@contextmanager
def attach_memory(model: torch.nn.Module, memory: torch.nn.Module | JointMemory,
                  lmbda: float = DEFAULT_PYTHON_LMBDA, memory_temp: float = DEFAULT_MEMORY_TEMP,
                  tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False, *,
                  knn_temp: float | None = None) -> Iterator[torch.nn.Module]:
    """Within the context, ``model``'s logits are the joint log-probabilities of base + memory.

    Checks that the memory fits the model (`check_memory_fits`: hidden size, vocabulary, layer, the
    tokenizer when its fingerprint is given, and that ``model`` is the base model whose hidden states
    the memory was trained on unless ``allow_base_mismatch``; `UsageError` otherwise; the fingerprint is
    cached on the model, so a check per ``generate`` call costs nothing), moves the memory to the
    model's device and dtype and puts it in eval mode (its mode is restored on exit), registers the
    hooks (`mixing_hooks`) and yields ``model``; the hooks are removed on exit, even on error.
    ``knn_temp`` is the released name of ``memory_temp``.
    """
    memory_temp = memory_temp if knn_temp is None else knn_temp
    check_joint_settings(lmbda, memory_temp)
    memory = as_joint_memory(memory)
    memory.check_fits(model, tokenizer_fingerprint, allow_base_mismatch)
    with _attached(model, memory, lmbda, memory_temp):
        yield model


class JointLM:
    """A base causal LM and a memory (an MLP memory or a Memory Decoder, or a `JointMemory`), interpolated with
    weight ``lmbda`` on the memory and the memory's logits at temperature ``memory_temp``.

    The memory must fit the model (`check_memory_fits`, once, here; give ``tokenizer_fingerprint`` to check the
    tokenizer too), unless ``checked`` is the record of that check already made (`models.joint.loading.load_joint`).
    ``base_check`` records the base model check, for results. ``knn_temp`` is the released name of ``memory_temp``.
    """

    def __init__(self, model: torch.nn.Module, memory: torch.nn.Module | JointMemory,
                 lmbda: float = DEFAULT_PYTHON_LMBDA, memory_temp: float = DEFAULT_MEMORY_TEMP,
                 tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False, *,
                 knn_temp: float | None = None, checked: dict | None = None):
        memory_temp = memory_temp if knn_temp is None else knn_temp
        check_joint_settings(lmbda, memory_temp)
        self.joint_memory = as_joint_memory(memory)
        self.base_check = checked if checked is not None else self.joint_memory.check_fits(
            model, tokenizer_fingerprint, allow_base_mismatch)
        self.model, self.memory, self.lmbda, self.memory_temp = model, self.joint_memory.module, lmbda, memory_temp

    def attached(self):
        """A context within which ``self.model``'s logits are the joint log-probabilities."""
        return _attached(self.model, self.joint_memory, self.lmbda, self.memory_temp)

    def generate(self, **kwargs):
        """``model.generate(**kwargs)`` with the memory attached (any decoding strategy)."""
        with self.attached():
            return self.model.generate(**kwargs)

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Joint next-token log-probabilities (B, T, V) in float32 for every position.

        With an attention mask (left padding allowed), position ids count only the attended tokens,
        as ``generate`` does; rows at padded positions are meaningless.
        """
        kwargs = {}
        if attention_mask is not None:
            position_ids = attention_mask.long().cumsum(-1) - 1
            kwargs = dict(attention_mask=attention_mask, position_ids=position_ids.clamp(min=0))
        with self.attached():
            return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits
