"""The command-line arguments of memory training, one definition each: the memory network, the shared
training flags, and each mode's input group (the entry points parse them with `utils.cli.parse_args`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from models import PRESETS
from utils.cli import UsageError, check_finite_floats

SCHEDULERS = ("linear", "cosine", "constant_with_warmup")
RELEASED_WARMUP_STEPS = 2000  # the released implementation's warm-up, for runs of many thousand steps
WARMUP_FRACTION = 0.1  # of a shorter run, when --num_warmup_steps is not given


def warmup_steps(requested: int | None, total_steps: int) -> int:
    """``--num_warmup_steps`` when given, else the released 2,000 or `WARMUP_FRACTION` of the run if that is fewer."""
    if requested is not None:
        return requested
    return min(RELEASED_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * total_steps))


@dataclass
class MemoryArguments:
    """The memory network: its size and initialisation."""

    base_model_name: str | None = field(
        default=None,
        metadata={"help": "Memory size preset (the released names): " + ", ".join(PRESETS) + ". Default: as many "
                  "parameters as the base model (as in the paper), unless --num_layers is given.",
                  "choices": list(PRESETS)},
    )
    num_layers: int | None = field(default=None, metadata={"help": "Number of FFN blocks (overrides the preset)."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "FFN width (default: 4d for GPT-2 style, the base model's for Llama/Mistral)."}
    )
    memory_dropout: float | None = field(
        default=None, metadata={"help": "Dropout of the FFN output (default: the style's, 0.1 GPT-2, 0 Llama/Mistral)."}
    )
    init_lm_head: bool = field(
        default=False,
        metadata={"help": "Initialise the memory's head and final norm from the base model's output embedding and final norm."},
    )

    def __post_init__(self):
        check_finite_floats(self)
        for flag in ("num_layers", "intermediate_size"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.memory_dropout is not None and not 0 <= self.memory_dropout < 1:
            raise UsageError(f"--memory_dropout must be in [0, 1), got {self.memory_dropout}")


@dataclass
class MemoryTrainingArguments:
    """Targets, optimisation, validation, checkpoints and output, shared by offline and online training."""

    output_dir: str = field(metadata={"help": "Where the memory, its meta.json, metrics and checkpoints are written."})
    knn_save_path: str = field(metadata={"help": "kNN target directory written by saveKNNMulti (pipeline step 4)."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of KL(p_knn || q); the CE on the gold token gets 1 - alpha."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Decay after the warm-up.", "choices": list(SCHEDULERS)}
    )
    num_warmup_steps: int | None = field(
        default=None,
        metadata={"help": f"Linear warm-up steps (optimizer steps). Default: the released {RELEASED_WARMUP_STEPS}, or "
                          f"{WARMUP_FRACTION:.0%}% of the run when that is fewer (a short run would otherwise "  # %%: argparse
                          "never leave its warm-up).", "aliases": ["--warmup_steps"]},
    )
    num_train_epochs: int = field(default=50, metadata={"help": "Passes over the training rows."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides --num_train_epochs)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (total L2 norm)."})
    validation_rows: int | None = field(
        default=None, metadata={"help": "Hold out the last N rows for validation (0: none). Overrides --validation_fraction."}
    )
    validation_fraction: float = field(default=0.01, metadata={
        "help": "Hold out this fraction of the rows (the last ones). They usually continue a text the memory trains on, "
                "so they measure the fit to the kNN targets, not generalisation: choose the training length with "
                "evaluate_joint on a validation split."})
    eval_steps: int | None = field(default=None, metadata={"help": "Validate every N steps (default: at the end of every epoch)."})
    checkpointing_steps: str = field(
        default="epoch", metadata={"help": "Save a checkpoint every N steps, every 'epoch', or 'no'."}
    )
    save_total_limit: int = field(default=1, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint directory to resume from (default: the newest one in --output_dir, if any)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete --output_dir first (no resume)."})
    logging_steps: int = field(default=50, metadata={"help": "Log (and append to metrics.jsonl) every N steps."})
    seed: int = field(default=42, metadata={"help": "Seed of the initialisation, the row order and dropout."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPU (CPU always trains in float32)."})
    report_to: str = field(
        default="none", metadata={"help": "Only 'none' (metrics go to metrics.jsonl); kept so released commands parse.",
                                  "choices": ["none"]}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self):
        check_finite_floats(self)
        if self.learning_rate <= 0:
            raise UsageError(f"--learning_rate must be > 0, got {self.learning_rate}")
        for flag in ("num_train_epochs", "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("max_train_steps", "eval_steps"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.num_warmup_steps is not None and self.num_warmup_steps < 0:
            raise UsageError(f"--num_warmup_steps must be >= 0, got {self.num_warmup_steps}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.validation_rows is not None and self.validation_rows < 0:
            raise UsageError(f"--validation_rows must be >= 0, got {self.validation_rows}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UsageError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.checkpointing_steps not in ("epoch", "no") and not (self.checkpointing_steps.isdigit()
                                                                     and int(self.checkpointing_steps) > 0):
            raise UsageError(f"--checkpointing_steps must be a positive number, 'epoch' or 'no', got {self.checkpointing_steps!r}")

    def held_out_rows(self, num_rows: int) -> int:
        """How many of the last rows are held out for validation."""
        held_out = self.validation_rows if self.validation_rows is not None else round(self.validation_fraction * num_rows)
        if held_out >= num_rows:
            flag = "--validation_rows" if self.validation_rows is not None else "--validation_fraction"
            raise UsageError(f"{flag} holds out {held_out} of the {num_rows} rows: nothing is left to train on")
        return held_out


# ---------------------------------------------------------------------------------------------------
# Each mode's inputs (the entry points add them to the groups above)


@dataclass
class OfflineArguments:
    """Offline training: the inputs are the saved datastore keys."""

    knn_dstore_path: str = field(metadata={"help": "Datastore directory (train_base --save_knnlm_dstore) whose keys are the inputs."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The base model whose hidden states the keys are (default: the one recorded in the datastore's "
                  "meta.json). Its config sizes the memory; given, its weights are loaded to check that they made the "
                  "keys (--allow_base_mismatch to use another model) and for --init_lm_head."},
    )
    per_device_train_batch_size: int = field(default=1024, metadata={"help": "Rows per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=4096, metadata={"help": "Rows per device per validation batch."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only (debugging)."})
    dataloader_num_workers: int = field(default=1, metadata={
        "help": "Processes that gather the next batches' keys and targets from the memory maps while one batch trains "
                "(0: gather in the training process). The batches, and the trained memory, do not depend on it."})

    def __post_init__(self):
        check_batch_flags(self)
        if self.dataloader_num_workers < 0:
            raise UsageError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")


@dataclass
class OnlineArguments:
    """Online training: the frozen base model (PretrainedModelArguments) computes the inputs from the preprocessed windows."""

    dataset_name: str = field(metadata={"help": "Directory written by utils/preprocess_dataset.py."})
    dataset_split_name: str = field(default="train", metadata={"help": "Split whose rows the kNN targets describe."})
    dstore_layer: int = field(default=-1, metadata={"help": "Block whose feed-forward input is the memory's input (-1: the last)."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Windows per device per micro-batch (all their scored rows are trained on)."}
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Windows per device per validation batch."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N windows only (debugging)."})

    def __post_init__(self):
        check_batch_flags(self)


# ---------------------------------------------------------------------------------------------------
# Which flags decide the trained memory (the resume identity)

# The fields of the argument groups that never change the trained memory: where the run is written, what
# is logged or validated and when (validation runs without randomness), and how the run resumes. Every
# other field -- the memory's size, the inputs, the optimisation, the schedule, the seed, the step count
# -- is a setting of the run: a checkpoint resumes only a run with the same values (checkpoints.check_identity).
NOT_RESULT_SETTINGS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "checkpointing_steps", "save_total_limit",
    "logging_steps", "eval_steps", "per_device_eval_batch_size", "disable_tqdm", "report_to", "dataloader_num_workers",
})


def result_settings(*groups) -> dict:
    """The fields of argument dataclasses ``groups`` that decide the trained memory, by flag name."""
    return {f.name: getattr(group, f.name) for group in groups for f in fields(group) if f.name not in NOT_RESULT_SETTINGS}


def check_batch_flags(args) -> None:
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_train_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
