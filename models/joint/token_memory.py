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

Both give ``log q = log_softmax(memory_logits / memory_temp)`` that `models.joint.interpolation` mixes with
the base's distribution, through one interface (`models.joint.memories.JointMemory`; `TokenMemory` here).
A Memory Decoder directory is an ordinary ``AutoModelForCausalLM`` directory (a
GPT-2 / Llama / ... checkpoint), told apart from an MLP memory, ours or in the released layout, by its
token embedding: an MLP memory has none (`reads_tokens`). Its weights are read from safetensors or, as a
Memory Decoder's training saves them, from ``pytorch_model.bin`` with ``weights_only=True`` (tensors only:
a pickled object is refused without running).

During ``generate`` the base model sees only the new token(s) of each step (it has a KV cache), while the
Memory Decoder is run over the whole prefix again (`token_memory_log_probs`; the prefix comes from
``prepare_inputs_for_generation``, see `models.joint.hooks`): simple and correct for every strategy
(beam search reorders rows between steps), at a cost quadratic in the length generated.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from models.configuration_mlp_memory import MemoryConfig
from models.joint.interpolation import gold_log_probs
from models.joint.memories import MEMORY_DECODER, JointMemory, MemoryReader, PrefixStage, ScoredInputs
from models.memory_directory import check_finite_weights, load_memory
from utils.cli import UsageError
from utils.distributed import synchronize
from utils.io import ArtifactError
from utils.modeling import load_tokenizer, loading, tokenizer_fingerprint
from utils.scoring import score_batches

logger = logging.getLogger(__name__)

PICKLE = "pytorch_model.bin"


def _weight_names(path: str, flag: str) -> set[str]:
    """The tensor names in a directory's weights: its safetensors files, else its ``pytorch_model.bin`` read with
    ``weights_only=True`` (memory-mapped: no tensor is read); empty when there are none."""
    from safetensors import safe_open

    names: set[str] = set()
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with loading(path, flag), safe_open(os.path.join(path, name), "pt") as f:
                names.update(f.keys())
    if not names and os.path.isfile(os.path.join(path, PICKLE)):
        names.update(read_pickled_state(Path(path) / PICKLE, flag, mmap=True))
    return names


def read_pickled_state(file: Path, flag: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict read with ``weights_only=True``: tensors only, anything else refused without running."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:
        raise ArtifactError(f"{flag} {file}: refused, it is not a plain tensor state dict loadable with "
                            f"weights_only=True ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{flag} {file}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def reads_tokens(path: str | os.PathLike, flag: str = "--memory") -> bool:
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
    names = _weight_names(path, flag)
    return embedding_name in names or embedding_name.removeprefix(prefix) in names


def load_token_memory(path: str, flag: str = "--memory", **kwargs) -> PreTrainedModel:
    """A Memory Decoder: the causal LM at ``path``, from safetensors or a ``pytorch_model.bin`` read with
    ``weights_only=True`` (checked first by `read_pickled_state`, so a planted object never runs), in eval mode."""
    has_safetensors = any(name.endswith(".safetensors") for name in os.listdir(path))
    if not has_safetensors and os.path.isfile(os.path.join(path, PICKLE)):
        read_pickled_state(Path(path) / PICKLE, flag, mmap=True)
    with loading(path, flag):
        try:
            memory = AutoModelForCausalLM.from_pretrained(path, use_safetensors=has_safetensors,
                                                          weights_only=True, **kwargs)
        except OSError as err:
            raise UsageError(f"{flag} {path}: {err}") from None
    check_finite_weights(memory, path, flag)
    logger.info("%s %s: a Memory Decoder memory (a %s causal LM over tokens, %.1fM parameters)", flag, path,
                memory.config.model_type, memory.num_parameters() / 1e6)
    return memory.eval()


def load_any_memory(path: str | os.PathLike, flag: str = "--memory", **kwargs) -> torch.nn.Module:
    """The memory at ``path``: a Memory Decoder when it is a causal LM over tokens (`reads_tokens`), else an MLP
    memory (`models.load_memory`, which also names what it does not recognise, and verifies its checksums:
    ``allow_unverified=True`` reads one without them)."""
    path = str(path)
    if os.path.isdir(path) and reads_tokens(path, flag):  # a Hugging Face causal LM: no checksums of ours to verify
        kwargs.pop("allow_unverified", None)
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
            memory_tokenizer = tokenizer_fingerprint(load_tokenizer(memory_path, flag="--memory"))
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
                           memory_temp: float, last: int = 0) -> torch.Tensor:
    """``log_softmax(memory(input_ids).logits / memory_temp)`` in float32, (B, T) -> (B, T', V) for the last ``last``
    positions (0: all), run without a cache over the whole of ``input_ids``."""
    kwargs = {}
    if attention_mask is not None:
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids_from_mask(attention_mask)}
    logits = memory(input_ids=input_ids, use_cache=False, logits_to_keep=last, **kwargs).logits
    return torch.log_softmax(logits.float() / memory_temp, dim=-1)


