"""Choose the memory weight ``lmbda`` for QA from `downstream.eval_qa` runs on a validation set.

    python -m downstream.eval_qa ... --memory MEMORY --lmbda 0.25 0.5 0.75 --output_dir OUT/qa_validation
    python -m downstream.choose_lmbda OUT/qa_validation/lmbda_* --output_file OUT/qa_validation/lmbda_choice.json

Each directory holds the ``qa_results.json`` of one setting with the memory (eval_qa writes one subdirectory
``lmbda_<l>`` per value, `downstream.qa_results`; separate runs with one ``--lmbda`` each do as well). The best run has the
highest exact match, then the highest token F1, then the smallest ``lmbda`` (the one closest to the base
model). Its ``lmbda`` is printed alone on stdout; the table of all runs goes to the log. ``--output_file``
records the choice, the rule and the table it was made from: the stages after it (QA on test, the
judgments, the demo) and `downstream.summary` read the choice there and never choose again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from utils.cli import UsageError, run, setup_logging
from utils.io import read_json, write_json

logger = logging.getLogger(__name__)

RESULTS_FILE = "qa_results.json"
RULE = "highest exact match, then highest F1, then the smallest lmbda"


def read_sweep(directories: list[str]) -> list[dict]:
    """The ``qa_results.json`` of each directory (runs with the memory only), sorted by ``lmbda``."""
    runs = []
    for directory in directories:
        path = os.path.join(directory, RESULTS_FILE)
        if not os.path.isfile(path):
            raise UsageError(f"{directory} has no {RESULTS_FILE}: run downstream.eval_qa there first")
        results = read_json(path)
        if not results.get("use_neural_knn"):
            raise UsageError(f"{path} is a run of the base model alone: only runs with --use_neural_knn have a lmbda")
        runs.append({**results, "directory": directory})
    if not runs:
        raise UsageError("give at least one eval_qa output directory")
    lmbdas = [r["lmbda"] for r in runs]
    if len(set(lmbdas)) != len(lmbdas):
        raise UsageError(f"two runs share a lmbda ({sorted(lmbdas)}): give one directory per value")
    return sorted(runs, key=lambda r: r["lmbda"])


def best_run(runs: list[dict]) -> dict:
    """The run with the highest exact match, then F1, then the smallest lmbda."""
    return max(runs, key=lambda r: (r["exact_match"], r["f1"], -r["lmbda"]))


def choice_record(runs: list[dict]) -> dict:
    """The chosen lmbda, the rule and the table it was chosen from (what ``--output_file`` holds)."""
    best = best_run(runs)
    return {"lmbda": best["lmbda"], "chosen_on": "validation questions (exact match)", "rule": RULE,
            "questions": best["count"],
            "table": [{"lmbda": r["lmbda"], "exact_match": r["exact_match"], "f1": r["f1"], "count": r["count"],
                       "directory": r["directory"]} for r in runs]}


def read_choice(path: str | os.PathLike) -> dict:
    """A choice recorded by ``--output_file``; a `UsageError` saying how to make it when it is missing."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} is missing: the QA lmbda is chosen once, on the validation questions, and recorded "
                         "there (python -m downstream.choose_lmbda QA_VALIDATION_DIRS... --output_file " f"{path})")
    return read_json(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m downstream.choose_lmbda", description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", help="eval_qa output directories, one per lmbda.")
    parser.add_argument("--output_file", help="Record the choice and the table it was made from in this JSON file.")
    return parser


def main(argv: list[str] | None = None) -> float:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    runs = read_sweep(args.directories)
    best = best_run(runs)
    for r in runs:
        logger.info("lmbda %g: EM %.2f F1 %.2f over %d questions%s", r["lmbda"], r["exact_match"], r["f1"], r["count"],
                    "  <- chosen" if r is best else "")
    if args.output_file:
        write_json(args.output_file, choice_record(runs))
    print(f"{best['lmbda']:g}")
    return best["lmbda"]


if __name__ == "__main__":
    setup_logging()
    run(main)
