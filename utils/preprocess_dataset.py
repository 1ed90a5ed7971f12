"""Tokenize a corpus and cut it into scoring windows (pipeline step 1).

    python utils/preprocess_dataset.py --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \
        --tokenizer_path gpt2 --output_dir ./dataset/wikitext-gpt2
    python -m utils.preprocess_dataset --train_file wiki.train.tokens --validation_file wiki.valid.tokens \
        --test_file wiki.test.tokens --tokenizer_path TOKENIZER --output_dir OUT
    python -m utils.preprocess_dataset --dataset_name RELEASED_DIR --tokenizer_path TOKENIZER --output_dir OUT

The output directory's layout (and the reading of it) is utils/artifacts/dataset.py's. A ``--dataset_name``
saved by the released preprocessing (already tokenized and windowed, utils/artifacts/released_dataset.py) is
converted: its token streams are kept as they are and windowed again with its block size and stride.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python utils/preprocess_dataset.py`, like the released README
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from utils.arguments import SPLITS
from utils.artifacts.dataset import FORMAT_VERSION, write_split
from utils.artifacts.released_dataset import is_released_dataset, released_streams
from utils.cli import UsageError, command, flags_given, parse_args, setup_logging
from utils.distributed import process_state
from utils.io import NPY_HEADER_BYTES, ArtifactError, atomic_directory, check_free_space, read_meta, timed, write_json
from utils.locking import artifact_lock
from utils.modeling import load_tokenizer, local_path_or_name, tokenizer_fingerprint
from utils.windows import make_windows

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".tokens", ".raw", ".text")


@dataclass
class PreprocessArguments:
    """Where the corpus comes from, how to tokenize it and how to cut it into windows."""

    output_dir: str = field(metadata={"help": "Directory to write the tokenized dataset to."})
    tokenizer_path: str = field(metadata={"help": "Tokenizer: a directory, a hub name, or the directory of --gguf_file."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --tokenizer_path to read the tokenizer from."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets-hub name (with --dataset_config_name) or a dataset saved with save_to_disk."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Local training text file (one document or line per line) or .json/.jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in datasets and JSON files."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per window."})
    stride: int = field(default=512, metadata={"help": "Tokens between window starts; later windows score only their last `stride` tokens."})
    max_chars: int | None = field(
        default=None, metadata={"help": "Keep only the first N characters of each split (quick runs on a slice)."}
    )
    num_proc: int = field(default=1, metadata={"help": "Processes for tokenization."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace --output_dir if it exists."})

    def __post_init__(self):
        local = {s: f for s, f in self.split_files().items() if f is not None}
        if self.dataset_name is None and not local:
            raise UsageError("Give a corpus: --dataset_name (hub name or saved dataset) or --train_file/--validation_file/--test_file.")
        if self.dataset_name is not None and local:
            raise UsageError("Give either --dataset_name or local files (--train_file ...), not both.")
        for split, path in local.items():
            if not os.path.isfile(path):
                raise UsageError(f"--{split}_file {path}: no such file")
            if os.path.getsize(path) == 0:
                raise UsageError(f"--{split}_file {path} is empty: a split needs at least 2 tokens")
        make_windows(0, self.block_size, self.stride)  # validates --block_size and --stride
        if self.max_chars is not None and self.max_chars < 1:
            raise UsageError(f"--max_chars must be >= 1, got {self.max_chars}")

    def split_files(self) -> dict[str, str | None]:
        return {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}


def read_text_rows(path: str, text_column: str, flag: str) -> list[str]:
    """The rows of a local file (given by ``flag``): lines of a text file (newlines kept), or a column of JSON lines."""
    if path.endswith((".json", ".jsonl")):
        from datasets import load_dataset

        dataset = load_dataset("json", data_files=path, split="train")
        if text_column not in dataset.column_names:
            raise UsageError(f"{path} has no column {text_column!r} (columns: {dataset.column_names}); set --text_column")
        return list(dataset[text_column])
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def load_corpus(args: PreprocessArguments) -> dict[str, list[str]]:
    """The text rows of each split, from local files, a saved dataset or the hub."""
    if args.dataset_name is None:
        return {s: read_text_rows(f, args.text_column, f"--{s}_file") for s, f in args.split_files().items() if f is not None}
    import datasets

    if os.path.isdir(args.dataset_name) and any(
        os.path.exists(os.path.join(args.dataset_name, n)) for n in ("dataset_dict.json", "state.json")
    ):
        raw = datasets.load_from_disk(args.dataset_name)
    else:
        try:
            raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        except Exception as err:  # no network, unknown name, bad config: say which flag
            raise UsageError(f"--dataset_name {args.dataset_name} (--dataset_config_name {args.dataset_config_name}): "
                             f"could not load it: {err}") from err
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if "valid" in raw and "validation" not in raw:
        raw["validation"] = raw.pop("valid")
    unknown = [s for s in raw if s not in SPLITS]
    if unknown:
        logger.warning("Ignoring splits %s (only %s are used)", unknown, SPLITS)
    corpus = {}
    for split in SPLITS:
        if split in raw:
            if args.text_column not in raw[split].column_names:
                raise UsageError(f"--dataset_name {args.dataset_name}: split {split} has no column {args.text_column!r}; set --text_column")
            corpus[split] = list(raw[split][args.text_column])
    return corpus


def truncate_rows(rows: list[str], max_chars: int) -> list[str]:
    """The first ``max_chars`` characters of ``rows``, cut at a row boundary when possible."""
    kept, total = [], 0
    for row in rows:
        if total + len(row) > max_chars:
            if not kept:
                kept.append(row[:max_chars])
            break
        kept.append(row)
        total += len(row)
    return kept


def tokenize_rows(rows: list[str], tokenizer, num_proc: int = 1, batch_rows: int = 4096) -> np.ndarray:
    """Tokenize rows separately (no special tokens) and concatenate them into one int32 stream."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"text": rows})
    dataset = dataset.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
        batched=True, batch_size=batch_rows, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"], desc="Tokenizing",
    )
    pieces = [np.asarray(ids, dtype=np.int32) for ids in dataset["ids"]]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def tokenize_corpus(corpus: dict[str, list[str]], tokenizer, args: PreprocessArguments) -> dict[str, tuple[list[str], np.ndarray]]:
    """The (kept rows, token stream) of each split; every split is checked before anything is written."""
    tokenized = {}
    for split, rows in corpus.items():
        if args.max_chars is not None:
            rows = truncate_rows(rows, args.max_chars)
        with timed(f"Tokenizing {split} ({len(rows)} rows)"):
            tokens = tokenize_rows(rows, tokenizer, args.num_proc)
        if len(tokens) < 2:
            raise UsageError(f"The {split} split has {len(tokens)} tokens; at least 2 are needed to score one.")
        tokenized[split] = rows, tokens
    return tokenized


