"""What every entry point shares: argument parsing, logging set-up, and clean exits on user mistakes."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from transformers import HfArgumentParser


class UsageError(ValueError):
    """A mistake the user can fix (a flag, a file, a mismatched artifact); reported without a traceback."""


def setup_logging(main_process: bool = True) -> None:
    """One log format for all entry points; other processes only log warnings."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main_process else logging.WARNING,
        force=True,
    )


def parse_args(dataclass_types: tuple, argv: list[str] | None) -> tuple:
    """Parse command-line flags into argument dataclasses; a single ``.json`` argument is read as a config file."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def run(main: Callable[[list[str] | None], object]) -> None:
    """Call ``main`` as a script: a `UsageError` becomes a one-line message and exit status 2."""
    try:
        main(None)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
