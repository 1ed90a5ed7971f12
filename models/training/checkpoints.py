"""How the units are cut into optimizer steps (`Schedule`, `epoch_permutation`), the checkpoints that
resume a run exactly (saved under a temporary name, found, checked against the run's identity), and the
output directory's preparation (refusing a finished memory, truncating metrics.jsonl on resume)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.memory_directory import CHECKPOINT_DIR, CHECKPOINT_PREFIX, META, TRAINER_STATE
from models.training.arguments import MemoryTrainingArguments
from utils.cli import UsageError
from utils.io import ArtifactError, timed, write_json

logger = logging.getLogger(__name__)


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
        elif (out / META).is_file():
            raise ArtifactError(f"--output_dir {out} already holds a trained memory; pass --overwrite_output_dir "
                                "or choose another directory")
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by a run that was interrupted (they will be written again)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
