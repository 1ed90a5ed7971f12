"""Shared fixtures: a tiny word-level tokenizer, a tiny corpus, tiny random models of each architecture."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
WORDS = ("the a river city of in was born near tower old new north south king queen stone bridge "
         "built by people many years ago and is known for its market festival song").split()

# Tiny configurations of the supported architectures, one per row of utils.architectures.ARCHITECTURES (a row
# without one fails tests/models/test_architectures.py); vocab_size is filled in by `tiny_model`.
_LLAMA_LIKE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=128)
_GEMMA = dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16,
              final_logit_softcapping=2.0)  # small enough to change these models' logits (Gemma 2's own is 30)
TINY_CONFIGS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=128),
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "phi3": dict(_LLAMA_LIKE, pad_token_id=0),  # its default pad id (32000) is outside a tiny vocabulary
    "olmo2": dict(_LLAMA_LIKE),
    "gemma2": dict(_GEMMA),
    "gemma3_text": dict(_GEMMA),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=128, num_attention_heads=2,
                     max_position_embeddings=128),
}


def make_text(num_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + " .\n" for _ in range(num_lines)]
    return "".join(lines)


def save_word_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer over WORDS, saved so that AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, ".": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="[UNK]",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return save_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    """Three small text files, one per split."""
    directory = tmp_path_factory.mktemp("corpus")
    files = {}
    for seed, split in enumerate(("train", "validation", "test")):
        files[split] = directory / f"{split}.txt"
        files[split].write_text(make_text(120 if split == "train" else 40, seed))
    return files


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_corpus, tiny_tokenizer_dir) -> Path:
    """The tiny corpus preprocessed with 32-token windows and stride 16."""
    from utils.preprocess_dataset import main as preprocess_main

    out = tmp_path_factory.mktemp("data") / "dataset"
    preprocess_main([
        "--tokenizer_path", str(tiny_tokenizer_dir), "--output_dir", str(out), "--block_size", "32", "--stride", "16",
        *[arg for split, path in tiny_corpus.items() for arg in (f"--{split}_file", str(path))],
    ])
    return out


def tiny_model(model_type: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny random causal LM of a supported architecture, in eval mode."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](vocab_size=vocab_size, **{**TINY_CONFIGS[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def saved_random_memory(model_dir: Path, out: Path, seed: int = 0, scale: float = 0.5) -> Path:
    """A 1-block memory for the model saved in ``model_dir``, reading block 1, with weights drawn from N(0, scale)
    (far from zero, so the mixture matters), saved with its checksums as train_mlpmem_* saves it."""
    from transformers import AutoConfig

    from models import MemoryConfig, build_memory
    from models.memory_directory import save_memory

    torch.manual_seed(seed)
    memory = build_memory(MemoryConfig.from_base(AutoConfig.from_pretrained(model_dir), num_layers=1,
                                                 intermediate_size=48, layer=1))
    with torch.no_grad():
        for param in memory.parameters():
            param.normal_(0, scale)
    save_memory(out, memory, {}, {})
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A saved tiny random GPT-2 with the tiny tokenizer beside it."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tiny_model("gpt2", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def one_torch_thread():
    """One torch thread while a test runs: the same bits in every process, and no thread contention on a busy
    machine. Modules ask for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_faiss_thread():
    """One FAISS (OpenMP) thread: the tests' indexes are small, and on a busy 2-core machine more threads
    only spin-wait for each other. Modules that search ask for it with
    ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``."""
    import faiss

    faiss.omp_set_num_threads(1)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared real data is only present beside the repository)")
    return path
