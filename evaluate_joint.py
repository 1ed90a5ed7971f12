"""Evaluate the joint model: a frozen base LM interpolated with a trained MLP memory (SPEC step 6).

    python -m evaluate_joint --do_test --model_name_or_path MODEL --dataset_name DATASET \\
        --dataset_split_name test --per_device_eval_batch_size 8 --output_dir OUT --knn_temp 1 --lmbda 0.25 \\
        --knn_generator_path MLP_MEMORY_DIR --report_to none      # the released flags (--memory_temp, --memory)
    python -m evaluate_joint --model_name_or_path JOINT_DIR --dataset_name DATASET --output_dir OUT   # a joint model
    python -m evaluate_joint ... --lmbda 0.25 0.5 0.75     # a sweep, scored in the same pass
    accelerate launch --multi_gpu --num_processes 2 -m evaluate_joint ...   # same numbers, any process count

Writes ``OUT/joint_results.json`` (base, memory-alone and joint perplexity for every lmbda, tokens/s of
the base alone and of base + memory, the torch thread count beside them, and where ``lmbda`` and
``memory_temp`` came from); with several ``--lmbda`` also ``OUT/lmbda_sweep.md`` and ``OUT/lmbda_sweep.png``
(with one, those of an earlier sweep are removed). The memory and its settings are
`models.joint.settings.MemoryArguments`, loaded by `models.joint.loading.load_joint`; the library is
`models.joint.perplexity`.
"""

from __future__ import annotations

import logging

from models.joint.perplexity import JointArguments, evaluate_joint, resolve_split, save_sweep
from models.joint.settings import MemoryArguments
from utils.arguments import DataArguments, PretrainedModelArguments
from utils.cli import command, parse_args, setup_logging
from utils.distributed import process_state
from utils.io import save_metrics
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    state = process_state()
    setup_logging(state.is_main_process)
    model_args, data_args, args, memory_args = parse_args(
        (PretrainedModelArguments, DataArguments, JointArguments, MemoryArguments), argv)
    data_args.eval_subset = resolve_split(data_args, args)  # --dataset_split_name / --do_test win: log what runs
    logger.info("Arguments: %s %s %s %s", model_args, data_args, args, memory_args)
    with artifact_lock(args.output_dir, "--output_dir", state):
        metrics = evaluate_joint(model_args, data_args, args, memory_args, state)
        if state.is_main_process:
            save_metrics(args.output_dir, "joint", metrics)
            save_sweep(args.output_dir, metrics)
    if state.is_main_process:
        logger.info("Perplexity on %s over %d tokens: base %.4f, memory alone %.4f", metrics["eval_subset"],
                    metrics["eval_tokens"], metrics["base_perplexity"], metrics["memory_perplexity"])
        for entry in metrics["lmbda_sweep"]:
            logger.info("  joint, lmbda %g: %.4f", entry["lmbda"], entry["perplexity"])
        logger.info("Tokens/s: base alone %.1f, base + memory %.1f (%d torch threads)",
                    metrics["base_tokens_per_second"], metrics["joint_tokens_per_second"], metrics["threads"])
    return metrics


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
