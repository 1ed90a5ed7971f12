"""A dataset saved by the released preprocessing (save_to_disk): refused by name with the command that converts
it, and converted by utils.preprocess_dataset into the same token streams, windowed again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.io import ArtifactError
from utils.preprocess_dataset import main as preprocess
from utils.windows import make_windows

IGNORE, PAD, BLOCK, STRIDE = -100, 0, 32, 16


def released_batch(tokens: list[int]) -> tuple[list[dict], list[int]]:
    """The released grouping of one map batch of tokenized lines: the tokens cut to whole blocks (when longer than
    one), a window every STRIDE tokens holding up to BLOCK - STRIDE tokens of context, its new tokens labelled,
    padded to BLOCK; and the tokens it keeps."""
    total = len(tokens) // BLOCK * BLOCK if len(tokens) >= BLOCK else len(tokens)
    rows = []
    for i in range(0, total, STRIDE):
        begin, end = max(i + STRIDE - BLOCK, 0), min(i + STRIDE, total)
        ids = tokens[begin:end]
        labels = [IGNORE] * (i - begin) + ids[i - begin:]
        padding = BLOCK - len(ids)
        rows.append({"input_ids": ids + [PAD] * padding, "labels": labels + [IGNORE] * padding,
                     "attention_mask": [1] * BLOCK})
    return rows, tokens[:total]


def save_released(directory, splits: dict[str, list[list[int]]]) -> np.ndarray:
    """A released-layout DatasetDict (and dstore_summary.json) of the map batches of each split; returns the train
    split's expected token stream."""
    import datasets

    saved, summary, streams = {}, {}, {}
    for split, batches in splits.items():
        rows, kept = [], []
        for batch in batches:
            batch_rows, batch_kept = released_batch(batch)
            rows += batch_rows
            kept += batch_kept
        counts = [sum(label != IGNORE for label in row["labels"][1:]) for row in rows]
        starts = np.cumsum([0] + counts)
        for row, begin, end in zip(rows, starts[:-1], starts[1:]):
            row["dstore_range"] = [int(begin), int(end)]
        saved[split] = datasets.Dataset.from_list(rows)
        summary[split] = {"dstore_size": int(starts[-1]), "dataset_cnt_len": len(rows)}
        streams[split] = np.asarray(kept, dtype=np.int32)
    datasets.DatasetDict(saved).save_to_disk(str(directory))
    (directory / "dstore_summary.json").write_text(json.dumps(summary))
    return streams


@pytest.fixture()
def released(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    rng = np.random.default_rng(0)
    batches = {"train": [rng.integers(1, vocab, n).tolist() for n in (150, 97, 20)],  # cut to 128, 96, 20 tokens
               "validation": [rng.integers(1, vocab, 70).tolist()]}
    directory = tmp_path / "released"
    return directory, save_released(directory, batches)


def test_the_released_layout_is_refused_by_name(released):
    directory, _ = released
    with pytest.raises(ArtifactError, match="saved by the released preprocessing .*python -m utils.preprocess_dataset "
                                            f"--dataset_name {directory} --tokenizer_path TOKENIZER"):
        load_split(str(directory), "train")


def test_conversion_keeps_the_tokens_and_windows_them_again(released, tmp_path, tiny_tokenizer_dir):
    directory, streams = released
    out = tmp_path / "converted"
    meta = preprocess(["--dataset_name", str(directory), "--tokenizer_path", str(tiny_tokenizer_dir),
                       "--output_dir", str(out)])
    assert (meta["block_size"], meta["stride"]) == (BLOCK, STRIDE)  # the released geometry, read from the windows
    for split, expected in streams.items():
        read = load_split(str(out), split)
        np.testing.assert_array_equal(read.tokens, expected)
        np.testing.assert_array_equal(read.windows, make_windows(len(expected), BLOCK, STRIDE))
    assert len(streams["train"]) == 128 + 96 + 20
    # the released windows score 127 + 95 + 19 rows: not the first token of each map batch, which the seams drop
    assert meta["source"]["released_rows"] == {"train": 241, "validation": 63}
    assert meta["splits"]["train"]["rows"] == 243 and meta["splits"]["train"]["released_windows"] == 8 + 6 + 2

    rewindowed = preprocess(["--dataset_name", str(directory), "--tokenizer_path", str(tiny_tokenizer_dir),
                             "--output_dir", str(tmp_path / "other"), "--block_size", "16", "--stride", "8"])
    assert (rewindowed["block_size"], rewindowed["stride"]) == (16, 8)  # flags typed win


def test_a_reordered_or_foreign_dataset_is_refused(released, tmp_path, tiny_tokenizer_dir):
    import datasets

    directory, _ = released
    saved = datasets.load_from_disk(str(directory))
    shuffled = tmp_path / "shuffled"
    datasets.DatasetDict({"train": saved["train"].select([0, 2, 1, *range(3, len(saved["train"]))])}).save_to_disk(
        str(shuffled))
    with pytest.raises(ArtifactError, match="window 1: its context is not the text before it"):
        preprocess(["--dataset_name", str(shuffled), "--tokenizer_path", str(tiny_tokenizer_dir),
                    "--output_dir", str(tmp_path / "x")])
    big = tmp_path / "big_ids"
    save_released(big, {"train": [[5, 6, 7, 10_000] * 10]})
    with pytest.raises(UsageError, match="holds token id 10000, but --tokenizer_path .* has"):
        preprocess(["--dataset_name", str(big), "--tokenizer_path", str(tiny_tokenizer_dir),
                    "--output_dir", str(tmp_path / "y")])
