"""A preprocessed dataset on disk (pipeline step 1's output): token streams and scoring windows per split.

Layout (``meta.json`` describes it: tokenizer and its fingerprint, block size, stride, counts, the SHA-256
of each token stream, and the block checksums of every file, utils/checksums.py)::

    <dir>/<split>/tokens.npy    int32 (n,)    the split as one token stream
    <dir>/<split>/windows.npy   int64 (W, 4)  (begin, end, row_begin, row_end) per window, see utils/windows.py

Each row (``n - 1`` per split) is one scored prediction; every later stage numbers its rows the same way.
utils/preprocess_dataset.py writes it, and converts the released preprocessing's ``save_to_disk`` layout into
it (utils/artifacts/released_dataset.py), which `load_split` does not read but names the command for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.artifacts.released_dataset import conversion_hint, is_released_dataset
from utils.checksums import checksum_file, checksum_npy, verify_files
from utils.io import META_NAME, ArtifactError, check_fields, load_array, read_meta

FORMAT_VERSION = 1
SPLIT_FILES = ("tokens.npy", "windows.npy")
META_FIELDS = ("splits", "tokenizer.fingerprint", "block_size", "stride")  # what readers take from meta.json
SPLIT_FIELDS = ("tokens", "rows", "windows", "max_token_id", "tokens_sha256")  # ... and from each split's entry


@dataclass
class TokenizedSplit:
    """One split of a preprocessed dataset, memory-mapped."""

    tokens: np.ndarray  # int32 (n,)
    windows: np.ndarray  # int64 (W, 4)
    meta: dict  # the dataset's meta.json
    split: str

    @property
    def num_rows(self) -> int:
        return max(len(self.tokens) - 1, 0)


def split_files(split: str) -> list[str]:
    """The files of one split, relative to the dataset directory (as ``meta.json``'s ``checksums`` names them)."""
    return [f"{split}/{name}" for name in SPLIT_FILES]


def data_files(meta: dict) -> list[str]:
    """Every array file of a dataset."""
    return [name for split in meta["splits"] for name in split_files(split)]


def write_split(directory: Path, split: str, tokens: np.ndarray, windows: np.ndarray) -> tuple[dict, dict]:
    """Write one split's arrays under ``directory``; return its entry of ``meta.json``'s ``splits`` and the
    block checksums of its files (for ``meta.json``'s ``checksums``)."""
    (directory / split).mkdir()
    tokens_file, windows_file = split_files(split)
    np.save(directory / tokens_file, tokens)
    np.save(directory / windows_file, windows)
    tokens_checksums, tokens_sha256 = checksum_npy(directory / tokens_file)
    entry = {"tokens": int(len(tokens)), "rows": int(len(tokens) - 1), "windows": int(len(windows)),
             "max_token_id": int(tokens.max()), "tokens_sha256": tokens_sha256}
    return entry, {tokens_file: tokens_checksums, windows_file: checksum_file(directory / windows_file)}


def identity_hashes(meta: dict) -> dict[str, str]:
    """The SHA-256 each token stream's data must have (its identity, which other artifacts record), by file name."""
    return {split_files(split)[0]: entry["tokens_sha256"] for split, entry in meta["splits"].items()
            if isinstance(entry, dict) and entry.get("tokens_sha256")}


def load_split(dataset_dir: str, split: str, verify: bool = True, allow_unverified: bool = False) -> TokenizedSplit:
    """Open one split of a preprocessed dataset (memory-mapped); with ``verify``, check its files' block
    checksums first (a dataset without them is refused unless ``allow_unverified``)."""
    if is_released_dataset(dataset_dir):
        raise ArtifactError(conversion_hint(dataset_dir))
    meta = read_meta(dataset_dir, "dataset", META_FIELDS)
    if not isinstance(meta["splits"], dict) or split not in meta["splits"]:
        raise ArtifactError(
            f"Dataset {dataset_dir} has no {split!r} split (it has {sorted(meta['splits'])})."
        )
    check_fields(meta["splits"][split], SPLIT_FIELDS, f"{Path(dataset_dir) / META_NAME} (split {split!r})")
    if verify:
        verify_files(dataset_dir, meta, split_files(split), allow_unverified)
    directory = Path(dataset_dir) / split
    counts = meta["splits"][split]
    tokens = load_array(directory / "tokens.npy", f"{counts['tokens']} int32 tokens, as meta.json says", mmap_mode="r")
    windows = load_array(directory / "windows.npy", f"int64 windows of shape ({counts['windows']}, 4), as meta.json says")
    if len(tokens) != counts["tokens"]:
        raise ArtifactError(f"{directory}/tokens.npy has {len(tokens)} tokens, meta.json says {counts['tokens']}")
    if windows.shape != (counts["windows"], 4):
        raise ArtifactError(f"{directory}/windows.npy has shape {windows.shape}, meta.json says ({counts['windows']}, 4)")
    return TokenizedSplit(tokens=tokens, windows=windows, meta=meta, split=split)
