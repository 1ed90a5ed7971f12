"""Memory Decoder memories: a small causal LM over tokens, interpolated with the base LM like the MLP memory.

Memory Decoder (Cao et al., 2025, from the same lab) pretrains a small transformer decoder on the same
kNN-LM targets as the MLP memory. What differs is the memory's input:

=================  ===========================================  ==========================================
                   MLP memory (``models.modeling_mlp_memory``)   Memory Decoder (this module)
=================  ===========================================  ==========================================
input              the base's hidden state at block ``layer``   the token ids, through its own embeddings
attention          none: one FFN stack per position             its own causal self-attention
ties to the base   hidden size, layer, weights (fingerprint)    the tokenizer only (same vocabulary)
generation cost    one MLP pass per new token                   its own forward over the whole prefix
=================  ===========================================  ==========================================

Both give ``log q = log_softmax(memory_logits / knn_temp)`` that `models.joint.interpolation` mixes with
the base's distribution. A Memory Decoder directory is an ordinary ``AutoModelForCausalLM`` directory (a
GPT-2 / Llama / ... checkpoint), told apart from an MLP memory, ours or in the released layout, by its
token embedding: an MLP memory has none (`reads_tokens`).

During ``generate`` the base model sees only the new token(s) of each step (it has a KV cache), while the
Memory Decoder is run over the whole prefix again (`token_memory_log_probs`; the prefix comes from
``prepare_inputs_for_generation``, see `models.joint.hooks`): simple and correct for every strategy
(beam search reorders rows between steps), at a cost quadratic in the length generated.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from models.configuration_mlp_memory import MemoryConfig
from models.memory_directory import check_finite_weights, load_memory
from models.modeling_mlp_memory import MLPMemoryPreTrainedModel
from utils.cli import UsageError
from utils.distributed import synchronize
from utils.modeling import load_tokenizer, loading, tokenizer_fingerprint
from utils.scoring import ScoredBatch, score_batches

logger = logging.getLogger(__name__)

MEMORY_DECODER = "memory_decoder"
MLP_MEMORY = "mlp_memory"


def is_token_memory(memory: torch.nn.Module) -> bool:
    """Whether ``memory`` reads token ids (a Memory Decoder) rather than the base's hidden states (an MLP memory)."""
    return not isinstance(memory, MLPMemoryPreTrainedModel)


def memory_kind(memory: torch.nn.Module) -> str:
    return MEMORY_DECODER if is_token_memory(memory) else MLP_MEMORY


def _weight_names(path: str) -> set[str]:
    """The tensor names in a directory's safetensors files (empty when there are none)."""
    from safetensors import safe_open

    names: set[str] = set()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with loading(path, "--knn_generator_path"), safe_open(os.path.join(path, name), "pt") as f:
                names.update(f.keys())
    return names


def reads_tokens(path: str | os.PathLike) -> bool:
    """Whether the directory holds a causal LM over tokens: a transformers causal-LM config (not an MLP memory's)
    whose weights include its token embedding. The released MLP memories keep the base's config too, but have
    no embedding."""
    path = str(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError):  # not a JSON object: load_memory says so, naming the file
        return False
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, MemoryConfig):
        return False
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    embedding = skeleton.get_input_embeddings()
    embedding_name = next(name for name, module in skeleton.named_modules() if module is embedding) + ".weight"
    prefix = skeleton.base_model_prefix + "."
    names = _weight_names(path)
    return embedding_name in names or embedding_name.removeprefix(prefix) in names


def load_token_memory(path: str, flag: str = "--knn_generator_path", **kwargs) -> PreTrainedModel:
    """A Memory Decoder: the causal LM at ``path``, from safetensors only, in eval mode."""
    with loading(path, flag):
        try:
            memory = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
        except OSError as err:  # e.g. only a pickled pytorch_model.bin, which is never loaded
            raise UsageError(f"{flag} {path}: {err} (a memory is read from safetensors only)") from None
    check_finite_weights(memory, path, flag)
    logger.info("%s %s: a Memory Decoder memory (a %s causal LM over tokens, %.1fM parameters)", flag, path,
                memory.config.model_type, memory.num_parameters() / 1e6)
    return memory.eval()


