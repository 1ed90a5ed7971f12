"""How the units are cut into optimizer steps (`Schedule`, `epoch_permutation`), the checkpoints that
resume a run exactly (saved under a temporary name, found, checked against the run's identity), and the
output directory's preparation (refusing a finished memory, truncating metrics.jsonl on resume).

A checkpoint is written by this module, never by pickle (``accelerator.save_state`` pickles the
optimizer, scheduler and RNG states, and loading those runs whatever a planted file says): tensors go
to safetensors, everything else to JSON, and reading one uses only safetensors and json. A checkpoint
directory holding a pickle-format file is refused before anything in it is read (`check_no_pickle`)::

    model.safetensors                  the memory's weights (the unwrapped model: no DDP prefix)
    optimizer.safetensors              the optimizer's per-parameter tensors, "<param id>.<name>"
    optimizer.json                     its param groups and any per-parameter value that is not a tensor
    scheduler.json                     the learning-rate scheduler's state_dict
    rng_state_<rank>.safetensors       each process's torch CPU and CUDA generator states
    rng_state_<rank>.json              each process's numpy and python generator states
    running_<rank>.json                each process's loss sums since the last log line (so that the first line a
                                       resumed run logs is the one an uninterrupted run logs)
    trainer_state.json                 the step and the run's identity (written last, then the rename)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.memory_directory import CHECKPOINT_DIR, CHECKPOINT_PREFIX, META, TRAINER_STATE
from models.training.arguments import MemoryTrainingArguments
from utils.cli import UsageError
from utils.io import ArtifactError, check_free_space, read_json, timed, write_json

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


MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
RNG_TENSORS = "rng_state_{rank}.safetensors"
RNG_STATE = "rng_state_{rank}.json"
RUNNING_STATE = "running_{rank}.json"


def save_checkpoint(accelerator, model, optimizer, scheduler, output_dir: str, step: int, identity: dict,
                    limit: int, running: dict | None = None) -> None:
    """Save model, optimizer, scheduler, RNG states and this process's ``running`` loss sums (`Running.state`) under a
    temporary name; rename when complete. The free space is checked first (the tensors' bytes: the previous
    checkpoint is deleted only after this one is complete)."""
    final = Path(output_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = final.with_name(final.name + ".partial")
    with timed(f"Saving checkpoint {final.name}", logger):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            state, optimizer_state = accelerator.unwrap_model(model).state_dict(), optimizer.state_dict()
            check_free_space(staging.parent, tensor_bytes(state) + tensor_bytes(optimizer_state["state"]) + (64 << 10),
                             f"--output_dir {output_dir}: checkpoint {final.name}")
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # model and optimizer states are the same on every process
            save_file(cpu_tensors(state), staging / MODEL_FILE)
            save_optimizer(optimizer_state, staging)
            write_json(staging / SCHEDULER_STATE, scheduler.state_dict())
        save_rng_state(staging, accelerator.process_index)
        if running is not None:
            write_json(staging / RUNNING_STATE.format(rank=accelerator.process_index), running)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(staging / TRAINER_STATE, {"step": step, "identity": identity})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for old in checkpoint_dirs(output_dir)[:-limit]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()


def load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler) -> None:
    """Restore what `save_checkpoint` wrote, with safetensors and json only (after `check_no_pickle`)."""
    check_no_pickle(checkpoint)
    accelerator.unwrap_model(model).load_state_dict(load_file(checkpoint / MODEL_FILE))
    optimizer.load_state_dict(load_optimizer(checkpoint, optimizer.state_dict()))
    scheduler.load_state_dict(read_json(checkpoint / SCHEDULER_STATE))
    load_rng_state(checkpoint, accelerator.process_index)


def tensor_bytes(state) -> int:
    """The bytes of every tensor in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    return 0


def load_running_state(checkpoint: Path, rank: int) -> dict | None:
    """This process's loss sums saved with ``checkpoint`` (None: a checkpoint written before they were saved)."""
    path = checkpoint / RUNNING_STATE.format(rank=rank)
    return read_json(path) if path.is_file() else None


