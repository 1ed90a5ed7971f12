"""Training an MLP memory to imitate a kNN-LM (pipeline step 5): the loop shared by both entry points.

``train_mlpmem_offline`` reads each row's input from the saved datastore keys; ``train_mlpmem_online``
computes it with the frozen base model from the preprocessed windows. Both hand this module a *row
source* -- `DatastoreRows` or `OnTheFlyRows` -- and everything else is shared: the targets (sparse
kNN rows, `models.training.losses`), the held-out rows, the optimiser and schedule, data parallelism with
`accelerate`, checkpoints that resume exactly, validation, logs and the saved memory.

This module holds validation, the loop (`train_memory`: `start_run`, `resume`, `train_step`,
`after_step`) and `finish`; the schedule and checkpoints are in `models.training.checkpoints`.

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

Output directory
    The memory directory of `models.memory_directory` (config.json and model.safetensors, meta.json,
    training_results.json, metrics.jsonl, checkpoints/); `finish` writes it with `save_memory`.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models import MemoryConfig, MLPMemoryPreTrainedModel
from models.memory_directory import METRICS_LOG, TRAINER_STATE, check_finite_weights, save_memory
from models.training.arguments import (RELEASED_WARMUP_STEPS, WARMUP_FRACTION, MemoryTrainingArguments, result_settings,
                                       warmup_steps)
from models.training.checkpoints import (Schedule, check_identity, checkpoint_to_resume, load_checkpoint,
                                         load_running_state, save_checkpoint, tensor_bytes, truncate_metrics)
from models.training.losses import kl_and_gold_nll, memory_loss, rows_with_targets, sparse_argmax
from models.training.rows import MemoryBatch, RowSource
from utils.cli import UsageError
from utils.io import check_free_space, read_json, timed
from utils.modeling import local_path_or_name

logger = logging.getLogger(__name__)


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

    def state(self) -> dict:
        """This process's sums, as a checkpoint keeps them (`restore` puts them back exactly: JSON keeps float64)."""
        return {"sums": self.sums.tolist(), "rows": self.rows}

    def restore(self, state: dict | None) -> None:
        if state is not None:
            self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
            self.rows = int(state["rows"])

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


class SourceBatches(torch.utils.data.Dataset):
    """A row source as a map-style dataset whose index is a batch of units: ``self[units]`` is its `MemoryBatch`."""

    def __init__(self, source: RowSource):
        self.source = source

    def __getitem__(self, units: np.ndarray) -> MemoryBatch:
        return self.source.train_batch(units)


def as_is(batch: MemoryBatch) -> MemoryBatch:
    """The DataLoader's collate function: a `MemoryBatch` is already a batch."""
    return batch


def train_batches(source: RowSource, schedule: Schedule, seed: int, first_step: int, rank: int,
                  pin_memory: bool) -> Iterator[MemoryBatch]:
    """This process's micro-batches of steps ``first_step, ...``, in order, prepared ahead by
    ``source.loader_workers`` worker processes while one trains (pinned, with ``pin_memory``, for an asynchronous
    copy to the GPU); with no workers, each is made in this process when it is needed, as before.

    The units of each micro-batch are `Schedule.units` (computed here, in order), so the batches do not depend on
    the number of workers, and a resumed run gets the batches of an uninterrupted one. The loader has its own
    generator: it draws nothing from the global RNG that dropout uses.
    """
    units = (schedule.units(seed, step, micro, rank)
             for step in range(first_step, schedule.total_steps) for micro in range(schedule.accumulation))
    workers = source.loader_workers
    context = "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None  # memory maps shared
    # Pinning pays only for batches made ahead on the host (an online batch is already on the device).
    loader = torch.utils.data.DataLoader(SourceBatches(source), sampler=units, batch_size=None, collate_fn=as_is,
                                         num_workers=workers, prefetch_factor=2 if workers else None,
                                         pin_memory=pin_memory and workers > 0, generator=torch.Generator(),
                                         multiprocessing_context=context)
    return iter(loader)