def load_any_memory(path: str | os.PathLike, flag: str = "--knn_generator_path", **kwargs) -> torch.nn.Module:
    """The memory at ``path``: a Memory Decoder when it is a causal LM over tokens (`reads_tokens`), else an MLP
    memory (`models.load_memory`, which also names what it does not recognise)."""
    path = str(path)
    if os.path.isdir(path) and reads_tokens(path):
        return load_token_memory(path, flag, **kwargs)
    return load_memory(path, flag, **kwargs)


def check_token_memory_fits(model: torch.nn.Module, memory: PreTrainedModel, tokenizer_fingerprint_: str | None = None,
                            memory_path: str | None = None) -> dict:
    """A Memory Decoder must predict over the base's vocabulary with the base's tokenizer: the same output size and,
    when both are known (``tokenizer_fingerprint_`` and a tokenizer saved beside the memory), the same token -> id
    map. Returns what results record about the memory."""
    memory_path = memory_path or getattr(memory.config, "_name_or_path", None) or None
    where = f"The Memory Decoder {memory_path}" if memory_path else "The Memory Decoder"
    base_vocab = model.get_output_embeddings().weight.shape[0]
    memory_vocab = memory.get_output_embeddings().weight.shape[0]
    if base_vocab != memory_vocab:
        raise UsageError(f"{where} predicts over {memory_vocab} tokens, but the base model's vocabulary has "
                         f"{base_vocab}: a Memory Decoder must share the base model's tokenizer")
    memory_tokenizer = None
    if memory_path and os.path.isdir(memory_path) and tokenizer_fingerprint_:
        try:
            memory_tokenizer = tokenizer_fingerprint(load_tokenizer(memory_path, flag="--knn_generator_path"))
        except (OSError, ValueError):  # no tokenizer saved beside the memory: only the vocabulary size is checked
            memory_tokenizer = None
        if memory_tokenizer is not None and memory_tokenizer != tokenizer_fingerprint_:
            raise UsageError(f"{where} was saved with a tokenizer of fingerprint {memory_tokenizer}, but the base "
                             f"model's tokenizer has {tokenizer_fingerprint_}: a Memory Decoder must share the base "
                             "model's tokenizer")
    return {"memory_kind": MEMORY_DECODER, "vocab_size": memory_vocab, "tokenizer_fingerprint": memory_tokenizer}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (left padding allowed), as ``generate`` makes them: (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_memory_log_probs(memory: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           knn_temp: float, last: int = 0) -> torch.Tensor:
    """``log_softmax(memory(input_ids).logits / knn_temp)`` in float32, (B, T) -> (B, T', V) for the last ``last``
    positions (0: all), run without a cache over the whole of ``input_ids``."""
    kwargs = {}
    if attention_mask is not None:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    logits = memory(input_ids=input_ids, use_cache=False, logits_to_keep=last, **kwargs).logits
    return torch.log_softmax(logits.float() / knn_temp, dim=-1)


class PrecomputedLogits(torch.nn.Module):
    """Stands for a Memory Decoder in evaluate_joint's loop, whose rows carry the memory's logits where an MLP
    memory's carry hidden states: ``memory(x)`` is ``x``, and ``seconds`` is the time its forwards took."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def with_token_memory_logits(batches: Iterator[ScoredBatch], memory: PreTrainedModel, tokens, windows,
                             batch_size: int, state) -> tuple[Iterator[ScoredBatch], PrecomputedLogits]:
    """The base's scored batches with ``hidden`` replaced by the Memory Decoder's logits (n, V) for the same rows:
    it scores the same windows in the same batches (`utils.scoring.score_batches`), so row i of both is the same
    token. The memory to pass on is the returned `PrecomputedLogits`."""
    stand_in = PrecomputedLogits()
    memory.to(state.device).eval()

    def merged() -> Iterator[ScoredBatch]:
        memory_batches = score_batches(memory, tokens, windows, batch_size, state.process_index, state.num_processes,
                                       show_progress=False)
        for batch in batches:
            synchronize(state.device)
            start = time.perf_counter()
            memory_batch = next(memory_batches)
            synchronize(state.device)
            stand_in.seconds += time.perf_counter() - start
            if not np.array_equal(memory_batch.rows, batch.rows):
                raise RuntimeError("The Memory Decoder scored other rows than the base model")
            batch.hidden = memory_batch.logits
            yield batch

    return merged(), stand_in
