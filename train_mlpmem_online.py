"""Train an MLP memory on hidden states computed on the fly by the frozen base model (pipeline step 5, online mode).

    python -m train_mlpmem_online --model_name_or_path MODEL --dataset_name DATASET --knn_save_path KNN_TARGETS \
        --output_dir OUT --num_train_epochs 50 --num_warmup_steps 2000 --learning_rate 5e-4 --alpha 0.5
    accelerate launch --multi_gpu --num_processes N -m train_mlpmem_online ...   # data parallel (CPU: gloo)

No saved keys are needed: each step runs the base model over a batch of windows of
``--dataset_name`` (``--dataset_split_name``, default train) and trains on all their scored rows, whose
kNN targets (``--knn_save_path``) are matched by row number. The targets must describe exactly the
rows of the leading windows of that split (checked against their gold tokens). Rerunning an
interrupted command resumes from the newest checkpoint. See models/training/ and models/memory_directory.py.
"""

from __future__ import annotations

from models.training.arguments import MemoryArguments, MemoryTrainingArguments, OnlineArguments
from models.training.modes import run_online
from utils.arguments import BaseCheckArguments, PretrainedModelArguments
from utils.cli import command, parse_args, setup_logging


def main(argv: list[str] | None = None, stop_after_steps: int | None = None) -> dict | None:
    online, model_args, memory_args, training_args, checks = parse_args(
        (OnlineArguments, PretrainedModelArguments, MemoryArguments, MemoryTrainingArguments, BaseCheckArguments), argv
    )
    setup_logging()
    return run_online(online, model_args, memory_args, training_args, stop_after_steps, checks.allow_base_mismatch,
                      checks.allow_unverified)


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
