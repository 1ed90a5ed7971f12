"""Download one hub repository into a local directory, atomically (the recipes' download stage).

    python -m scripts.download --repo_id Rubin-Wei/MLPMemory-gpt2-large --local_dir checkpoints/MLPMemory-gpt2-large

The files go to ``<local_dir>.partial`` (``huggingface_hub.snapshot_download``, which resumes an interrupted
download there) and the directory is renamed to ``local_dir`` when every file is in, so a directory
without the suffix is always complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from utils.cli import UsageError, run, setup_logging
from utils.io import output_directory, partial_path
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo_id", required=True, help="Hub repository, owner/name.")
    parser.add_argument("--local_dir", required=True, help="Directory to write (renamed into place when complete).")
    parser.add_argument("--revision", default=None, help="Branch, tag or commit (default: the main branch).")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.exists(args.local_dir):
        raise UsageError(f"--local_dir {args.local_dir} already exists; remove it to download again")
    from huggingface_hub import snapshot_download

    local_dir = output_directory(args.local_dir)  # through a dangling link: the directory it names
    staging = partial_path(local_dir)
    with artifact_lock(local_dir, "--local_dir"):
        logger.info("Downloading %s into %s", args.repo_id, staging)
        try:
            snapshot_download(args.repo_id, revision=args.revision, local_dir=staging)
        except Exception as err:  # no network, unknown repository: say which flag
            raise UsageError(f"--repo_id {args.repo_id}: could not download it: {err}") from err
        os.replace(staging, local_dir)
    logger.info("Downloaded %s to %s", args.repo_id, args.local_dir)
    return args.local_dir


if __name__ == "__main__":
    setup_logging()
    run(main)
