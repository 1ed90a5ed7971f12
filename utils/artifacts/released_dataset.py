"""The released implementation's preprocessed dataset (its utils/preprocess_dataset.py), read back into token streams.

The released preprocessing saves a ``datasets.DatasetDict`` with ``save_to_disk`` (``dataset_dict.json``
and one folder of Arrow files per split) beside a ``dstore_summary.json``. Each row is one window of
``block_size`` tokens: ``input_ids`` padded at the end with the pad (else EOS) token, ``labels`` equal to the
inputs on the positions the window scores and ``-100`` elsewhere (its context and its padding),
``attention_mask`` all ones (padding included) and ``dstore_range``. The text was tokenized with the
tokenizer's special tokens (a BOS before every line for Llama / Mistral tokenizers) and windowed per
``map`` batch of 1,000 lines: each batch's tokens were cut to a multiple of ``block_size`` (when longer) and
windowed on their own, every ``stride`` tokens, the first window of a batch scoring all its tokens.

What a window scores is therefore the tokens that follow its context, so the split's tokens come back as
the concatenation, over windows in order, of each window's inputs from its first scored position to its
last (`released_streams`). ``python -m utils.preprocess_dataset --dataset_name DIR --tokenizer_path T
--output_dir OUT`` writes them in this project's format (utils/artifacts/dataset.py), windowed again with
the released block size and stride. The same tokens, and the same windows but at the seams between
``map`` batches: here the first token of a batch is predicted from the text before it (one more row per
seam), where the released windows started afresh.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.io import ArtifactError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the released --padding_index default: the label of positions a window does not score
COLUMNS = ("input_ids", "labels")


@dataclass
class ReleasedSplit:
    """One split of a released dataset, read back."""

    tokens: np.ndarray  # int32 (n,): the split's token stream
    block_size: int
    stride: int  # the most tokens a window scores (the released --stride)
    windows: int  # rows of the released split
    segments: int  # windows that start a new stretch of text (no context): the released map batches
    released_rows: int  # scored predictions in the released windows (its dstore size for the split)


def is_released_dataset(directory: str | Path) -> bool:
    """Whether ``directory`` holds a dataset saved by the released preprocessing (and no meta.json of ours)."""
    directory = Path(directory)
    return (directory / "dataset_dict.json").is_file() and not (directory / "meta.json").exists()


def conversion_hint(directory: str | Path) -> str:
    return (f"{directory} is a dataset saved by the released preprocessing (save_to_disk), not one made by this "
            f"project: convert it once with `python -m utils.preprocess_dataset --dataset_name {directory} "
            f"--tokenizer_path TOKENIZER --output_dir {directory}-converted` (TOKENIZER: the one it was "
            "made with)")


def window_tokens(input_ids: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The context and the new (scored) tokens of each window of a batch: (first scored position, end) per row."""
    scored = labels != IGNORE_INDEX  # (B, block)
    if not scored.any(axis=1).all():
        raise ArtifactError(f"{where}: a window scores no token (labels all {IGNORE_INDEX}): not the released layout")
    first = scored.argmax(axis=1)  # (B,)
    end = input_ids.shape[1] - scored[:, ::-1].argmax(axis=1)  # (B,) one past the last scored position
    runs = scored.sum(axis=1)
    if (runs != end - first).any():
        raise ArtifactError(f"{where}: a window's scored positions are not one run at the end of its tokens: not "
                            "the released layout")
    if not ((labels == input_ids) | ~scored).all():
        raise ArtifactError(f"{where}: labels differ from the inputs on scored positions: not the released layout")
    return first, end


def read_split(split_dataset, name: str, batch_rows: int = 4096) -> ReleasedSplit:
    """The token stream of one released split (a ``datasets.Dataset``), checked window by window."""
    missing = [c for c in COLUMNS if c not in split_dataset.column_names]
    if missing:
        raise ArtifactError(f"split {name!r} has no column {missing} (it has {split_dataset.column_names}): not a "
                            "dataset of the released preprocessing")
    table = split_dataset.with_format("numpy", columns=list(COLUMNS))
    pieces, length, stride, segments, released_rows, block_size = [], 0, 0, 0, 0, None
    for start in range(0, len(table), batch_rows):
        batch = table[start:start + batch_rows]
        input_ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
        if input_ids.ndim != 2 or input_ids.shape != labels.shape:
            raise ArtifactError(f"split {name!r}, rows {start}+: windows of unequal length: not the released layout")
        block_size = block_size or input_ids.shape[1]
        first, end = window_tokens(input_ids, labels, f"split {name!r}, rows {start}+")
        for row, (f, e) in enumerate(zip(first.tolist(), end.tolist())):
            if f == 0:
                segments += 1
            elif length < f or not np.array_equal(input_ids[row, :f], tail(pieces, f)):
                raise ArtifactError(f"split {name!r}, window {start + row}: its context is not the text before it: "
                                    "not the released layout (or its rows were reordered)")
            pieces.append(input_ids[row, f:e].astype(np.int32))
            length += e - f
            stride = max(stride, e - f)
            released_rows += e - max(f, 1)  # position 0 is never predicted
    if not pieces:
        raise ArtifactError(f"split {name!r} has no windows")
    return ReleasedSplit(np.concatenate(pieces), block_size, stride, len(table), segments, released_rows)


def tail(pieces: list[np.ndarray], count: int) -> np.ndarray:
    """The last ``count`` tokens of the stream built so far from ``pieces``."""
    out, need = [], count
    for piece in reversed(pieces):
        out.append(piece[max(len(piece) - need, 0):])
        need -= len(out[-1])
        if need == 0:
            break
    return np.concatenate(out[::-1]) if out else np.zeros(0, dtype=np.int32)


def released_streams(directory: str | Path, splits: tuple[str, ...]) -> dict[str, ReleasedSplit]:
    """Each of ``splits`` that the released dataset at ``directory`` has (``valid`` read as ``validation``)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(directory))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; all mean the files are not a saved dataset
        raise ArtifactError(f"{directory}: could not read it as a saved dataset ({err})") from None
    if isinstance(saved, datasets.Dataset):
        saved = datasets.DatasetDict({"train": saved})
    names = {("validation" if name == "valid" else name): name for name in saved}
    ignored = sorted(set(names) - set(splits))
    if ignored:
        logger.warning("%s: ignoring splits %s (only %s are used)", directory, ignored, list(splits))
    out = {split: read_split(saved[names[split]], split) for split in splits if split in names}
    if not out:
        raise ArtifactError(f"{directory} has none of the splits {list(splits)} (it has {sorted(saved)})")
    summary = Path(directory) / "dstore_summary.json"
    if summary.is_file():
        recorded = json.loads(summary.read_text())
        for split, read in out.items():
            size = recorded.get(names[split], {}).get("dstore_size")
            if size is not None and size != read.released_rows:
                raise ArtifactError(f"{summary} says split {names[split]!r} scores {size} rows, its windows score "
                                    f"{read.released_rows}")
    return out
