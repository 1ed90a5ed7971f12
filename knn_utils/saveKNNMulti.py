"""Compute the sparse kNN targets of every datastore row (pipeline step 4); released name of save_knn_targets.

    accelerate launch -m knn_utils.saveKNNMulti --model_path MODEL --dstore_path DSTORE_PATH \
        --val_path VAL_PATH --index_path INDEX_PATH --output_path OUT --k 1024 --knn_temp 16 --probe 32 \
        --batch_size 16000 --ignore_first True --knn_gpu

Runs on CPU (FAISS threads share the cores between processes) or, with ``--knn_gpu``, on GPU: through
faiss-gpu, or, with faiss-cpu and an exact (flat) index, through an exact torch search. On a machine
without CUDA, ``accelerate launch --multi_gpu --num_processes N`` starts N CPU processes (gloo);
``accelerate launch --cpu`` starts only one. Each process searches a contiguous range of row chunks;
rerunning an interrupted command resumes it. The output format is described in
knn_utils/knn_targets.py; ``load_knn_targets(OUT)`` reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from knn_utils.index_search import KNN_GPU_HELP
from knn_utils.knn_targets import TargetSettings, compute_knn_targets
from utils.arguments import VerificationArguments
from utils.cli import UsageError, command, parse_args, setup_logging
from utils.distributed import process_state
from utils.io import read_meta

logger = logging.getLogger(__name__)


@dataclass
class SaveKnnArguments:
    """Inputs and output of the target search."""

    dstore_path: str = field(metadata={"help": "Datastore directory whose keys are searched (and, without --val_path, used as queries)."})
    output_path: str = field(metadata={"help": "Directory to write the targets to."})
    index_path: str | None = field(default=None, metadata={"help": "Index directory (default: DSTORE_PATH/index)."})
    val_path: str | None = field(
        default=None,
        metadata={"help": "A second datastore (e.g. validation) whose keys are the queries instead; no row is left out then."},
    )
    model_path: str | None = field(
        default=None,
        metadata={"help": "Optional. Only used to check that this model's tokenizer is the datastore's; the search needs no model."},
    )
    knn_gpu: bool = field(default=False, metadata={"help": KNN_GPU_HELP})


def check_model_tokenizer(model_path: str, dstore_path: str) -> None:
    """Fail if ``model_path``'s tokenizer is not the one the datastore's values are ids of."""
    from utils.modeling import load_tokenizer, tokenizer_fingerprint

    expected = read_meta(dstore_path, "datastore").get("tokenizer_fingerprint")
    found = tokenizer_fingerprint(load_tokenizer(model_path))
    if expected != found:
        raise UsageError(f"--model_path {model_path} has tokenizer fingerprint {found}, but the datastore "
                         f"{dstore_path} was made with {expected}")


def main(argv: list[str] | None = None) -> dict | None:
    state = process_state()
    setup_logging(state.is_main_process)
    args, settings, checks = parse_args((SaveKnnArguments, TargetSettings, VerificationArguments), argv)
    logger.info("Arguments: %s", args)
    if args.model_path is not None:
        check_model_tokenizer(args.model_path, args.dstore_path)
    return compute_knn_targets(args.dstore_path, args.output_path, args.index_path, args.val_path, settings,
                               use_gpu=args.knn_gpu, state=state, allow_unverified=checks.allow_unverified)


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
