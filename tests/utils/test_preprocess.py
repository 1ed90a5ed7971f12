"""Preprocessing: the token stream, its windows and meta.json."""

import json
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import REPO
from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.io import ArtifactError
from utils.preprocess_dataset import main as preprocess_main
from utils.windows import make_windows


def test_tokens_windows_and_meta(tiny_dataset, tiny_corpus, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    assert meta["kind"] == "dataset" and meta["block_size"] == 32 and meta["stride"] == 16
    for split, path in tiny_corpus.items():
        expected = [t for line in path.read_text().splitlines(keepends=True)
                    for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
        data = load_split(str(tiny_dataset), split)
        assert data.tokens.dtype == np.int32 and data.tokens.tolist() == expected
        assert meta["splits"][split]["rows"] == len(expected) - 1 == data.num_rows
        np.testing.assert_array_equal(data.windows, make_windows(len(expected), 32, 16))
    assert meta["tokenizer"]["vocab_size"] == len(tokenizer)


def test_jsonl_input_and_max_chars(tmp_path, tiny_tokenizer_dir, tiny_corpus):
    lines = tiny_corpus["train"].read_text().splitlines(keepends=True)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"body": line}) + "\n" for line in lines))
    out = tmp_path / "out"
    meta = preprocess_main(["--tokenizer_path", str(tiny_tokenizer_dir), "--train_file", str(jsonl),
                            "--text_column", "body", "--max_chars", "500", "--output_dir", str(out)])
    kept = meta["splits"]["train"]["characters"]
    assert 0 < kept <= 500 and kept == len("".join(lines)[:kept])
    assert not (tmp_path / "out.partial").exists()


def test_existing_output_needs_overwrite(tiny_dataset, tiny_tokenizer_dir, tiny_corpus):
    with pytest.raises(ArtifactError, match="--overwrite_output_dir"):
        preprocess_main(["--tokenizer_path", str(tiny_tokenizer_dir), "--train_file", str(tiny_corpus["train"]),
                         "--output_dir", str(tiny_dataset)])


@pytest.mark.parametrize("extra,message", [
    (["--train_file", "/nonexistent/train.txt"], "--train_file /nonexistent/train.txt"),
    ([], "Give a corpus"),
    (["--train_file", "TRAIN", "--stride", "0"], "--stride"),
])
def test_bad_input_is_a_clear_error(tmp_path, tiny_tokenizer_dir, tiny_corpus, extra, message):
    extra = [str(tiny_corpus["train"]) if a == "TRAIN" else a for a in extra]
    with pytest.raises(UsageError, match=message):
        preprocess_main(["--tokenizer_path", str(tiny_tokenizer_dir), "--output_dir", str(tmp_path / "o"), *extra])


def test_missing_split_and_incomplete_dataset(tiny_dataset, tmp_path):
    with pytest.raises(ArtifactError, match="no 'nonsense' split"):
        load_split(str(tiny_dataset), "nonsense")
    (tmp_path / "half.partial").mkdir()
    with pytest.raises(ArtifactError, match="incomplete"):
        load_split(str(tmp_path / "half"), "train")


def test_cli_exits_2_without_traceback(tmp_path, tiny_tokenizer_dir):
    result = subprocess.run(
        [sys.executable, "utils/preprocess_dataset.py", "--tokenizer_path", str(tiny_tokenizer_dir),
         "--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "--train_file" in result.stderr and "Traceback" not in result.stderr
