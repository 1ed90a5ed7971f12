"""Train or evaluate the base causal LM, and save the kNN-LM datastore (pipeline step 2).

    python -m train_base --model_name_or_path MODEL --dataset_name DATASET --per_device_eval_batch_size 8 \
        --do_eval --eval_subset test --output_dir OUT --report_to none
    accelerate launch -m train_base --model_name_or_path MODEL --dataset_name DATASET --do_eval \
        --eval_subset train --per_device_eval_batch_size 8 --output_dir OUT \
        --dstore_dir DSTORE_DIR --save_knnlm_dstore --report_to none

``--dataset_name`` is a directory written by ``utils/preprocess_dataset.py``. ``--do_train`` fine-tunes
(or, with ``--model_type`` and ``--config_overrides``, trains from scratch) on non-overlapping blocks of
its train split with the HF `Trainer`; ``--do_eval`` reports perplexity over the scored rows of
``--eval_subset`` and, with ``--save_knnlm_dstore``, writes the datastore of those rows.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from utils.architectures import normalize_layer
from utils.arguments import DstoreArguments, ModelArguments, TrainingDataArguments, VerificationArguments
from utils.artifacts.dataset import TokenizedSplit, load_split
from utils.artifacts.datastore import DatastoreWriter
from utils.cli import UsageError, check_finite_floats, command, parse_args, setup_logging
from utils.distributed import process_state, with_cpu_flag
from utils.io import save_metrics
from utils.locking import artifact_locks
from utils.modeling import describe_model, load_model_for_dataset, model_fingerprint
from utils.scoring import batch_ids, check_finite_loss, gather_window_totals, score_batches, token_nll, window_sums
from utils.windows import ROW_BEGIN, ROW_END

logger = logging.getLogger(__name__)


class BlockDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``block_size`` tokens of a split, every position labelled (for training)."""

    def __init__(self, tokens: np.ndarray, block_size: int, max_blocks: int | None = None):
        self.tokens = tokens
        self.block_size = block_size
        self.num_blocks = len(tokens) // block_size
        if max_blocks is not None:
            self.num_blocks = min(self.num_blocks, max_blocks)
        if self.num_blocks == 0:
            raise UsageError(f"The train split has {len(tokens)} tokens, fewer than one block of {block_size}")

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(np.asarray(self.tokens[i * self.block_size : (i + 1) * self.block_size], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class ProgressLog(TrainerCallback):
    """With --disable_tqdm, each logging step also logs the step, the time spent and an estimate of the time left."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step  # global_step > 0 when resuming

    def on_log(self, args, state, control, logs=None, **kwargs):
        done = state.global_step - self.first_step
        final = logs is not None and "train_runtime" in logs  # the summary after the last step
        if not state.is_world_process_zero or done <= 0 or not state.max_steps or final:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (state.max_steps - state.global_step)
        logger.info("step %d/%d (%.0f%%): %.0f s so far, about %.0f s left", state.global_step, state.max_steps,
                    100 * state.global_step / state.max_steps, elapsed, left)


def train(model, tokenizer, split: TokenizedSplit, data_args: TrainingDataArguments,
          training_args: TrainingArguments) -> dict:
    """Fine-tune (or train from scratch) on non-overlapping blocks; save the model to --output_dir."""
    dataset = BlockDataset(split.tokens, split.meta["block_size"], data_args.max_train_samples)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[ProgressLog()] if training_args.disable_tqdm else None)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if tokenizer is not None and trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
    metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in result.metrics.items()}
    metrics["train_blocks"] = len(dataset)
    return metrics


def written_batches_nll(writer: DatastoreWriter, num_windows: int, batch_size: int, state: PartialState) -> dict[int, float]:
    """The per-window NLL sums of this process's batches that an interrupted run already wrote.

    Those batches are not run through the model again; their sums, stored with their keys, count towards
    the perplexity as if they had been. Only this process writes its own batches, so the batches done now
    are exactly the ones `score_batches` will skip.
    """
    totals: dict[int, float] = {}
    for window_ids in batch_ids(num_windows, batch_size, state.process_index, state.num_processes):
        if not writer.pending(window_ids):
            totals.update(writer.written_nll(window_ids))
    return totals


def evaluate(model, split: TokenizedSplit, batch_size: int, state: PartialState, model_args: ModelArguments,
             data_args: TrainingDataArguments, dstore_args: DstoreArguments) -> dict:
    """Perplexity over the scored rows of the first windows of a split; optionally write the datastore."""
    windows = split.windows[: data_args.max_eval_samples]
    num_rows = int(windows[-1, ROW_END] - windows[0, ROW_BEGIN])
    writer = None
    if dstore_args.save_knnlm_dstore:
        layer = normalize_layer(model, dstore_args.dstore_layer)
        writer = DatastoreWriter(
            dstore_args.dstore_dir, num_rows=num_rows, dim=model.config.hidden_size, num_windows=len(windows),
            identity={
                "model": describe_model(model_args), "torch_dtype": model_args.torch_dtype,
                "model_fingerprint": model_fingerprint(model, layer),  # which weights made the keys
                "architecture": model.config.model_type, "layer": layer,
                "tokenizer_fingerprint": split.meta["tokenizer"]["fingerprint"],
                "dataset": {"path": os.path.abspath(data_args.dataset_name), "split": split.split,
                            "tokens_sha256": split.meta["splits"][split.split]["tokens_sha256"],
                            "block_size": split.meta["block_size"], "stride": split.meta["stride"]},
            },
            state=state,
        )
    nll_totals = written_batches_nll(writer, len(windows), batch_size, state) if writer is not None else {}
    rows_per_window = windows[:, ROW_END] - windows[:, ROW_BEGIN]  # (W,)
    resumed_rows = int(gather_window_totals({w: rows_per_window[w] for w in nll_totals}, len(windows), state).sum())
    start = time.perf_counter()
    for batch in score_batches(
        model, split.tokens, windows, batch_size, state.process_index, state.num_processes,
        layer=dstore_args.dstore_layer, skip=None if writer is None else lambda ids: not writer.pending(ids),
        show_progress=state.is_main_process,
    ):
        batch_nll = window_sums(token_nll(batch.logits, batch.labels), batch, windows)
        nll_totals.update(batch_nll)
        if writer is not None:
            writer.write(batch.rows, batch.hidden.float().cpu().numpy(), batch.labels.cpu().numpy(), batch.window_ids,
                         batch_nll)
    seconds = time.perf_counter() - start
    total_nll = gather_window_totals(nll_totals, len(windows), state).sum()
    scored_rows = num_rows - resumed_rows  # run through the model by this run, all processes together
    loss = check_finite_loss(float(total_nll / num_rows), "The base model's",
                             f"its weights may be corrupt (--model_name_or_path {model_args.model_name_or_path})")
    metrics = {
        "eval_subset": split.split, "eval_loss": loss, "perplexity": float(np.exp(loss)), "eval_tokens": num_rows,
        "eval_windows": len(windows), "eval_resumed_rows": resumed_rows, "eval_seconds": round(seconds, 3),
        "eval_tokens_per_second": round(scored_rows / seconds, 2),
        "block_size": split.meta["block_size"], "stride": split.meta["stride"], "num_processes": state.num_processes,
    }
    if writer is not None:
        dstore_meta = writer.finish()
        metrics["dstore_dir"] = dstore_args.dstore_dir
        if dstore_meta is not None:
            metrics["dstore_rows_per_second"] = round(scored_rows / dstore_meta["seconds"], 2)
    return metrics


def check_training_args(training_args: TrainingArguments, dstore_args: DstoreArguments) -> None:
    """What HF's `TrainingArguments` does not check, and what this script needs of it."""
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("Nothing to do: pass --do_train and/or --do_eval")
    if dstore_args.save_knnlm_dstore and not training_args.do_eval:
        raise UsageError("--save_knnlm_dstore writes the rows seen by evaluation: add --do_eval")
    check_finite_floats(training_args)
    if training_args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {training_args.learning_rate}")


def run_stage(model_args: ModelArguments, data_args: TrainingDataArguments, dstore_args: DstoreArguments,
              training_args: TrainingArguments, state: PartialState, allow_unverified: bool = False) -> dict:
    """Train and/or evaluate (and save the datastore), holding the locks of what is written."""
    eval_split = load_split(data_args.dataset_name, data_args.eval_subset,
                            allow_unverified=allow_unverified) if training_args.do_eval else None
    train_split = load_split(data_args.dataset_name, "train",
                             allow_unverified=allow_unverified) if training_args.do_train else None
    dataset_meta = (eval_split or train_split).meta
    set_seed(training_args.seed)  # before the model exists: a from-scratch model's initial weights depend on it
    model, tokenizer = load_model_for_dataset(model_args, dataset_meta, data_args.dataset_name)

    metrics = {}
    if training_args.do_train:
        metrics.update(train(model, tokenizer, train_split, data_args, training_args))
        if state.is_main_process:
            save_metrics(training_args.output_dir, "train", metrics)
        # What is evaluated (and recorded in a datastore's meta.json) is now the saved, trained model.
        model_args = ModelArguments(model_name_or_path=os.path.abspath(training_args.output_dir),
                                    torch_dtype=model_args.torch_dtype)
    if training_args.do_eval:
        model.to(state.device)
        eval_metrics = evaluate(model, eval_split, training_args.per_device_eval_batch_size, state,
                                model_args, data_args, dstore_args)
        if state.is_main_process:
            save_metrics(training_args.output_dir, "eval", eval_metrics)
            logger.info("Perplexity on %s: %.4f over %d tokens", data_args.eval_subset, eval_metrics["perplexity"],
                        eval_metrics["eval_tokens"])
        metrics.update(eval_metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, dstore_args, training_args, checks = parse_args(
        (ModelArguments, TrainingDataArguments, DstoreArguments, TrainingArguments, VerificationArguments),
        with_cpu_flag(argv)
    )
    state = process_state()
    setup_logging(state.is_main_process)
    check_training_args(training_args, dstore_args)
    logger.info("Arguments: %s %s %s", model_args, data_args, dstore_args)
    logger.info("Running on %d process(es), device %s", state.num_processes, state.device)
    with artifact_locks([(training_args.output_dir, "--output_dir"),
                         (dstore_args.dstore_dir if dstore_args.save_knnlm_dstore else None, "--dstore_dir")], state):
        return run_stage(model_args, data_args, dstore_args, training_args, state, checks.allow_unverified)


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
