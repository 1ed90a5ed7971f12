"""The joint model attached to an unmodified HF causal LM by hooks: generation through its own ``generate``.

The released implementation decodes with a hand-written greedy loop that runs the base model twice
per step and drops the attention mask. Here the memory is attached to an unmodified causal LM with
hooks instead, so every decoding strategy of ``model.generate`` (greedy, sampling, beam search,
batched left-padded prompts, KV cache, stopping criteria, logits processors) works unchanged:

* a forward pre-hook on the feed-forward layer of block ``memory.config.layer``
  (`utils.hidden_state.HiddenStateHook`) records the memory's input during the model's own forward;
* a forward hook on the LM head (``model.get_output_embeddings()``) replaces its logits (B, T, V) by
  the joint log-probabilities

      log p = logaddexp(log_softmax(lm_logits) + log(1 - lmbda), log_softmax(memory(h) / knn_temp) + log lmbda)

  in float32, where ``h`` are the recorded hidden states of the positions the head received. The
  head may see only the last positions (``logits_to_keep``): a pre-hook on the model reads that
  argument and the hidden states are sliced the same way.

A Memory Decoder memory (`models.joint.token_memory`: a small causal LM over tokens) takes the place of
``memory(h)``: its logits come from running it on the input ids. During ``generate`` the base model
receives only the new tokens, so ``prepare_inputs_for_generation`` is wrapped within the context to hand
the whole prefix (rows reordered by beam search included) to the memory, which recomputes it each step.
Outside ``generate``, a forward that continues a filled KV cache is refused for such a memory.

Because the "logits" are normalised log-probabilities, softmax / log_softmax of them (sampling, beam
scores) give the joint distribution itself, and ``model(..., labels=...)`` returns the joint loss.
A transform the model applies after its head (Gemma 2's final soft-capping) is taken over while the
hooks are attached (`utils.architectures.logits_transform_taken`): the mix applies it to the base's
logits, and the model does not apply it again to the joint log-probabilities.

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

from models.configuration_mlp_memory import check_memory_matches
from models.joint.interpolation import check_joint_settings, interpolate_log_probs, memory_log_probs
from models.joint.token_memory import (check_token_memory_fits, is_token_memory, load_any_memory,
                                       token_memory_log_probs)
from utils.architectures import logits_transform_taken, normalize_layer
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook
from utils.modeling import model_fingerprint

logger = logging.getLogger(__name__)

_ATTACHED = "_mlp_memory_attached"


def memory_layer(model: torch.nn.Module, memory: torch.nn.Module) -> int:
    """The (non-negative) base block whose feed-forward input the memory reads; the last if not recorded."""
    layer = memory.config.layer
    if layer is None:
        logger.warning("The memory does not record its layer: reading the last block of the base model")
        layer = -1
    return normalize_layer(model, layer)


def check_memory_fits(model: torch.nn.Module, memory: torch.nn.Module, tokenizer_fingerprint: str | None = None,
                      allow_base_mismatch: bool = False, memory_path: str | None = None) -> tuple[int | None, dict]:
    """`check_memory_matches` against ``model`` itself, its weights included; returns the layer and the record
    of the base model check (`utils.modeling.check_model_fingerprint`) that results carry. A Memory Decoder
    reads no layer (None) and is checked for the vocabulary and tokenizer only (`check_token_memory_fits`)."""
    if is_token_memory(memory):
        return None, check_token_memory_fits(model, memory, tokenizer_fingerprint, memory_path)
    layer = memory_layer(model, memory)
    memory_path = memory_path or getattr(memory.config, "_name_or_path", None) or None  # set by from_pretrained
    base_check = check_memory_matches(memory.config, model, tokenizer_fingerprint, layer=layer, memory_path=memory_path,
                                      base_fingerprint=model_fingerprint(model, layer),
                                      allow_base_mismatch=allow_base_mismatch)
    return layer, base_check


def load_checked_memory(path: str, model: torch.nn.Module, tokenizer_fingerprint: str,
                        allow_base_mismatch: bool = False) -> tuple[torch.nn.Module, int | None, dict]:
    """The memory at ``path`` (an MLP memory or a Memory Decoder, `load_any_memory`), the (non-negative) base block
    it reads (None for a Memory Decoder) and the record of the base model check; a `UsageError` if it does not fit
    ``model`` (`check_memory_fits`)."""
    memory = load_any_memory(path, "--knn_generator_path").eval()
    layer, base_check = check_memory_fits(model, memory, tokenizer_fingerprint, allow_base_mismatch, memory_path=path)
    return memory, layer, base_check


def _kept_positions(logits_to_keep) -> slice | torch.Tensor | None:
    """The positions HF models pass to their LM head for a ``logits_to_keep`` argument (None: unknown)."""
    if logits_to_keep is None:
        return None
    if isinstance(logits_to_keep, int):
        return slice(-logits_to_keep, None)  # 0 keeps all positions, as in the models themselves
    return logits_to_keep


class PrefixStage:
    """The whole input of the next forward, for a Memory Decoder while the base model sees only the new tokens."""

    def __init__(self):
        self.prefix: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def stage(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self.prefix = (input_ids, attention_mask)

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        prefix, self.prefix = self.prefix, None
        return prefix


@contextmanager
def mixing_hooks(model: torch.nn.Module, memory: torch.nn.Module, layer: int | None, lmbda: float, knn_temp: float,
                 stage: PrefixStage | None = None) -> Iterator[torch.nn.Module]:
    """The hooks alone (no checks, no device moves): within the context ``model``'s LM head returns the joint
    log-probabilities. For a Memory Decoder, ``stage`` may hold the whole prefix of the next forward."""
    head = model.get_output_embeddings()
    if head is None:
        raise UsageError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    token_memory = is_token_memory(memory)
    capture = None if token_memory else HiddenStateHook(model, layer)
    seen: dict[str, object] = {"positions": None, "tokens": None}

    def read_inputs(module, args, kwargs):
        seen["positions"] = _kept_positions(kwargs.get("logits_to_keep"))
        if not token_memory:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prefix = stage.take() if stage is not None else None
        if prefix is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise UsageError("A Memory Decoder memory reads the whole prefix: continue a KV cache through "
                                 "generate(), or call the model on the whole sequence without a cache")
            prefix = (input_ids, kwargs.get("attention_mask"))
        if prefix[0] is None:
            raise UsageError("A Memory Decoder memory reads token ids: give input_ids, not inputs_embeds")
        seen["tokens"] = (prefix[0], prefix[1], input_ids.shape[-1] if input_ids is not None else prefix[0].shape[-1])

    def memory_side(num: int, positions) -> torch.Tensor:
        """The memory's log-probabilities (B, num, V) for the positions the head received."""
        if token_memory:
            tokens, seen["tokens"] = seen["tokens"], None
            if tokens is None:
                raise RuntimeError("The LM head ran without a forward of the model: the memory has no input")
            input_ids, attention_mask, current = tokens
            if positions is None or isinstance(positions, slice):  # the head received the last positions
                return token_memory_log_probs(memory, input_ids, attention_mask, knn_temp, last=num)
            return token_memory_log_probs(memory, input_ids, attention_mask, knn_temp, last=current)[:, positions]
        hidden, capture.hidden = capture.hidden, None  # never reuse the states of an earlier forward
        if hidden is None:
            raise RuntimeError("The LM head ran without a forward of the base model's blocks: the memory has no input")
        hidden = hidden[:, positions] if positions is not None else hidden
        if hidden.shape[-2] != num:  # unknown slicing: the head received the last positions
            if hidden.shape[-2] < num:
                raise RuntimeError(f"The LM head produced {num} positions but the memory's input has "
                                   f"{hidden.shape[-2]}")
            hidden = hidden[:, -num:]
        return memory_log_probs(memory, hidden, knn_temp)

    def mix(module, args, lm_logits):
        positions, seen["positions"] = seen["positions"], None
        return interpolate_log_probs(torch.log_softmax(head_transform(lm_logits).float(), dim=-1),
                                     memory_side(lm_logits.shape[-2], positions), lmbda)

    handles = []
    taken = logits_transform_taken(model)
    head_transform = taken.__enter__()
    try:
        if capture is not None:
            capture.__enter__()
        handles.append(model.register_forward_pre_hook(read_inputs, with_kwargs=True))
        handles.append(head.register_forward_hook(mix))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        if capture is not None:
            capture.__exit__(None, None, None)
        taken.__exit__(None, None, None)


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
def attach_memory(model: torch.nn.Module, memory: torch.nn.Module, lmbda: float = 0.25, knn_temp: float = 1.0,
                  tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False) -> Iterator[torch.nn.Module]:
    """Within the context, ``model``'s logits are the joint log-probabilities of base + memory.

    Checks that the memory fits the model (`check_memory_fits`: hidden size, vocabulary, layer, the
    tokenizer when its fingerprint is given, and that ``model`` is the base model whose hidden states
    the memory was trained on unless ``allow_base_mismatch``; `UsageError` otherwise; the fingerprint is
    cached on the model, so a check per ``generate`` call costs nothing), moves the memory to the
    model's device and dtype and puts it in eval mode (its mode is restored on exit), registers the
    hooks (`mixing_hooks`) and yields ``model``; the hooks are removed on exit, even on error.
    """
    check_joint_settings(lmbda, knn_temp)
    layer, _ = check_memory_fits(model, memory, tokenizer_fingerprint, allow_base_mismatch)
    if getattr(model, _ATTACHED, False):
        raise UsageError("A memory is already attached to this model; leave that attach_memory context first")

    param = next(model.parameters())
    memory.to(device=param.device, dtype=param.dtype)
    was_training = memory.training
    memory.eval()
    stage = PrefixStage() if is_token_memory(memory) else None
    setattr(model, _ATTACHED, True)
    try:
        with mixing_hooks(model, memory, layer, lmbda, knn_temp, stage):
            if stage is None:
                yield model
            else:
                with staging_prefixes(model, stage):
                    yield model
    finally:
        setattr(model, _ATTACHED, False)
        memory.train(was_training)


class JointLM:
    """A base causal LM and a memory (an MLP memory or a Memory Decoder), interpolated with weight ``lmbda`` on the
    memory.

    The memory must fit the model (`check_memory_fits`; give ``tokenizer_fingerprint`` to check the
    tokenizer too). ``base_check`` records the base model check, for results.
    """

    def __init__(self, model: torch.nn.Module, memory: torch.nn.Module, lmbda: float = 0.25, knn_temp: float = 1.0,
                 tokenizer_fingerprint: str | None = None, allow_base_mismatch: bool = False):
        check_joint_settings(lmbda, knn_temp)
        _, self.base_check = check_memory_fits(model, memory, tokenizer_fingerprint, allow_base_mismatch)
        self.model, self.memory, self.lmbda, self.knn_temp = model, memory, lmbda, knn_temp
        self.tokenizer_fingerprint, self.allow_base_mismatch = tokenizer_fingerprint, allow_base_mismatch

    def attached(self):
        return attach_memory(self.model, self.memory, self.lmbda, self.knn_temp, self.tokenizer_fingerprint,
                             self.allow_base_mismatch)

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