def cpu_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def save_optimizer(state: dict, directory: Path) -> None:
    """An optimizer ``state_dict``: its tensors to safetensors, the rest (param groups, other values) to JSON."""
    tensors, values = {}, {}
    for param_id, entries in state["state"].items():
        values[str(param_id)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                values[str(param_id)][name] = value
    save_file(tensors, directory / OPTIMIZER_TENSORS)
    write_json(directory / OPTIMIZER_STATE, {"param_groups": state["param_groups"], "values": values})


def load_optimizer(directory: Path, current: dict) -> dict:
    """The ``state_dict`` `save_optimizer` wrote; ``current`` (the optimizer's own) gives JSON lists back their tuples."""
    saved = read_json(directory / OPTIMIZER_STATE)
    state = {int(param_id): dict(entries) for param_id, entries in saved["values"].items()}
    for key, tensor in load_file(directory / OPTIMIZER_TENSORS).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    groups = [{key: tuple(value) if isinstance(ours.get(key), tuple) else value for key, value in group.items()}
              for group, ours in zip(saved["param_groups"], current["param_groups"])]
    return {"state": state, "param_groups": groups}


def save_rng_state(directory: Path, rank: int) -> None:
    """This process's random generators: torch (CPU and every CUDA device) as tensors, numpy and python as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, directory / RNG_TENSORS.format(rank=rank))
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    write_json(directory / RNG_STATE.format(rank=rank), {
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(internal), gauss_next]})


def load_rng_state(directory: Path, rank: int) -> None:
    tensors = load_file(directory / RNG_TENSORS.format(rank=rank))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    states = read_json(directory / RNG_STATE.format(rank=rank))
    name, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
PICKLE_PROTOCOL = 0x80  # the first byte of a pickle of protocol 2 or later


def check_no_pickle(checkpoint: Path) -> None:
    """Refuse a checkpoint directory holding a file in pickle format (by name, or by its first byte).

    A ``.safetensors`` file is read only by safetensors, which never unpickles; its first byte is part
    of a length and may be 0x80, so it is checked for the safetensors header instead.
    """
    found = []
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            head = f.read(9)
        if path.suffix == ".safetensors":
            looks_like_pickle = len(head) < 9 or head[8:9] != b"{"
        else:
            looks_like_pickle = path.suffix in PICKLE_SUFFIXES or head[:1] == bytes([PICKLE_PROTOCOL])
        if looks_like_pickle:
            found.append(path.name)
    if found:
        raise ArtifactError(f"Checkpoint {checkpoint} holds files in pickle format ({', '.join(found)}), which are never "
                            "loaded: loading a pickle runs code. A checkpoint written by this project holds only "
                            ".safetensors and .json files (an older version wrote pickles). Pass --overwrite_output_dir "
                            "to start afresh, or another --output_dir.")


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
    """A checkpoint resumes only the same run: the same settings (`result_settings`: every flag that changes the
    trained memory, the number of steps included), inputs, base model, memory and data layout.

    Nothing that changes the result may change mid-run, not even the step count: the learning-rate
    schedule depends on it, so a run extended from a checkpoint would match neither an uninterrupted
    run of the old length nor one of the new, while meta.json records the new settings.
    """
    differences = [f"--{name} {saved.get('settings', {}).get(name)!r} in the checkpoint, {ours!r} now"
                   for name, ours in current["settings"].items() if saved.get("settings", {}).get(name) != ours]
    differences += differing_entries({k: v for k, v in saved.items() if k != "settings"},
                                     {k: v for k, v in current.items() if k != "settings"})
    if differences:
        raise UsageError(f"Cannot resume from {checkpoint}: it belongs to another run, started with other settings or "
                         f"inputs ({'; '.join(differences)}). Rerun with the checkpoint's settings to resume it, or "
                         "start afresh: pass --overwrite_output_dir (deletes the run) or choose another --output_dir.")


def differing_entries(saved, current, path: str = "") -> list[str]:
    """``"a.b: X in the checkpoint, Y now"`` for every leaf where two nested dicts differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in differing_entries(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))]
    return [] if saved == current else [f"{path}: {saved!r} in the checkpoint, {current!r} now"]


def prepare_output_dir(args: MemoryTrainingArguments, accelerator) -> None:
    """Refuse to overwrite a finished memory; wipe the directory with --overwrite_output_dir."""
    out = Path(args.output_dir).resolve()  # through a link: the directory it names is emptied, the link stays
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
