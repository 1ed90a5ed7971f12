"""Training an MLP memory to imitate a kNN-LM (pipeline step 5): the loop shared by both entry points.

``train_mlpmem_offline`` reads each row's input from the saved datastore keys; ``train_mlpmem_online``
computes it with the frozen base model from the preprocessed windows. Both hand this module a *row
source* -- `DatastoreRows` or `OnTheFlyRows` -- and everything else is shared: the targets (sparse
kNN rows, `utils.losses`), the held-out rows, the optimiser and schedule, data parallelism with
`accelerate`, checkpoints that resume exactly, validation, logs and the saved memory.

Rows and units
    Row ``r`` is the prediction of token ``r + 1`` of the split (utils/windows.py); the datastore, the
    kNN targets and the memory's training examples all use that numbering. The last rows
    (``--validation_rows``, or ``--validation_fraction`` of them) are held out in both modes. A *unit*
    is what one step shuffles and batches: a row offline (every row is an independent example), a
    window online (the base model runs over whole windows; rows of a window that are held out are
    left out of the loss).

Steps
    Per epoch the units are permuted with a generator seeded by ``(seed, epoch)``. Optimizer step
    ``s`` of an epoch takes ``gradient_accumulation_steps`` micro-batches; micro-batch ``g`` is the
    slice ``perm[g * B * P : (g + 1) * B * P]`` (B units per device, P processes) and process ``p`` takes
    the ``p``-th B of it. The data position is therefore just the step number, and a checkpoint
    (model, optimizer, scheduler, RNG states, step) resumes bit-exactly.

Output directory::

    config.json, model.safetensors   the memory (save_pretrained; models.load_memory / AutoModel)
    meta.json                        kind "mlp_memory": what it was trained from, sizes, settings, results
    training_results.json            final metrics
    metrics.jsonl                    one JSON line per logging step and per validation
    checkpoints/step-00001234/       the latest checkpoint(s); the run resumes from the newest
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.artifacts.datastore import Datastore
from utils.artifacts.knn_targets import (KnnTargets, check_fingerprint, check_labels, check_targets_for_datastore,
                                         load_knn_targets, targets_summary)
from models import PRESETS, MemoryConfig, MLPMemoryPreTrainedModel, build_memory, init_lm_head_from_base
from utils.cli import UsageError, setup_logging
from utils.hidden_state import HiddenStateHook
from utils.io import ArtifactError, read_json, timed, write_json
from utils.losses import SparseTargets, kl_and_gold_nll, memory_loss, rows_with_targets, sparse_argmax
from utils.scoring import score_windows
from utils.windows import ROW_BEGIN, ROW_END

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"
METRICS_LOG = "metrics.jsonl"
SCHEDULERS = ("linear", "cosine", "constant_with_warmup")


# ---------------------------------------------------------------------------------------------------
# Arguments (one definition each; the entry points add their own input group)


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
        for flag in ("num_layers", "intermediate_size"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.memory_dropout is not None and not 0 <= self.memory_dropout < 1:
            raise UsageError(f"--memory_dropout must be in [0, 1), got {self.memory_dropout}")


@dataclass
class MemoryTrainingArguments:
    """Targets, optimisation, validation, checkpoints and output, shared by offline and online training."""

    output_dir: str = field(metadata={"help": "Where the memory, its meta.json, metrics and checkpoints are written."})
    knn_save_path: str = field(metadata={"help": "kNN target directory written by knn_utils.saveKNNMulti."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of KL(p_knn || q); the CE on the gold token gets 1 - alpha."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Decay after the warm-up.", "choices": list(SCHEDULERS)}
    )
    num_warmup_steps: int = field(
        default=2000, metadata={"help": "Linear warm-up steps (optimizer steps).", "aliases": ["--warmup_steps"]}
    )
    num_train_epochs: int = field(default=50, metadata={"help": "Passes over the training rows."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (overrides --num_train_epochs)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (total L2 norm)."})
    validation_rows: int | None = field(
        default=None, metadata={"help": "Hold out the last N rows for validation (0: none). Overrides --validation_fraction."}
    )
    validation_fraction: float = field(default=0.01, metadata={"help": "Hold out this fraction of the rows (the last ones)."})
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
        for flag in ("num_train_epochs", "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        for flag in ("max_train_steps", "eval_steps"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.num_warmup_steps < 0:
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


def rows_of_windows(windows: np.ndarray, num_rows: int, what: str) -> int:
    """How many leading windows score exactly rows ``[0, num_rows)``."""
    ends = windows[:, ROW_END]
    count = int(np.searchsorted(ends, num_rows, side="left")) + 1
    if windows[0, ROW_BEGIN] != 0 or count > len(windows) or ends[count - 1] != num_rows:
        raise UsageError(f"The kNN targets have {num_rows} rows, which is not the rows of whole windows of {what} "
                         f"({int(ends[-1])} rows in {len(windows)} windows)")
    return count


# ---------------------------------------------------------------------------------------------------
# Batches and the two row sources


@dataclass
class MemoryBatch:
    """Inputs and targets of n rows."""

    inputs: torch.Tensor  # (n, d) float32
    targets: SparseTargets
    labels: torch.Tensor  # (n,) int64

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def to(self, device) -> "MemoryBatch":
        return MemoryBatch(self.inputs.to(device, non_blocking=True), self.targets.to(device),
                           self.labels.to(device, non_blocking=True))


def make_batch(inputs: torch.Tensor, rows: np.ndarray, targets: KnnTargets, vocab_size: int) -> MemoryBatch:
    """Pair the inputs of ``rows`` (n, d) with their sparse kNN targets and gold tokens."""
    entry_row, token_ids, probs = targets.batch(rows)
    labels = np.asarray(targets.labels[rows], dtype=np.int64)
    if len(token_ids) and int(token_ids.max()) >= vocab_size or len(labels) and int(labels.max()) >= vocab_size:
        raise UsageError(f"--knn_save_path {targets.path} holds token ids >= the memory's vocabulary size {vocab_size}")
    return MemoryBatch(inputs.float(), SparseTargets.from_numpy(entry_row, token_ids, probs, len(rows)),
                       torch.from_numpy(labels))


class RowSource(Protocol):
    """What the training loop needs from a mode: training units, their batches, and validation batches."""

    unit: str  # "row" or "window"
    num_train_units: int
    train_batch_size: int  # units per device per micro-batch
    eval_batch_size: int

    def train_batch(self, units: np.ndarray) -> MemoryBatch: ...

    def validation_batches(self, rank: int, world_size: int) -> Iterator[MemoryBatch]: ...

    def describe(self) -> dict: ...


class DatastoreRows:
    """Offline: the input of row r is the datastore key r; units are rows ``[0, boundary)``."""

    unit = "row"

    def __init__(self, datastore: Datastore, targets: KnnTargets, boundary: int, vocab_size: int,
                 train_batch_size: int, eval_batch_size: int, max_train_samples: int | None = None):
        self.datastore, self.targets, self.boundary, self.vocab_size = datastore, targets, boundary, vocab_size
        self.num_train_units = min(boundary, max_train_samples or boundary)
        self.train_batch_size, self.eval_batch_size = train_batch_size, eval_batch_size

    def rows_batch(self, rows: np.ndarray) -> MemoryBatch:
        rows = np.sort(rows)  # sequential reads of the memory-mapped keys
        keys = torch.from_numpy(np.asarray(self.datastore.keys[rows], dtype=np.float32))  # (n, d)
        return make_batch(keys, rows, self.targets, self.vocab_size)

    def train_batch(self, units: np.ndarray) -> MemoryBatch:
        return self.rows_batch(units)

    def validation_batches(self, rank: int, world_size: int) -> Iterator[MemoryBatch]:
        mine = np.array_split(np.arange(self.boundary, self.datastore.num_rows), world_size)[rank]
        for begin in range(0, len(mine), self.eval_batch_size):
            yield self.rows_batch(mine[begin : begin + self.eval_batch_size])

    def describe(self) -> dict:
        return {"mode": "offline", "unit": self.unit, "train_units": self.num_train_units,
                "validation_rows": self.datastore.num_rows - self.boundary}


@torch.no_grad()
def window_hidden_states(model: torch.nn.Module, tokens: np.ndarray, windows: np.ndarray, layer: int = -1
                         ) -> tuple[np.ndarray, torch.Tensor]:
    """The kNN key of every scored row of some windows, computed by the frozen base model.

    Returns the global row ids (n,) and the hidden states (n, d): the input of block ``layer``'s
    feed-forward layer, the same tensor the datastore stores. Only the transformer body runs (no LM head).
    """
    with HiddenStateHook(model, layer) as hook:
        scored = score_windows(model, hook, tokens, windows, np.arange(len(windows)), with_logits=False)
    return scored.rows, scored.hidden


class OnTheFlyRows:
    """Online: the frozen base model computes the inputs from the windows; units are windows."""

    unit = "window"

    def __init__(self, model: torch.nn.Module, tokens: np.ndarray, windows: np.ndarray, layer: int,
                 targets: KnnTargets, boundary: int, vocab_size: int, train_batch_size: int, eval_batch_size: int,
                 max_train_samples: int | None = None):
        self.model, self.tokens, self.windows, self.layer = model.eval(), tokens, windows, layer
        self.targets, self.boundary, self.vocab_size = targets, boundary, vocab_size
        self.train_windows = np.flatnonzero(windows[:, ROW_BEGIN] < boundary)[:max_train_samples]
        self.validation_windows = np.flatnonzero(windows[:, ROW_END] > boundary)
        self.num_train_units = len(self.train_windows)
        self.train_batch_size, self.eval_batch_size = train_batch_size, eval_batch_size

    def windows_batch(self, window_ids: np.ndarray, keep) -> MemoryBatch:
        """The rows of some windows for which ``keep(rows)`` is true."""
        if len(window_ids) == 0:
            return make_batch(torch.zeros(0, self.model.config.hidden_size), np.zeros(0, np.int64), self.targets, self.vocab_size)
        rows, hidden = window_hidden_states(self.model, self.tokens, self.windows[np.sort(window_ids)], self.layer)
        mask = keep(rows)
        return make_batch(hidden[torch.from_numpy(mask).to(hidden.device)], rows[mask], self.targets, self.vocab_size)

    def train_batch(self, units: np.ndarray) -> MemoryBatch:
        return self.windows_batch(self.train_windows[units], lambda rows: rows < self.boundary)

    def validation_batches(self, rank: int, world_size: int) -> Iterator[MemoryBatch]:
        mine = np.array_split(self.validation_windows, world_size)[rank]
        for begin in range(0, len(mine), self.eval_batch_size):
            yield self.windows_batch(mine[begin : begin + self.eval_batch_size], lambda rows: rows >= self.boundary)

    def describe(self) -> dict:
        return {"mode": "online", "unit": self.unit, "train_units": self.num_train_units,
                "validation_rows": self.targets.num_rows - self.boundary, "layer": self.layer}


# ---------------------------------------------------------------------------------------------------
# The memory


def make_memory(memory_args: MemoryArguments, base_config, base_parameters: int | None, record: dict,
                base_model: torch.nn.Module | None = None) -> MLPMemoryPreTrainedModel:
    """Build (and optionally head-initialise) a memory for a base model; ``record`` = base_model, layer, fingerprint."""
    config = MemoryConfig.from_base(base_config, preset=memory_args.base_model_name, num_layers=memory_args.num_layers,
                                    intermediate_size=memory_args.intermediate_size, base_parameters=base_parameters,
                                    **record)
    if memory_args.memory_dropout is not None:
        config.dropout = memory_args.memory_dropout
    memory = build_memory(config)
    logger.info("Memory: %s", config.describe())
    if base_parameters:
        logger.info("Base model: %.2fM parameters; memory: %.2fM", base_parameters / 1e6, memory.num_parameters() / 1e6)
    if memory_args.init_lm_head:
        if base_model is None:
            raise UsageError("--init_lm_head needs the base model's weights (give --model_name_or_path)")
        init_lm_head_from_base(memory, base_model)
    return memory


def base_parameter_count(config) -> int:
    """Parameters of a causal LM of this config, counted on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


