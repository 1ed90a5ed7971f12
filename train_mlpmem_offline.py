"""Train an MLP memory on saved datastore keys (pipeline step 5, offline mode).

    python -m train_mlpmem_offline --knn_dstore_path DSTORE --knn_save_path KNN_TARGETS --output_dir OUT \
        --num_train_epochs 50 --num_warmup_steps 2000 --learning_rate 5e-4 --alpha 0.5
    accelerate launch --multi_gpu --num_processes N -m train_mlpmem_offline ...   # data parallel (CPU: gloo)

Every row of the datastore is an independent example: its key (the base model's hidden state) is the
input and its sparse kNN distribution (``--knn_save_path``, from knn_utils.saveKNNMulti, possibly
computed with a larger retriever sharing the tokenizer) the target. The base model is the one recorded
in the datastore's meta.json unless ``--model_name_or_path`` says otherwise; by default the memory gets
as many parameters as it. Rerunning an interrupted command resumes from the newest checkpoint.
See models/training/ for the loop and the checkpoints, models/memory_directory.py for the output directory.
"""

from __future__ import annotations

from models.training.arguments import MemoryArguments, MemoryTrainingArguments, OfflineArguments
from models.training.modes import run_offline
from utils.arguments import BaseCheckArguments
from utils.cli import command, parse_args, setup_logging


def main(argv: list[str] | None = None, stop_after_steps: int | None = None) -> dict | None:
    offline, memory_args, training_args, checks = parse_args(
        (OfflineArguments, MemoryArguments, MemoryTrainingArguments, BaseCheckArguments), argv)
    setup_logging()
    return run_offline(offline, memory_args, training_args, stop_after_steps, checks.allow_base_mismatch,
                       checks.allow_unverified)


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