class TokenMemory(JointMemory):
    """A Memory Decoder: a causal LM over the base's tokens, run over the whole prefix each time."""

    kind = MEMORY_DECODER
    reads_prefix = True

    def check_fits(self, model, tokenizer_fingerprint=None, allow_base_mismatch=False) -> dict:
        return check_token_memory_fits(model, self.module, tokenizer_fingerprint, self.path)

    def reader(self, model, stage=None) -> MemoryReader:
        return TokenReader(self.module, stage)

    @property
    def capture_layer(self) -> int | None:
        return None

    def scored_inputs(self, batches, tokens, windows, batch_size, state) -> ScoredInputs:
        """The Memory Decoder scores the same windows in the same batches (`utils.scoring.score_batches`), so row i
        of both is the same token; its logits (n, V) are what `gold_log_probs` reads."""
        self.module.to(state.device).eval()
        memory_batches = score_batches(self.module, tokens, windows, batch_size, state.process_index,
                                       state.num_processes, layer=None, show_progress=False)

        def pairs():
            for batch in batches:
                synchronize(state.device)
                start = time.perf_counter()
                memory_batch = next(memory_batches)
                synchronize(state.device)
                inputs.seconds += time.perf_counter() - start
                if not np.array_equal(memory_batch.rows, batch.rows):
                    raise RuntimeError("The Memory Decoder scored other rows than the base model")
                yield batch, memory_batch.logits

        inputs = ScoredInputs(pairs())
        return inputs

    def gold_log_probs(self, inputs, labels, memory_temp) -> torch.Tensor:
        return gold_log_probs(inputs, labels, memory_temp)


class TokenReader(MemoryReader):
    """The input ids of each forward (or the whole prefix staged by ``generate``), for the Memory Decoder."""

    def __init__(self, module: PreTrainedModel, stage: PrefixStage | None):
        self.module, self.stage, self.tokens = module, stage, None

    def see_forward(self, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        prefix = self.stage.take() if self.stage is not None else None
        if prefix is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
                raise UsageError("A Memory Decoder memory reads the whole prefix: continue a KV cache through "
                                 "generate(), or call the model on the whole sequence without a cache")
            prefix = (input_ids, kwargs.get("attention_mask"))
        if prefix[0] is None:
            raise UsageError("A Memory Decoder memory reads token ids: give input_ids, not inputs_embeds")
        self.tokens = (prefix[0], prefix[1], input_ids.shape[-1] if input_ids is not None else prefix[0].shape[-1])

    def log_probs(self, num, positions, memory_temp) -> torch.Tensor:
        tokens, self.tokens = self.tokens, None
        if tokens is None:
            raise RuntimeError("The LM head ran without a forward of the model: the memory has no input")
        input_ids, attention_mask, current = tokens
        if positions is None or isinstance(positions, slice):  # the head received the last positions
            return token_memory_log_probs(self.module, input_ids, attention_mask, memory_temp, last=num)
        return token_memory_log_probs(self.module, input_ids, attention_mask, memory_temp, last=current)[:, positions]