def train_step(model, optimizer, batches: Iterator[MemoryBatch], schedule: Schedule, args: MemoryTrainingArguments,
               accelerator, running: Running, step: int = 0) -> float:
    """Optimizer step ``step + 1`` over the next ``gradient_accumulation_steps`` micro-batches; returns the gradient
    norm. A NaN or infinite loss (its gradient norm is not finite) stops the run with an error before the weights
    change: a diverged memory is never saved."""
    for micro in range(schedule.accumulation):
        batch = next(batches).to(accelerator.device)
        last = micro == schedule.accumulation - 1
        with accelerator.no_sync(model) if not last else nullcontext():
            logits = model(batch.inputs)  # (n, V)
            terms = memory_loss(logits, batch.targets, batch.labels, args.alpha)
            accelerator.backward(terms.loss / schedule.accumulation)
        running.add(terms, batch.num_rows)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if not math.isfinite(float(grad_norm)):  # the same on every process (the gradients are all-reduced)
        raise UsageError(f"Training diverged: the gradient norm is {float(grad_norm)} (the loss of step {step + 1} "
                         f"is NaN or infinite), so the memory is not saved. Lower --learning_rate (now "
                         f"{args.learning_rate:g}) or check the inputs, then rerun with --overwrite_output_dir.")
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
              provenance: dict, settings: dict) -> Run:
    """Schedule, optimizer and scheduler, prepared for data parallelism; the identity of the run."""
    from transformers import get_scheduler

    schedule = Schedule(source.num_train_units, source.train_batch_size, accelerator.num_processes,
                        args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps)
    if schedule.num_units < schedule.num_processes:
        raise UsageError(f"Only {schedule.num_units} training {source.unit}s for {schedule.num_processes} processes")
    warmup = warmup_steps(args.num_warmup_steps, schedule.total_steps)
    if args.num_warmup_steps is None:
        logger.info("Warm-up: %d steps (%s of the %d training steps)", warmup,
                    "the released default" if warmup == RELEASED_WARMUP_STEPS else f"{WARMUP_FRACTION:.0%}",
                    schedule.total_steps)
    elif warmup >= schedule.total_steps:
        logger.warning("--num_warmup_steps %d >= the %d training steps: the learning rate never decays",
                       warmup, schedule.total_steps)
    identity = {"settings": settings, "provenance": provenance, "source": source.describe(),
                "memory": memory.config.to_dict(),
                "batch_size": schedule.batch_size, "num_processes": schedule.num_processes,
                "gradient_accumulation_steps": schedule.accumulation, "seed": args.seed, "total_steps": schedule.total_steps}
    identity = json.loads(json.dumps(identity, default=str))  # as it reads back from trainer_state.json
    optimizer = torch.optim.AdamW(memory.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=schedule.total_steps)
    model, optimizer = accelerator.prepare(memory, optimizer)  # the scheduler is stepped by us, once per optimizer step
    metrics_log = MetricsLog(Path(args.output_dir) / METRICS_LOG, accelerator.is_main_process)
    return Run(model, optimizer, scheduler, source, schedule, args, accelerator, metrics_log, identity, provenance)


def resume(run: Run, running: Running) -> int:
    """Load the checkpoint to resume from, if any, with the loss sums ``running`` had then; return the step to
    continue after.

    metrics.jsonl keeps only the lines up to that step (none when there is no checkpoint: the run
    starts again from step 0 and writes them again).
    """
    checkpoint = checkpoint_to_resume(run.args)
    step = 0
    if checkpoint is not None:
        saved = read_json(checkpoint / TRAINER_STATE)
        check_identity(saved["identity"], run.identity, checkpoint)
        with timed(f"Loading checkpoint {checkpoint}", logger):
            load_checkpoint(checkpoint, run.accelerator, run.model, run.optimizer, run.scheduler)
        running.restore(load_running_state(checkpoint, run.accelerator.process_index))
        step = saved["step"]
        logger.info("Resumed from %s at step %d of %d", checkpoint, step, run.schedule.total_steps)
    if run.accelerator.is_main_process:
        truncate_metrics(run.metrics_log.path, step)
    return step


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
        save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, args.output_dir, step, run.identity,
                        args.save_total_limit, running.state())