def released_splits(args: PreprocessArguments, tokenizer, given: set[str]) -> tuple[dict, dict]:
    """The token streams of a dataset saved by the released preprocessing ({split: (tokens, extra meta)}) and what
    to record of it; ``args.block_size`` / ``args.stride`` become the released ones unless ``given``."""
    with timed(f"Reading the released dataset {args.dataset_name}"):
        read = released_streams(args.dataset_name, SPLITS)
    block_sizes = {r.block_size for r in read.values()}
    if len(block_sizes) > 1:
        raise ArtifactError(f"--dataset_name {args.dataset_name}: its splits have windows of {sorted(block_sizes)} "
                            "tokens; expected one block size")
    geometry = {"block_size": block_sizes.pop(), "stride": max(r.stride for r in read.values())}
    for name, value in geometry.items():
        if name not in given:
            setattr(args, name, value)
    largest = max(int(r.tokens.max()) for r in read.values())
    if largest >= len(tokenizer):
        raise UsageError(f"--dataset_name {args.dataset_name} holds token id {largest}, but --tokenizer_path "
                         f"{args.tokenizer_path} has {len(tokenizer)} tokens: give the tokenizer it was made with")
    for split, r in read.items():
        logger.info("%s: %d released windows (%d of them start a new stretch of text) give %d tokens; the released "
                    "windows score %d rows, these %d", split, r.windows, r.segments, len(r.tokens), r.released_rows,
                    len(r.tokens) - 1)
    source = {"released_dataset": local_path_or_name(args.dataset_name), "released_geometry": geometry,
              "released_rows": {split: r.released_rows for split, r in read.items()}}
    return {split: (r.tokens, {"released_windows": r.windows}) for split, r in read.items()}, source


