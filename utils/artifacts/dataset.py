"""A preprocessed dataset on disk (pipeline step 1's output): token streams and scoring windows per split.

Layout (``meta.json`` describes it: tokenizer and its fingerprint, block size, stride, counts, checksums)::

    <dir>/<split>/tokens.npy    int32 (n,)    the split as one token stream
    <dir>/<split>/windows.npy   int64 (W, 4)  (begin, end, row_begin, row_end) per window, see utils/windows.py

Each row (``n - 1`` per split) is one scored prediction; every later stage numbers its rows the same way.
utils/preprocess_dataset.py writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.io import ArtifactError, array_sha256, load_array, read_meta

FORMAT_VERSION = 1


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


def write_split(directory: Path, split: str, tokens: np.ndarray, windows: np.ndarray) -> dict:
    """Write one split's arrays under ``directory``; return its entry of ``meta.json``'s ``splits``."""
    (directory / split).mkdir()
    np.save(directory / split / "tokens.npy", tokens)
    np.save(directory / split / "windows.npy", windows)
    return {"tokens": int(len(tokens)), "rows": int(len(tokens) - 1), "windows": int(len(windows)),
            "max_token_id": int(tokens.max()), "tokens_sha256": array_sha256(tokens)}


def load_split(dataset_dir: str, split: str) -> TokenizedSplit:
    """Open one split of a preprocessed dataset (memory-mapped)."""
    meta = read_meta(dataset_dir, "dataset")
    if split not in meta["splits"]:
        raise ArtifactError(
            f"Dataset {dataset_dir} has no {split!r} split (it has {sorted(meta['splits'])})."
        )
    directory = Path(dataset_dir) / split
    counts = meta["splits"][split]
    tokens = load_array(directory / "tokens.npy", f"{counts['tokens']} int32 tokens, as meta.json says", mmap_mode="r")
    windows = load_array(directory / "windows.npy", f"int64 windows of shape ({counts['windows']}, 4), as meta.json says")
    if len(tokens) != counts["tokens"]:
        raise ArtifactError(f"{directory}/tokens.npy has {len(tokens)} tokens, meta.json says {counts['tokens']}")
    if windows.shape != (counts["windows"], 4):
        raise ArtifactError(f"{directory}/windows.npy has shape {windows.shape}, meta.json says ({counts['windows']}, 4)")
    return TokenizedSplit(tokens=tokens, windows=windows, meta=meta, split=split)
