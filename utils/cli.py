"""What every entry point shares: argument parsing, logging set-up, and clean exits on user mistakes."""

from __future__ import annotations

import difflib
import logging
import math
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
    # FAISS logs, at INFO, a ModuleNotFoundError for every CPU variant it probes before the one it loads.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def parse_args(dataclass_types: tuple, argv: list[str] | None) -> tuple:
    """Parse command-line flags into argument dataclasses; a single ``.json`` argument is read as a config file."""
    parser = HfArgumentParser(dataclass_types)

    def one_line_error(message: str):  # argparse would print the whole usage (pages of it with TrainingArguments)
        raise UsageError(f"{message}; see --help")

    parser.error = one_line_error
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    unknown = unknown_arguments(parser, argv)
    if unknown:
        raise UsageError(unknown_arguments_message(unknown, parser))
    return parser.parse_args_into_dataclasses(args=argv)


def flags_given(argv: list[str] | None) -> set[str]:
    """The names of the flags that ``argv`` sets (``--lmbda 0.5`` and ``--lmbda=0.5`` give ``lmbda``; a single
    ``.json`` argument gives its keys), so that a preset's value can yield to a flag the user typed."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        import json

        with open(argv[0], encoding="utf-8") as f:
            return set(json.load(f))
    return {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}


def unknown_arguments(parser, argv: list[str]) -> list[str]:
    """The arguments ``parser`` does not know, found before it checks required flags and values (a misspelled
    flag is the likelier cause of a "required" error, so it is reported first)."""
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        return parser.parse_known_args(args=argv)[1]
    finally:
        for action in required:
            action.required = True


def closest_flags(flag: str, known: list[str]) -> list[str]:
    """The known flags a mistyped ``flag`` most likely meant: those ending in it (``--batch_size`` ->
    ``--per_device_eval_batch_size`` ...), else the closest spelling (``--lambda`` -> ``--lmbda``)."""
    name = flag.split("=", 1)[0].lstrip("-")
    endings = sorted(k for k in known if k.endswith("_" + name))
    if endings:
        return endings[:4]
    return difflib.get_close_matches("--" + name, known, n=1, cutoff=0.6)


def unknown_arguments_message(unknown: list[str], parser) -> str:
    """One line naming each argument the parser does not know, with the closest valid flags where there are some."""
    known = sorted(option for action in parser._actions for option in action.option_strings
                   if option.startswith("--") and "-" not in option[2:])  # not the dashed aliases HF adds
    flags = [arg for arg in unknown if arg.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {' '.join(unknown)} (every value must follow its --flag); see --help"
    parts = []
    for flag in flags:
        suggestions = closest_flags(flag, known)
        hint = f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""
        parts.append(f"unknown flag {flag.split('=', 1)[0]}{hint}")
    return "; ".join(parts) + "; see --help for the valid flags"


def check_finite_floats(args) -> None:
    """Every float flag of ``args`` (an argument dataclass, or an argparse namespace) must be a finite number.

    NaN compares False with everything, so a range check such as ``if self.knn_temp <= 0`` lets ``--knn_temp nan``
    through; every ``__post_init__`` of a dataclass with float fields calls this first. Lists of floats
    (``--lmbda 0.25 0.5``) are checked value by value.
    """
    for name, value in vars(args).items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise UsageError(f"--{name} must be a finite number, got {item}")


def run(main: Callable[[list[str] | None], object]) -> None:
    """Call ``main`` as a script: a `UsageError` becomes a one-line message and exit status 2."""
    try:
        main(None)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def command(main: Callable[[list[str] | None], object]) -> Callable[[], None]:
    """``main`` as a console script (pyproject.toml's [project.scripts]): flags from ``sys.argv``, clean errors."""
    return lambda: run(main)
