"""Process groups on one or many machines, with or without GPUs, through `accelerate`.

On a machine without CUDA, `accelerate launch --multi_gpu --num_processes N` (or `torchrun`) starts N
processes; they form a gloo group only if accelerate is told to use the CPU (`accelerate launch --cpu`
itself starts a single process). These helpers say so in one place.
"""

from __future__ import annotations

import sys

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """This process's `PartialState`; CPU-only processes join a gloo group."""
    return PartialState(cpu=not torch.cuda.is_available())


def with_cpu_flag(argv: list[str] | None) -> list[str]:
    """Command-line flags for HF `TrainingArguments`, with ``--use_cpu`` added on a machine without CUDA.

    `TrainingArguments` sets up the process group itself, and without ``--use_cpu`` it leaves CPU
    processes started by torchrun unaware of each other.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    is_config_file = len(argv) == 1 and argv[0].endswith(".json")
    if not torch.cuda.is_available() and not is_config_file and not any(a.startswith("--use_cpu") for a in argv):
        argv.append("--use_cpu")
    return argv


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