def train_memory(memory: MLPMemoryPreTrainedModel, source: RowSource, args: MemoryTrainingArguments, accelerator,
                 provenance: dict, stop_after_steps: int | None = None, settings: dict | None = None,
                 record: dict | None = None) -> dict | None:
    """Train ``memory`` on ``source``, then save it with its meta.json in --output_dir; return the final metrics.

    ``provenance`` (inputs, base model, targets) goes into meta.json and, with ``settings`` (the flags
    that change the result, `result_settings` of every argument group; default: those of ``args``) and
    the data layout, into the identity a checkpoint must match to be resumed. ``record`` goes into
    meta.json only. ``stop_after_steps`` ends the run early (after that step's checkpoint, if one is
    due), as a kill would; tests use it. Returns None then.
    """
    start = time.time()
    run = start_run(memory, source, args, accelerator, provenance,
                    settings if settings is not None else result_settings(args))
    running = Running(accelerator.device)
    step = resume(run, running)
    schedule = run.schedule
    logger.info("Training on %d %ss (%d held-out rows): %d steps/epoch x %d per step (%d per device x %d processes x %d "
                "accumulation), %d steps in all", schedule.num_units, source.unit, source.describe()["validation_rows"],
                schedule.steps_per_epoch, schedule.units_per_micro_batch * schedule.accumulation, schedule.batch_size,
                schedule.num_processes, schedule.accumulation, schedule.total_steps)
    run.model.train()
    batches = train_batches(source, schedule, args.seed, step, accelerator.process_index,
                            pin_memory=accelerator.device.type == "cuda")
    with tqdm(total=schedule.total_steps, initial=step, desc="Training the memory", unit="step",
              disable=not accelerator.is_main_process or args.disable_tqdm) as progress:
        while step < schedule.total_steps:
            grad_norm = train_step(run.model, run.optimizer, batches, schedule, args, accelerator, running, step)
            run.scheduler.step()
            step += 1
            progress.update(1)
            after_step(run, step, grad_norm, running, progress)
            if stop_after_steps is not None and stop_after_steps <= step < schedule.total_steps:
                logger.info("Stopping early after step %d (stop_after_steps)", step)
                return None
    if run.metrics_log.last_validation.get("step") != step:  # the final metrics are always those of the final weights
        run.validate(step)
    return finish(run, time.time() - start, record or {})


def finish(run: Run, seconds: float, record: dict) -> dict:
    """Save the memory directory (`save_memory`: save_pretrained, training_results.json, then meta.json last)."""
    accelerator, args, schedule = run.accelerator, run.args, run.schedule
    accelerator.wait_for_everyone()
    memory = accelerator.unwrap_model(run.model)
    results = {"train_steps": schedule.total_steps, "train_epochs": schedule.total_steps / schedule.steps_per_epoch,
               "train_seconds": round(seconds, 2),
               **{k: v for k, v in run.metrics_log.last_validation.items() if k.startswith("val_")}}
    check_finite_weights(memory, args.output_dir, "--output_dir")  # the last step may have overflowed
    if accelerator.is_main_process:
        check_free_space(args.output_dir, tensor_bytes(memory.state_dict()) + (64 << 10), f"--output_dir {args.output_dir}")
        paths = {flag: local_path_or_name(getattr(args, flag)) for flag in ("output_dir", "knn_save_path",
                                                                             "resume_from_checkpoint")}
        record = {**run.provenance, **record, "source": run.source.describe(), "training": {**asdict(args), **paths},
                  "num_processes": accelerator.num_processes}
        save_memory(args.output_dir, memory, results, record)
        logger.info("Memory saved to %s: %s", args.output_dir, results)
    accelerator.wait_for_everyone()
    return results
