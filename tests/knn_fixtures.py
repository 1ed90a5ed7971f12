"""Small, seeded, offline inputs for the kNN tests: datastores of random vectors and a tiny LM pipeline.

Nothing here reads /work/shared: the tokenizer is a WordLevel tokenizer over a made-up vocabulary and
the LM a 2-layer GPT-2 with random weights, saved once per test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import PartialState

from utils.artifacts.datastore import DatastoreWriter

REPO = Path(__file__).resolve().parent.parent
WORDS = [f"w{i}" for i in range(40)]


def write_datastore(path: Path, keys: np.ndarray, vals: np.ndarray, **identity) -> Path:
    """A finished datastore holding exactly ``keys`` (N, d) and ``vals`` (N,)."""
    identity = {"model": {"model_type": "test"}, "architecture": "gpt2", "layer": 1,
                "tokenizer_fingerprint": "test-tokenizer", "dataset": {"tokens_sha256": "none"}, **identity}
    writer = DatastoreWriter(str(path), num_rows=len(keys), dim=keys.shape[1], num_windows=1, identity=identity,
                             state=PartialState())
    writer.write(np.arange(len(keys)), keys, vals, np.array([0]))
    writer.finish()
    return path


def clustered_keys(rows: int, dim: int, seed: int, clusters: int = 50, spread: float = 0.3) -> np.ndarray:
    """Gaussian blobs (like hidden states, unlike uniform noise), float16 (rows, dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(clusters, size=rows)] + spread * rng.standard_normal((rows, dim))
    return points.astype(np.float16)


def random_datastore(path: Path, rows: int, dim: int, vocab: int, seed: int, **identity) -> Path:
    """A datastore of clustered keys and uniformly random values below ``vocab``."""
    rng = np.random.default_rng(seed + 1)
    return write_datastore(path, clustered_keys(rows, dim, seed), rng.integers(vocab, size=rows).astype(np.int32), **identity)


def make_corpus(path: Path, lines: int, seed: int) -> Path:
    """Lines of words with repeated phrases, so that neighbours in the datastore are informative."""
    rng = np.random.default_rng(seed)
    phrases = [" ".join(rng.choice(WORDS, size=6)) for _ in range(12)]
    path.write_text("".join(" ".join(rng.choice(phrases, size=3)) + "\n" for _ in range(lines)))
    return path


def make_tokenizer(directory: Path, words: list[str] = WORDS) -> Path:
    """A WordLevel tokenizer over ``words`` (whitespace split), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>").save_pretrained(directory)
    return directory


def make_model(directory: Path, vocab_size: int) -> Path:
    """A 2-layer GPT-2 of width 32 with seeded random weights, saved with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> dict:
    """A preprocessed dataset, a tiny model (with its tokenizer) and the datastore of its train split."""
    import train_base
    from utils.preprocess_dataset import main as preprocess

    root = tmp_path_factory.mktemp("tiny_lm")
    model_dir = make_tokenizer(root / "model")
    make_model(model_dir, vocab_size=len(WORDS) + 2)
    preprocess(["--tokenizer_path", str(model_dir), "--train_file", str(make_corpus(root / "train.txt", 60, 0)),
                "--test_file", str(make_corpus(root / "test.txt", 12, 1)), "--output_dir", str(root / "data"),
                "--block_size", "32", "--stride", "16"])
    train_base.main(["--model_name_or_path", str(model_dir), "--dataset_name", str(root / "data"), "--do_eval",
                     "--eval_subset", "train", "--save_knnlm_dstore", "--dstore_dir", str(root / "dstore"),
                     "--output_dir", str(root / "base_eval"), "--per_device_eval_batch_size", "4", "--report_to", "none"])
    return {"root": root, "model": model_dir, "data": root / "data", "dstore": root / "dstore"}


def cpu_launch_env() -> dict:
    """The environment of a multi-process CPU launch: GPUs hidden (a machine with one GPU cannot hold two
    ranks), one OpenMP thread per process, the repository importable ahead of any PYTHONPATH already set."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def accelerate_launch(module: str, args: list[str], num_processes: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in ``num_processes`` CPU processes from the repository root.

    ``accelerate launch --cpu`` would start one process only; ``--multi_gpu`` goes through torchrun and
    the entry points form a gloo group when there is no CUDA (utils.distributed.process_state).
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *args]
    result = subprocess.run(command, cwd=REPO, env=cpu_launch_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
