"""Check artifacts on disk against the block checksums recorded in their meta.json (utils/checksums.py).

    python -m utils.verify DIR [DIR ...]

Each DIR is an artifact directory (dataset, datastore, kNN targets, index, memory, joint model) or a directory
holding some, such as a pipeline's output directory: every artifact found below it is checked, nested ones (a
datastore's ``index/``) included. The kind of each comes from its meta.json; a memory or joint model directory
without one (its config.json says what it is) is listed as "not recorded". One line per file::

    ok            out/dstore/keys.npy (1,536,000,128 bytes)
    MISMATCH      out/dstore/vals.npy: block 0 (bytes 0-4,095, rows 0-991) does not match meta.json: ...
    not recorded  out/old_dstore/keys.npy

Beside the blocks, the identity a datastore or dataset records for its arrays (``keys_sha256``, ``vals_sha256``,
each split's ``tokens_sha256``: what indexes, targets and memories refer to) is recomputed in the same read and
compared, and a record that does not cover its whole file (an edited ``"blocks": []``) is a MISMATCH.

"not recorded": the artifact records no block checksums for the file (written before they were, or the record
was removed); it cannot be verified. Exit status 0 only when every file of every artifact was verified; 1
otherwise; 2 when a DIR is missing or holds no artifact. Stages check the files they read in the same way when
they open them (and refuse unrecorded ones unless given --allow_unverified).
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
from utils.io import META_NAME, PARTIAL_SUFFIX, ArtifactError, read_json, read_meta_file

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
    "mlp_memory_joint": lambda directory, meta: model_files(directory),
}
# The SHA-256 each kind records as the identity of its arrays' data, by file name (checked beside the blocks).
KIND_IDENTITIES: dict[str, Callable[[dict], dict[str, str]]] = {
    "dataset": dataset.identity_hashes,
    "datastore": datastore.identity_hashes,
}
MODEL_TYPES = {"mlp_memory": "mlp_memory", "mlp_memory_joint": "mlp_memory_joint"}  # config.json model_type -> kind


def model_kind(directory: Path, files: list[str]) -> str | None:
    """The kind of a memory or joint model directory without meta.json, from its config.json (None: neither)."""
    if "config.json" not in files:
        return None
    try:
        model_type = read_json(directory / "config.json").get("model_type", "")
    except (ValueError, OSError, AttributeError):
        return None
    return next((kind for prefix, kind in sorted(MODEL_TYPES.items(), reverse=True) if model_type.startswith(prefix)),
                None)


def find_artifacts(root: Path) -> list[tuple[Path, dict]]:
    """Every finished artifact directory at or below ``root`` (``.partial`` staging directories are skipped): its
    meta.json, ``{"kind": ...}`` for a memory or joint model directory that has none, or ``{"unreadable": why}``."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.endswith(PARTIAL_SUFFIX))
        directory = Path(directory)
        if META_NAME in files:
            try:
                meta = read_meta_file(directory / META_NAME, "the JSON description of an artifact")
            except ArtifactError as err:
                found.append((directory, {"unreadable": str(err)}))
                continue
            if "kind" in meta:
                found.append((directory, meta))
        elif kind := model_kind(directory, files):
            found.append((directory, {"kind": kind, "no_meta": True}))
    return found


def identities(kind: str, meta: dict) -> dict[str, str] | str:
    """The identity SHA-256 of each file the artifact records one for, or what is wrong with the record."""
    if kind not in KIND_IDENTITIES:
        return {}
    try:
        return KIND_IDENTITIES[kind](meta)
    except (KeyError, TypeError, AttributeError) as err:
        return f"{META_NAME} lacks the identity of its arrays ({err}): it was edited or is corrupt"


def verify_artifact(directory: Path, meta: dict) -> str:
    """Print one line per file of the artifact; return "verified", "mismatched", "not recorded" or "skipped"."""
    if "unreadable" in meta:
        print(f"{'MISMATCH':<13} {directory / META_NAME}: {meta['unreadable']}")
        return "mismatched"
    kind = meta["kind"]
    if kind not in KIND_FILES:
        print(f"{'skipped':<13} {directory} (a {kind!r}: no array files to check)")
        return "skipped"
    recorded = meta.get("checksums") or {}
    expected = identities(kind, meta)
    if isinstance(expected, str) or not isinstance(recorded, dict):
        print(f"{'MISMATCH':<13} {directory / META_NAME}: "
              f"{expected if isinstance(expected, str) else 'its checksums are not a JSON object'}")
        return "mismatched"
    try:
        unrecorded = [name for name in KIND_FILES[kind](directory, meta) if name not in recorded]
    except (KeyError, TypeError, AttributeError) as err:
        print(f"{'MISMATCH':<13} {directory / META_NAME}: lacks the list of its files ({err}): edited or corrupt")
        return "mismatched"
    if unrecorded:
        warn_unverifiable(directory)
        for name in unrecorded:
            print(f"{'not recorded':<13} {directory / name}" + (f" (no {META_NAME})" if meta.get("no_meta") else ""))
    start = time.perf_counter()
    total = sum(record.get("bytes", 0) for record in recorded.values() if isinstance(record, dict))
    status = "not recorded" if unrecorded else "verified"
    with progress_bar(total, f"Verifying {directory}") as progress:
        for name, record in recorded.items():
            if problem := check_file(directory / name, record, progress, expected.get(name)):
                print(f"{'MISMATCH':<13} {directory / name}: {problem}", flush=True)
                status = "mismatched"
            else:
                print(f"{'ok':<13} {directory / name} ({record['bytes']:,} bytes"
                      f"{', identity SHA-256 checked' if name in expected else ''})", flush=True)
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
