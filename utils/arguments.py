"""Argument groups shared by the entry points; each flag and default is defined here once."""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.cli import UsageError

SPLITS = ("train", "validation", "test")


@dataclass
class PretrainedModelArguments:
    """Which pretrained base causal LM to load (the stages that evaluate or read a model)."""

    model_name_or_path: str = field(
        metadata={"help": "Hub name or local directory of the base model (the directory of a GGUF file with --gguf_file)."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file name inside --model_name_or_path (dequantised to float on load)."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or hub name, if not the model's own."}
    )
    torch_dtype: str = field(
        default="float32",
        metadata={"help": "Dtype to load the base model in: float32, bfloat16 or float16.", "choices": ["float32", "bfloat16", "float16"]},
    )


@dataclass
class ModelArguments(PretrainedModelArguments):
    """Which base causal LM to load, or how to build one from scratch (train_base)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub name or local directory of the base model (the directory of a GGUF file with --gguf_file). "
                  "Leave unset to train from scratch with --model_type."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Architecture of a model built from scratch, e.g. gpt2 or llama."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config overrides for a from-scratch model, e.g. n_layer=2,n_embd=128,n_head=4."},
    )

    def __post_init__(self):
        if self.model_name_or_path is None and self.model_type is None:
            raise UsageError("Give --model_name_or_path (a pretrained model) or --model_type (a model built from scratch).")
        if self.config_overrides and self.model_name_or_path is not None:
            raise UsageError("--config_overrides only applies to a model built from scratch (--model_type without --model_name_or_path).")
        if self.model_type is not None and self.model_name_or_path is None and self.tokenizer_name is None:
            raise UsageError("A model built from scratch (--model_type) needs --tokenizer_name.")


@dataclass
class DataArguments:
    """Which preprocessed dataset to read, and how much of it."""

    dataset_name: str = field(metadata={"help": "Directory written by utils/preprocess_dataset.py."})
    eval_subset: str = field(default="validation", metadata={"help": "Split to evaluate.", "choices": list(SPLITS)})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate (and build the datastore over) only the first N windows of --eval_subset."}
    )

    def __post_init__(self):
        check_positive(self, "max_eval_samples")


@dataclass
class TrainingDataArguments(DataArguments):
    """DataArguments plus what fine-tuning reads (train_base)."""

    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many blocks."})

    def __post_init__(self):
        check_positive(self, "max_eval_samples", "max_train_samples")


def check_positive(args, *flags: str) -> None:
    """Each of ``flags`` that is set must be >= 1."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")


@dataclass
class DstoreArguments:
    """Saving the kNN-LM datastore during evaluation."""

    save_knnlm_dstore: bool = field(default=False, metadata={"help": "Save keys and values of the evaluated rows (needs --do_eval)."})
    dstore_dir: str | None = field(default=None, metadata={"help": "Directory of the datastore to write."})
    dstore_layer: int = field(default=-1, metadata={"help": "Block whose feed-forward input is the key (-1: the last)."})

    def __post_init__(self):
        if self.save_knnlm_dstore and not self.dstore_dir:
            raise UsageError("--save_knnlm_dstore needs --dstore_dir")


@dataclass
class VerificationArguments:
    """Whether input artifacts without block checksums may be read (the stages that meet no base model parse this
    group alone; `BaseCheckArguments` includes it)."""

    allow_unverified: bool = field(default=False, metadata={
        "help": "Read input artifacts (dataset, datastore, index, kNN targets, memory) whose meta.json records no block "
                "checksums, or that have no meta.json, after a warning: written before checksums were recorded, or "
                "with the record removed. Without it they are refused, since nothing says their files are intact."})


@dataclass
class BaseCheckArguments(VerificationArguments):
    """Whether a memory may meet another base model than the one whose hidden states it was trained on (and whether
    unverified inputs may be read, `VerificationArguments`)."""

    allow_base_mismatch: bool = field(default=False, metadata={
        "help": "Accept a base model whose fingerprint (utils.modeling.model_fingerprint: config and weights up to the "
                "key block) differs from the one the memory, datastore or kNN targets record, e.g. a memory used with "
                "a fine-tuned base, or trained on another retriever's rows. Recorded in the results and meta.json."})