# ---------------------------------------------------------------------------------------------------
# Accelerator, schedule, checkpoints


def make_accelerator(args: MemoryTrainingArguments):
    """An `Accelerator`: gloo processes on a machine without CUDA, bf16 autocast on GPU only."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and args.bf16 else "no")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # our own lines time the checkpoints
    if accelerator.num_processes > 1 and not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.state.num_processes))
    return accelerator


@dataclass
class Schedule:
    """How the units of an epoch are cut into optimizer steps."""

    num_units: int
    batch_size: int  # units per device per micro-batch
    num_processes: int
    accumulation: int
    epochs: int
    max_steps: int | None

    @property
    def units_per_micro_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_units / (self.units_per_micro_batch * self.accumulation))

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def units(self, seed: int, step: int, micro: int, rank: int) -> np.ndarray:
        """The unit ids process ``rank`` trains on in micro-batch ``micro`` of optimizer step ``step``."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(seed, epoch, self.num_units)
        g = step_in_epoch * self.accumulation + micro
        chunk = perm[g * self.units_per_micro_batch : (g + 1) * self.units_per_micro_batch]
        return chunk[rank * self.batch_size : (rank + 1) * self.batch_size]


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_permutation(seed: int, epoch: int, num_units: int) -> np.ndarray:
    """The order of the units in ``epoch`` (cached: one epoch at a time)."""
    key = (seed, epoch, num_units)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(num_units)
    return _PERMUTATIONS[key]


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(accelerator, output_dir: str, step: int, identity: dict, limit: int) -> None:
    """Save model, optimizer, scheduler and RNG states under a temporary name; rename when complete."""
    final = Path(output_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = final.with_name(final.name + ".partial")
    with timed(f"Saving checkpoint {final.name}", logger):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(staging / TRAINER_STATE, {"step": step, "identity": identity})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for old in checkpoint_dirs(output_dir)[:-limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()


def checkpoint_to_resume(args: MemoryTrainingArguments) -> Path | None:
    """The explicit --resume_from_checkpoint, else the newest checkpoint in --output_dir, else None."""
    if args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        if not (path / TRAINER_STATE).is_file():
            raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint (no {TRAINER_STATE})")
        return path
    found = checkpoint_dirs(args.output_dir)
    return found[-1] if found else None


def check_identity(saved: dict, current: dict, checkpoint: Path) -> None:
    """A checkpoint resumes only the same run: same inputs, model and data layout."""
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in current.items()
                   if key != "total_steps" and saved.get(key) != value]
    if differences:
        raise UsageError(f"Cannot resume from {checkpoint}: it belongs to another run ({'; '.join(differences)}). "
                         "Pass --overwrite_output_dir to start over, or another --output_dir.")
    if saved.get("total_steps") != current["total_steps"]:
        logger.warning("Resuming with %d total steps instead of %d: the learning-rate schedule changes from here on",
                       current["total_steps"], saved.get("total_steps"))


def prepare_output_dir(args: MemoryTrainingArguments, accelerator) -> None:
    """Refuse to overwrite a finished memory; wipe the directory with --overwrite_output_dir."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and out.exists():
            shutil.rmtree(out)
        elif (out / "meta.json").is_file():
            raise ArtifactError(f"--output_dir {out} already holds a trained memory; pass --overwrite_output_dir "
                                "or choose another directory")
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by a run that was interrupted (they will be written again)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(model, source: RowSource, accelerator, alpha: float, vocab_size: int) -> dict:
    """KL to the kNN targets, top-1 agreement with the kNN argmax, and CE on the gold token over the held-out rows."""
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # kl, rows with targets, agree, ce, rows
    for batch in source.validation_batches(accelerator.process_index, accelerator.num_processes):
        if batch.num_rows == 0:
            continue
        batch = batch.to(accelerator.device)
        logits = model(batch.inputs)  # (n, V)
        kl, ce = kl_and_gold_nll(logits, batch.targets, batch.labels)  # (n,), (n,)
        has_target = rows_with_targets(batch.targets)
        agree = (logits.argmax(-1) == sparse_argmax(batch.targets, vocab_size)) & has_target
        totals += torch.stack([kl.sum().double(), has_target.sum().double(),
                               agree.sum().double(), ce.sum().double(), torch.tensor(batch.num_rows, dtype=torch.float64,
                                                                                      device=ce.device)])
    model.train()
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    kl_sum, with_targets, agree, ce_sum, rows = totals.tolist()
    if rows == 0:
        return {}
    kl, ce = kl_sum / max(with_targets, 1), ce_sum / rows
    return {"val_loss": alpha * kl + (1 - alpha) * ce, "val_kl": kl, "val_top1_agreement": agree / max(with_targets, 1),
            "val_ce": ce, "val_ppl": math.exp(min(ce, 50.0)), "val_rows": int(rows)}


# ---------------------------------------------------------------------------------------------------
# The loop


class MetricsLog:
    """Appends JSON lines to metrics.jsonl (main process only) and keeps the last validation."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.last_validation = path, enabled, {}

    def write(self, record: dict) -> None:
        if record.get("type") == "validation":
            self.last_validation = record
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Running:
    """Sums of the training loss terms since the last log line (reduced over processes when logged)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, kl, ce, micro-batches
        self.rows, self.start = 0, time.perf_counter()

    def add(self, terms, rows: int) -> None:
        self.sums += torch.stack([terms.loss.detach().double(), terms.kl.double(), terms.ce.double(),
                                  torch.ones((), dtype=torch.float64, device=self.device)])
        self.rows += rows

    def summary(self, accelerator) -> dict:
        sums = torch.cat([self.sums, torch.tensor([self.rows], dtype=torch.float64, device=self.device)])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        loss, kl, ce, count, rows = sums.tolist()
        seconds = time.perf_counter() - self.start
        return {"loss": loss / max(count, 1), "kl": kl / max(count, 1), "ce": ce / max(count, 1),
                "rows_per_second": round(rows / max(seconds, 1e-9), 1)}


def train_step(model, optimizer, source: RowSource, schedule: Schedule, args: MemoryTrainingArguments, step: int,
               accelerator, running: Running) -> float:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the gradient norm."""
    for micro in range(schedule.accumulation):
        units = schedule.units(args.seed, step, micro, accelerator.process_index)
        batch = source.train_batch(units).to(accelerator.device)
        last = micro == schedule.accumulation - 1
        with accelerator.no_sync(model) if not last else nullcontext():
            logits = model(batch.inputs)  # (n, V)
            terms = memory_loss(logits, batch.targets, batch.labels, args.alpha)
            accelerator.backward(terms.loss / schedule.accumulation)
        running.add(terms, batch.num_rows)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def is_due(every: str | int | None, step: int, steps_per_epoch: int, total: int) -> bool:
    """Whether something done every ``every`` steps (or every 'epoch') is due after ``step`` steps."""
    if every in (None, "no"):
        return False
    if every == "epoch":
        return step % steps_per_epoch == 0 or step == total
    return step % int(every) == 0


@dataclass
class Run:
    """Everything the loop touches, built once by `start_run`."""

    model: torch.nn.Module  # prepared (DDP-wrapped when data parallel)
    optimizer: torch.optim.Optimizer
    scheduler: object
    source: RowSource
    schedule: Schedule
    args: MemoryTrainingArguments
    accelerator: object
    metrics_log: MetricsLog
    identity: dict  # what a checkpoint must match to be resumed
    provenance: dict

    def validate(self, step: int) -> None:
        """Validate the current weights and log the result (unwrapped: ranks may see different batch counts)."""
        with timed(f"Validation at step {step}", logger):
            result = validate(self.accelerator.unwrap_model(self.model), self.source, self.accelerator, self.args.alpha,
                              self.model_config.vocab_size)
        if result:
            epoch = step / self.schedule.steps_per_epoch
            self.metrics_log.write({"type": "validation", "step": step, "epoch": round(epoch, 4), **result})
            logger.info("step %d (epoch %.2f): %s", step, epoch, {k: round(v, 4) for k, v in result.items()})

    @property
    def model_config(self) -> MemoryConfig:
        return self.accelerator.unwrap_model(self.model).config


def start_run(memory: MLPMemoryPreTrainedModel, source: RowSource, args: MemoryTrainingArguments, accelerator,
              provenance: dict) -> Run:
    """Schedule, optimizer and scheduler, prepared for data parallelism; the identity of the run."""
    from transformers import get_scheduler

    schedule = Schedule(source.num_train_units, source.train_batch_size, accelerator.num_processes,
                        args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)
    if schedule.num_units < schedule.num_processes:
        raise UsageError(f"Only {schedule.num_units} training {source.unit}s for {schedule.num_processes} processes")
    if args.num_warmup_steps >= schedule.total_steps:
        logger.warning("--num_warmup_steps %d >= the %d training steps: the learning rate never decays",
                       args.num_warmup_steps, schedule.total_steps)
    identity = {"provenance": provenance, "source": source.describe(), "memory": memory.config.to_dict(),
                "batch_size": schedule.batch_size, "num_processes": schedule.num_processes,
                "gradient_accumulation_steps": schedule.accumulation, "seed": args.seed, "total_steps": schedule.total_steps}
    identity = json.loads(json.dumps(identity, default=str))  # as it reads back from trainer_state.json
    optimizer = torch.optim.AdamW(memory.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=schedule.total_steps)
    model, optimizer = accelerator.prepare(memory, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us, once per optimizer step
    metrics_log = MetricsLog(Path(args.output_dir) / METRICS_LOG, accelerator.is_main_process)
    return Run(model, optimizer, scheduler, source, schedule, args, accelerator, metrics_log, identity, provenance)


def resume(run: Run) -> int:
    """Load the checkpoint to resume from, if any; return the step to continue after."""
    checkpoint = checkpoint_to_resume(run.args)
    if checkpoint is None:
        return 0
    saved = read_json(checkpoint / TRAINER_STATE)
    check_identity(saved["identity"], run.identity, checkpoint)
    with timed(f"Loading checkpoint {checkpoint}", logger):
        run.accelerator.load_state(str(checkpoint))
    if run.accelerator.is_main_process:
        truncate_metrics(run.metrics_log.path, saved["step"])
    logger.info("Resumed from %s at step %d of %d", checkpoint, saved["step"], run.schedule.total_steps)
    return saved["step"]


def after_step(run: Run, step: int, grad_norm: float, running: Running, progress) -> None:
    """Log, validate and checkpoint when due."""
    schedule, args = run.schedule, run.args
    if step % args.logging_steps == 0 or step == schedule.total_steps:
        record = {"type": "train", "step": step, "epoch": round(step / schedule.steps_per_epoch, 4),
                  "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm, **running.summary(run.accelerator)}
        run.metrics_log.write(record)
        progress.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}")
        running.reset()
    if is_due(args.eval_steps or "epoch", step, schedule.steps_per_epoch, schedule.total_steps):
        run.validate(step)
    if is_due(args.checkpointing_steps, step, schedule.steps_per_epoch, schedule.total_steps):
        save_checkpoint(run.accelerator, args.output_dir, step, run.identity, args.save_total_limit)


def train_memory(memory: MLPMemoryPreTrainedModel, source: RowSource, args: MemoryTrainingArguments, accelerator,
                 provenance: dict, stop_after_steps: int | None = None) -> dict | None:
    """Train ``memory`` on ``source``, then save it with its meta.json in --output_dir; return the final metrics.

    ``provenance`` (inputs, base model, targets) goes into meta.json and, with the data layout, into the
    identity a checkpoint must match to be resumed. ``stop_after_steps`` ends the run early (after that
    step's checkpoint, if one is due), as a kill would; tests use it. Returns None then.
    """
    start = time.time()
    run = start_run(memory, source, args, accelerator, provenance)
    step = resume(run)
    schedule = run.schedule
    logger.info("Training on %d %ss (%d held-out rows): %d steps/epoch x %d per step (%d per device x %d processes x %d "
                "accumulation), %d steps in all", schedule.num_units, source.unit, source.describe()["validation_rows"],
                schedule.steps_per_epoch, schedule.units_per_micro_batch * schedule.accumulation, schedule.batch_size,
                schedule.num_processes, schedule.accumulation, schedule.total_steps)
    run.model.train()
    running = Running(accelerator.device)
    with tqdm(total=schedule.total_steps, initial=step, desc="Training the memory", unit="step",
              disable=not accelerator.is_main_process or args.disable_tqdm) as progress:
        while step < schedule.total_steps:
            grad_norm = train_step(run.model, run.optimizer, source, schedule, args, step, accelerator, running)
            run.scheduler.step()
            step += 1
            progress.update(1)
            after_step(run, step, grad_norm, running, progress)
            if stop_after_steps is not None and stop_after_steps <= step < schedule.total_steps:
                logger.info("Stopping early after step %d (stop_after_steps)", step)
                return None
    if run.metrics_log.last_validation.get("step") != step:  # the final metrics are always those of the final weights
        run.validate(step)
    return finish(run, time.time() - start)


def finish(run: Run, seconds: float) -> dict:
    """Save the memory with save_pretrained, then training_results.json and (last, marking completion) meta.json."""
    accelerator, args, schedule = run.accelerator, run.args, run.schedule
    accelerator.wait_for_everyone()
    memory = accelerator.unwrap_model(run.model)
    results = {"train_steps": schedule.total_steps, "train_epochs": schedule.total_steps / schedule.steps_per_epoch,
               "train_seconds": round(seconds, 2),
               **{k: v for k, v in run.metrics_log.last_validation.items() if k.startswith("val_")}}
    if accelerator.is_main_process:
        with timed("Saving the memory", logger):
            memory.save_pretrained(args.output_dir)
        write_json(Path(args.output_dir) / "training_results.json", results)
        meta = {"kind": "mlp_memory", "format_version": FORMAT_VERSION, "memory": memory.config.describe(),
                **run.provenance, "source": run.source.describe(), "training": asdict(args),
                "num_processes": accelerator.num_processes, "results": results}
        write_json(Path(args.output_dir) / "meta.json", meta)
        logger.info("Memory saved to %s: %s", args.output_dir, results)
    accelerator.wait_for_everyone()
    return results


# ---------------------------------------------------------------------------------------------------
# The two modes: their inputs, checks and set-up (the entry points only parse and call these)


@dataclass
class OfflineArguments:
    """Offline training: the inputs are the saved datastore keys."""

    knn_dstore_path: str = field(metadata={"help": "Datastore directory (train_base --save_knnlm_dstore) whose keys are the inputs."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The base model whose hidden states the keys are (default: the one recorded in the datastore's "
                  "meta.json). Its config sizes the memory; its weights are read only for --init_lm_head."},
    )
    per_device_train_batch_size: int = field(default=1024, metadata={"help": "Rows per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=4096, metadata={"help": "Rows per device per validation batch."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only (debugging)."})

    def __post_init__(self):
        check_batch_flags(self)


@dataclass
class OnlineArguments:
    """Online training: the frozen base model (ModelArguments) computes the inputs from the preprocessed windows."""

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


def check_batch_flags(args) -> None:
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "max_train_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")


def open_targets(args: MemoryTrainingArguments) -> KnnTargets:
    with timed("Opening the kNN targets", logger):
        return load_knn_targets(args.knn_save_path)


def offline_base(args: OfflineArguments, datastore: Datastore):
    """The base model's ModelArguments and config (and its tokenizer checked) for an offline memory."""
    from transformers import AutoConfig

    from utils.arguments import ModelArguments
    from utils.modeling import check_exists, load_tokenizer, tokenizer_fingerprint

    recorded = datastore.meta.get("model") or {}
    if args.model_name_or_path is None and not recorded.get("model_name_or_path"):
        raise UsageError(f"--knn_dstore_path {datastore.path} does not record a loadable base model; give --model_name_or_path")
    model_args = ModelArguments(model_name_or_path=args.model_name_or_path or recorded["model_name_or_path"],
                                gguf_file=None if args.model_name_or_path else recorded.get("gguf_file"))
    flag = "--model_name_or_path" if args.model_name_or_path else f"the base model recorded in {datastore.path}/meta.json"
    check_exists(model_args.model_name_or_path, flag)
    kwargs = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **kwargs)
    if config.hidden_size != datastore.dim:
        raise UsageError(f"{flag} {model_args.model_name_or_path} has hidden size {config.hidden_size}, but the keys of "
                         f"--knn_dstore_path {datastore.path} have dimension {datastore.dim}")
    if args.model_name_or_path is not None:
        try:
            fingerprint = tokenizer_fingerprint(load_tokenizer(model_args.model_name_or_path, model_args.gguf_file, flag))
        except (OSError, ValueError):
            fingerprint = None
            logger.warning("No tokenizer beside %s; its fingerprint is not checked", model_args.model_name_or_path)
        if fingerprint and fingerprint != datastore.meta.get("tokenizer_fingerprint"):
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path} has tokenizer fingerprint {fingerprint}, "
                             f"but --knn_dstore_path {datastore.path} was made with {datastore.meta.get('tokenizer_fingerprint')}")
    return model_args, config