def text_splits(args: PreprocessArguments, tokenizer) -> tuple[dict, dict]:
    """The token streams of the corpus ({split: (tokens, extra meta)}) and where it came from."""
    with timed("Reading the corpus"):
        corpus = load_corpus(args)
    tokenized = tokenize_corpus(corpus, tokenizer, args)
    source = {k: v for k, v in asdict(args).items() if k in (
        "dataset_name", "dataset_config_name", "train_file", "validation_file", "test_file", "text_column", "max_chars")}
    for key in ("dataset_name", "train_file", "validation_file", "test_file"):  # local paths, absolute
        source[key] = local_path_or_name(source[key])
    return {split: (tokens, {"characters": int(sum(len(r) for r in rows))})
            for split, (rows, tokens) in tokenized.items()}, source


def preprocess(args: PreprocessArguments, given: set[str] = frozenset()) -> dict:
    """Run step 1 and return the dataset's meta. The inputs are read and tokenized before --output_dir is touched;
    ``given``: the flags typed (a released dataset's block size and stride yield to them)."""
    out = Path(args.output_dir).resolve()  # through a link: the directory it names is replaced, not the link
    if out.exists() and not args.overwrite_output_dir:
        raise ArtifactError(f"--output_dir {out} already exists; pass --overwrite_output_dir to replace it.")
    tokenizer = load_tokenizer(args.tokenizer_path, args.gguf_file)
    if args.dataset_name is not None and is_released_dataset(args.dataset_name):
        streams, source = released_splits(args, tokenizer, given)
    else:
        streams, source = text_splits(args, tokenizer)
    meta = {
        "kind": "dataset",
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "path": local_path_or_name(args.tokenizer_path),
            "gguf_file": args.gguf_file,
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "fingerprint": tokenizer_fingerprint(tokenizer),
        },
        "block_size": args.block_size,
        "stride": args.stride,
        "source": source,
        "splits": {},
        "checksums": {},
    }
    windows = {split: make_windows(len(tokens), args.block_size, args.stride) for split, (tokens, _) in streams.items()}
    check_free_space(out, sum(tokens.nbytes + windows[split].nbytes + 2 * NPY_HEADER_BYTES
                              for split, (tokens, _) in streams.items()), f"--output_dir {args.output_dir}")
    if out.exists():
        shutil.rmtree(out)
    with atomic_directory(out) as staging:
        for split, (tokens, extra) in streams.items():
            meta["splits"][split], checksums = write_split(staging, split, tokens, windows[split])
            meta["checksums"].update(checksums)
            meta["splits"][split].update(extra)
            logger.info("%s: %d tokens, %d rows, %d windows", split, len(tokens), len(tokens) - 1, len(windows[split]))
        write_json(staging / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> dict:
    state = process_state()  # under `accelerate launch`, one process writes and the others wait for it
    setup_logging(state.is_main_process)
    (args,) = parse_args((PreprocessArguments,), argv)
    logger.info("Preprocessing with %s", args)
    with artifact_lock(args.output_dir, "--output_dir", state):
        if state.is_main_process:
            preprocess(args, flags_given(argv))
        state.wait_for_everyone()
        meta = read_meta(args.output_dir, "dataset")
    if state.is_main_process:
        sizes = ", ".join(f"{s} {m['tokens']} tokens / {m['windows']} windows" for s, m in meta["splits"].items())
        print(f"Wrote {args.output_dir}: {sizes}")
    return meta


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
