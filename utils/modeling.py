"""Loading base models and tokenizers: hub names, local directories, GGUF files, tiny from-scratch configs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from utils.architectures import arch_spec
from utils.cli import UsageError

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which base causal LM to load, or how to build one from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub name or local directory of the base model (the directory of a GGUF file with --gguf_file). "
                  "Leave unset to train from scratch with --model_type."},
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file name inside --model_name_or_path (dequantised to float on load)."}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Architecture of a model built from scratch, e.g. gpt2 or llama."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config overrides for a from-scratch model, e.g. n_layer=2,n_embd=128,n_head=4."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or hub name, if not the model's own."}
    )
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype to load the base model in: float32, bfloat16 or float16.", "choices": ["float32", "bfloat16", "float16"]},
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.model_type is None:
            raise UsageError("Give --model_name_or_path (a pretrained model) or --model_type (a model built from scratch).")
        if self.config_overrides and self.model_name_or_path is not None:
            raise UsageError("--config_overrides only applies to a model built from scratch (--model_type without --model_name_or_path).")
        if self.model_type is not None and self.model_name_or_path is None and self.tokenizer_name is None:
            raise UsageError("A model built from scratch (--model_type) needs --tokenizer_name.")


def check_exists(path: str | None, flag: str) -> None:
    """Raise a clear error if ``path`` is written as a local path (not a hub name) but does not exist."""
    if path and path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise UsageError(f"{flag} {path}: no such file or directory")


def load_tokenizer(path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from a directory, a hub name or a GGUF file."""
    check_exists(path, "--tokenizer_path")
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)) and os.path.isdir(path):
        raise UsageError(f"--gguf_file {gguf_file}: not found in {path}")
    if gguf_file is None and is_bare_bpe_dir(path):
        tokenizer = GPT2TokenizerFast.from_pretrained(path)
    else:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if len(tokenizer) < 2:
        raise UsageError(f"--tokenizer_path {path}: the tokenizer loaded with an empty vocabulary")
    return tokenizer


def is_bare_bpe_dir(path: str) -> bool:
    """A directory with only GPT-2 style ``vocab.json`` + ``merges.txt`` (no tokenizer config to auto-load)."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("vocab.json") and has("merges.txt") and not has("tokenizer_config.json") and not has("tokenizer.json")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id map, to tell tokenizers apart whatever their file layout."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def load_causal_lm(args: ModelArguments, vocab_size: int | None = None) -> torch.nn.Module:
    """The base model described by ``args``; a from-scratch model gets ``vocab_size`` unless overridden."""
    dtype = getattr(torch, args.torch_dtype)
    if args.model_name_or_path is not None:
        check_exists(args.model_name_or_path, "--model_name_or_path")
        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype, **kwargs)
    else:
        if args.model_type not in CONFIG_MAPPING:
            raise UsageError(f"--model_type {args.model_type!r} is not a transformers architecture")
        config = CONFIG_MAPPING[args.model_type]()
        if vocab_size is not None:
            config.vocab_size = vocab_size
        if args.config_overrides:
            try:
                config.update_from_string(args.config_overrides)
            except ValueError as err:
                raise UsageError(f"--config_overrides {args.config_overrides!r}: {err}") from None
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        logger.info("Built a %s model from scratch: %.2fM parameters", args.model_type, model.num_parameters() / 1e6)
    arch_spec(model.config.model_type)  # fail early on an architecture the key hook does not know
    return model


def model_tokenizer_path(args: ModelArguments) -> tuple[str, str | None]:
    """Where the tokenizer of ``args`` comes from: (path, gguf file or None)."""
    if args.tokenizer_name is not None:
        return args.tokenizer_name, None
    return args.model_name_or_path, args.gguf_file


def describe_model(args: ModelArguments) -> dict:
    """How to load this model again, for ``meta.json``."""
    return {"model_name_or_path": args.model_name_or_path, "gguf_file": args.gguf_file,
            "model_type": args.model_type, "config_overrides": args.config_overrides}

