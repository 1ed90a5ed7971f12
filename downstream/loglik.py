"""Log-likelihoods of continuations given contexts, under the base model alone or base + MLP memory.

The multiple-choice and judgment evaluations (`downstream.halueval`, `downstream.strategyqa`,
`downstream.truthfulqa`) score each choice as ``log p(continuation | context)``, summed over the
continuation's tokens, the way lm-evaluation-harness does (``loglikelihood``):

* trailing whitespace of the context moves to the front of the continuation (``"A: " + "Yes"`` is scored
  as ``"A:" + " Yes"``);
* context and continuation are encoded together, without special tokens, and split at the context's own
  token count, so a merge across the boundary stays with the continuation; an empty context is the
  tokenizer's BOS (else EOS) token. ``add_special_tokens=True`` encodes both with the tokenizer's own
  special tokens instead (a BOS first for Llama and Mistral, nothing for GPT-2), as the authors'
  TruthfulQA evaluator's ``tokenizer(prompt + answer)`` does;
* the model reads the sequence without its last token; a sequence longer than ``max_length`` is cut on
  the left.

Requests are batched longest first with left padding (position ids count only attended tokens, as in
``generate``), so the continuation's positions are the last ones of every row and the LM head (and, under
`models.joint`, the memory) runs on those positions only (``logits_to_keep``). With ``joint`` (a
`models.joint.JointLM`) the log-probabilities are the joint model's; without, the base model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """One continuation's score: summed log-probability, whether greedy decoding would produce it, token count."""

    loglik: float
    is_greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, split as lm-evaluation-harness splits them (with
    ``add_special_tokens``: both encoded with the tokenizer's special tokens, so the context starts with its BOS)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if add_special_tokens:
        context_ids = tokenizer(context)["input_ids"]
        if context_ids:  # else (no BOS, empty context) as below
            whole = tokenizer(context + continuation)["input_ids"]
            return whole[:len(context_ids)], whole[len(context_ids):]
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("An empty context needs a BOS or EOS token to condition on; the tokenizer has neither")
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(context_ids)], whole[len(context_ids):]


def model_max_length(model) -> int | None:
    """The longest sequence the model's positions allow, if its config says."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def _forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int, joint=None) -> torch.Tensor:
    """Log-probabilities (B, keep, V) of the last ``keep`` positions of a left-padded batch."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": False, "logits_to_keep": keep}
    if joint is None:
        return torch.log_softmax(model(**kwargs).logits[:, -keep:].float(), dim=-1)
    with joint.attached():  # the head's output is already the joint log-probabilities, in float32
        return model(**kwargs).logits[:, -keep:]


@torch.no_grad()
def continuation_logliks(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8, joint=None,
                         max_length: int | None = None, add_special_tokens: bool = False) -> list[Scored]:
    """``log p(continuation | context)`` of each ``(context, continuation)`` pair, in the order given.

    ``joint`` (a `models.joint.JointLM` over ``model``) scores under base + memory; ``max_length``
    defaults to the model's position limit; ``add_special_tokens``: see `encode_pair`. A continuation with
    no tokens scores 0.
    """
    max_length = max_length or model_max_length(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded, truncated = [], 0
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, add_special_tokens)
        sequence = (context_ids + continuation_ids)[:-1]
        if max_length is not None and len(sequence) > max_length:
            sequence, truncated = sequence[-max_length:], truncated + 1
        if len(continuation_ids) > len(sequence):
            raise ValueError(f"A continuation of {len(continuation_ids)} tokens does not fit in {max_length} positions")
        encoded.append((sequence, continuation_ids))
    if truncated:
        logger.warning("%d of %d requests were longer than %s tokens and were cut on the left", truncated,
                       len(requests), max_length)

    results: list[Scored | None] = [None] * len(requests)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        batch = [i for i in order[start:start + batch_size] if encoded[i][1]]
        for i in order[start:start + batch_size]:
            if not encoded[i][1]:
                results[i] = Scored(0.0, True, 0)
        if not batch:
            continue
        width = max(len(encoded[i][0]) for i in batch)
        keep = max(len(encoded[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            sequence = encoded[i][0]
            input_ids[row, width - len(sequence):] = torch.tensor(sequence)
            attention_mask[row, width - len(sequence):] = 1
        log_probs = _forward(model, input_ids.to(device), attention_mask.to(device), keep, joint)  # (B, keep, V)
        for row, i in enumerate(batch):
            targets = torch.tensor(encoded[i][1], device=log_probs.device)
            rows = log_probs[row, keep - len(targets):]  # (c, V): the positions predicting the continuation
            loglik = rows.gather(-1, targets[:, None]).sum().item()
            results[i] = Scored(loglik, bool((rows.argmax(-1) == targets).all()), len(targets))
    return results
