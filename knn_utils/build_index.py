"""Build the FAISS index over a datastore's keys (pipeline step 3).

    python -m knn_utils.build_index --dstore_path DSTORE_PATH --num_keys_to_add_at_a_time 1000000 \
        --ncentroids 4096 --code_size 64 --probe 32

The index goes to ``DSTORE_PATH/index`` unless ``--index_path`` says otherwise; its ``meta.json`` ties it
to the datastore. Rerunning the same command after an interruption resumes it. The format and the
meaning of every setting are in knn_utils/index_build.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from knn_utils.index_build import IndexSettings, build_index
from utils.arguments import VerificationArguments
from utils.cli import command, parse_args, setup_logging

logger = logging.getLogger(__name__)


@dataclass
class BuildIndexArguments:
    """Which datastore to index, where to write the index, and on which device."""

    dstore_path: str = field(metadata={"help": "Datastore directory (written by train_base --save_knnlm_dstore)."})
    index_path: str | None = field(default=None, metadata={"help": "Index directory to write (default: DSTORE_PATH/index)."})
    knn_gpu: bool = field(
        default=False, metadata={"help": "Train and add on GPU 0 when faiss-gpu sees a GPU (same result format); CPU otherwise."}
    )
    use_gpu: bool = field(default=False, metadata={"help": "Same as --knn_gpu."})


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args, settings, checks = parse_args((BuildIndexArguments, IndexSettings, VerificationArguments), argv)
    logger.info("Arguments: %s", args)
    meta = build_index(args.dstore_path, args.index_path, settings, use_gpu=args.knn_gpu or args.use_gpu,
                       allow_unverified=checks.allow_unverified)
    print(f"Wrote a {meta['index_type']} index of {meta['rows']} keys "
          f"(train {meta['seconds']['train']:.1f} s, add {meta['seconds']['add']:.1f} s)")
    return meta


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
