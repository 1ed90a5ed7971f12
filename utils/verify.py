"""Check artifacts on disk against the block checksums recorded in their meta.json (utils/checksums.py).

    python -m utils.verify DIR [DIR ...]

Each DIR is an artifact directory (dataset, datastore, kNN targets, index, memory) or a directory holding
some, such as a pipeline's output directory: every artifact found below it is checked, nested ones (a
datastore's ``index/``) included. The kind of each comes from its meta.json. One line per file::

    ok            out/dstore/keys.npy (1,536,000,128 bytes)
    MISMATCH      out/dstore/vals.npy: block 0 (bytes 0-4,095, rows 0-991) does not match meta.json: ...
    not recorded  out/old_dstore/keys.npy

"not recorded": the artifact was written before block checksums were; its files cannot be verified.
Exit status 0 only when every file of every artifact was verified; 1 otherwise; 2 when a DIR is missing or
holds no artifact. Stages check the files they read in the same way when they open them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from utils.artifacts import dataset, datastore, knn_targets
from utils.checksums import check_file, model_files, progress_bar, warn_unverifiable
from utils.cli import UsageError, run, setup_logging
from utils.io import META_NAME, PARTIAL_SUFFIX, read_json

logger = logging.getLogger(__name__)


def _index_files(directory: Path, meta: dict) -> list[str]:
    from utils.artifacts.index import INDEX_FILE  # imports FAISS: only for an index without checksums

    return [INDEX_FILE]


# The files of each kind of artifact, to name those of an artifact that records no checksums.
KIND_FILES: dict[str, Callable[[Path, dict], list[str]]] = {
    "dataset": lambda directory, meta: dataset.data_files(meta),
    "datastore": lambda directory, meta: list(datastore.DATA_FILES),
    "knn_targets": lambda directory, meta: list(knn_targets.DATA_FILES),
    "index": _index_files,
    "mlp_memory": lambda directory, meta: model_files(directory),
}


def find_artifacts(root: Path) -> list[tuple[Path, dict]]:
    """Every finished artifact directory at or below ``root`` (``.partial`` staging directories are skipped)."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.endswith(PARTIAL_SUFFIX))
        if META_NAME in files:
            meta = read_json(Path(directory) / META_NAME)
            if isinstance(meta, dict) and "kind" in meta:
                found.append((Path(directory), meta))
    return found


def verify_artifact(directory: Path, meta: dict) -> str:
    """Print one line per file of the artifact; return "verified", "mismatched", "not recorded" or "skipped"."""
    kind = meta["kind"]
    if kind not in KIND_FILES:
        print(f"{'skipped':<13} {directory} (a {kind!r}: no array files to check)")
        return "skipped"
    recorded = meta.get("checksums") or {}
    if not recorded:
        warn_unverifiable(directory)
        for name in KIND_FILES[kind](directory, meta):
            print(f"{'not recorded':<13} {directory / name}")
        return "not recorded"
    start, total = time.perf_counter(), sum(record["bytes"] for record in recorded.values())
    status = "verified"
    with progress_bar(total, f"Verifying {directory}") as progress:
        for name, record in recorded.items():
            if problem := check_file(directory / name, record, progress):
                print(f"{'MISMATCH':<13} {directory / name}: {problem}", flush=True)
                status = "mismatched"
            else:
                print(f"{'ok':<13} {directory / name} ({record['bytes']:,} bytes)", flush=True)
    seconds = time.perf_counter() - start
    logger.info("Checked the %s %s: %.2f GB in %.2f s (%.2f GB/s)", kind, directory, total / 1e9, seconds,
                total / 1e9 / max(seconds, 1e-9))
    return status


def main(argv: list[str] | None = None) -> int:
    """Check every artifact at or below the directories given; return the exit status (0: all verified)."""
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m utils.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="artifact directories, or directories holding some")
    args = parser.parse_args(argv)
    artifacts = []
    for root in map(Path, args.dirs):
        if not root.is_dir():
            raise UsageError(f"{root} is not a directory")
        if not (found := find_artifacts(root)):
            raise UsageError(f"{root} holds no artifact (no {META_NAME} with a kind at or below it)")
        artifacts += found
    statuses = Counter(verify_artifact(directory, meta) for directory, meta in artifacts)
    print(", ".join(f"{statuses[s]} {s}" for s in ("verified", "mismatched", "not recorded", "skipped") if statuses[s]))
    return 0 if statuses["verified"] and not statuses["mismatched"] and not statuses["not recorded"] else 1


if __name__ == "__main__":
    run(lambda argv: sys.exit(main(argv)))