def run_offline(offline: OfflineArguments, memory_args: MemoryArguments, args: MemoryTrainingArguments,
                stop_after_steps: int | None = None) -> dict | None:
    """Train a memory on datastore keys -> kNN targets."""
    from utils.artifacts.datastore import load_datastore
    from knn_utils.index import datastore_summary
    from utils.modeling import describe_model, load_causal_lm

    accelerator = make_accelerator(args)
    setup_logging(accelerator.is_main_process)
    logger.info("Offline memory training: %s %s %s", offline, memory_args, args)
    prepare_output_dir(args, accelerator)
    datastore = load_datastore(offline.knn_dstore_path)
    targets = open_targets(args)
    check_targets_for_datastore(targets, datastore)
    model_args, base_config = offline_base(offline, datastore)
    base_model = load_causal_lm(model_args) if memory_args.init_lm_head else None
    record = {"base_model": describe_model(model_args), "layer": datastore.meta.get("layer"),
              "tokenizer_fingerprint": datastore.meta.get("tokenizer_fingerprint")}
    set_seed(args.seed)
    memory = make_memory(memory_args, base_config, base_parameter_count(base_config), record, base_model)
    del base_model
    boundary = datastore.num_rows - args.held_out_rows(datastore.num_rows)
    source = DatastoreRows(datastore, targets, boundary, memory.config.vocab_size, offline.per_device_train_batch_size,
                           offline.per_device_eval_batch_size, offline.max_train_samples)
    provenance = {"mode": "offline", **record, "datastore": datastore_summary(datastore),
                  "knn_targets": targets_summary(targets)}
    return train_memory(memory, source, args, accelerator, provenance, stop_after_steps)


def run_online(online: OnlineArguments, model_args, memory_args: MemoryArguments, args: MemoryTrainingArguments,
               stop_after_steps: int | None = None) -> dict | None:
    """Train a memory on hidden states computed by the frozen base model -> kNN targets."""
    from utils.architectures import normalize_layer
    from utils.modeling import describe_model, load_model_for_dataset
    from utils.artifacts.dataset import load_split

    accelerator = make_accelerator(args)
    setup_logging(accelerator.is_main_process)
    logger.info("Online memory training: %s %s %s %s", online, model_args, memory_args, args)
    prepare_output_dir(args, accelerator)
    split = load_split(online.dataset_name, online.dataset_split_name)
    targets = open_targets(args)
    fingerprint = split.meta["tokenizer"]["fingerprint"]
    check_fingerprint(targets, fingerprint, f"--dataset_name {online.dataset_name}")
    num_windows = rows_of_windows(split.windows, targets.num_rows, f"--dataset_name {online.dataset_name} "
                                  f"({online.dataset_split_name})")
    check_labels(targets, split.tokens[1 : targets.num_rows + 1], f"--dataset_name {online.dataset_name} "
                 f"({online.dataset_split_name})")
    with timed("Loading the base model", logger):
        base_model, _ = load_model_for_dataset(model_args, split.meta, online.dataset_name)
    base_model.requires_grad_(False).eval().to(accelerator.device)
    layer = normalize_layer(base_model, online.dstore_layer)
    record = {"base_model": describe_model(model_args), "layer": layer, "tokenizer_fingerprint": fingerprint}
    set_seed(args.seed)
    memory = make_memory(memory_args, base_model.config, base_model.num_parameters(), record, base_model)
    boundary = targets.num_rows - args.held_out_rows(targets.num_rows)
    source = OnTheFlyRows(base_model, split.tokens, split.windows[:num_windows], layer, targets, boundary,
                          memory.config.vocab_size, online.per_device_train_batch_size, online.per_device_eval_batch_size,
                          online.max_train_samples)
    dataset = {"path": os.path.abspath(online.dataset_name), "split": online.dataset_split_name,
               "tokens_sha256": split.meta["splits"][online.dataset_split_name]["tokens_sha256"],
               "block_size": split.meta["block_size"], "stride": split.meta["stride"]}
    provenance = {"mode": "online", **record, "dataset": dataset, "knn_targets": targets_summary(targets)}
    return train_memory(memory, source, args, accelerator, provenance, stop_after_steps)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (the memory's initialisation and dropout)."""
    from accelerate.utils import set_seed as accelerate_set_seed

    accelerate_set_seed(seed)
