"""Fixtures of the vLLM serving tests: a tiny random Llama, memories for it and for another base, joint directories.

The tests need vLLM and this project installed in one environment (`SERVE=1 bash scripts/install.sh` builds
``.venv-serve``; `bash scripts/test.sh` runs them there) and skip with that reason elsewhere. vLLM runs in the test
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), so its import (about a minute on 2 busy cores)
is paid once and each further engine costs seconds.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawned engine core
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM's binding is for a worker process of its own
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: SERVE=1 bash scripts/install.sh builds "
                                          ".venv-serve, where bash scripts/test.sh runs these tests")

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from models import MemoryConfig, build_memory  # noqa: E402
from models.convert import main as convert_main  # noqa: E402
from models.memory_directory import save_memory  # noqa: E402
from tests.conftest import save_word_tokenizer, tiny_model  # noqa: E402
from utils.modeling import model_fingerprint, tokenizer_fingerprint  # noqa: E402

LAYER = 1  # the memory reads the last of the 2 blocks
LMBDA = 0.4
MEMORY_TEMP = 0.8
# vLLM's CPU attention takes head sizes of 32 and more: width 64, 2 heads.
TINY_LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=64 << 20,
              distributed_executor_backend="uni", seed=0)


def engine(model: str, **kwargs):
    """An in-process vLLM engine on the CPU, sized for the tests."""
    return vllm.LLM(model=str(model), **{**ENGINE, **kwargs})


def llama_base(directory: Path, tokenizer_dir: Path, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY_LLAMA)).eval()
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return model


def fitted_memory(base, tokenizer, directory: Path, seed: int) -> Path:
    """A random 1-block memory recording ``base``'s fingerprint, with weights far from zero so the mixture matters."""
    torch.manual_seed(seed)
    memory = build_memory(MemoryConfig.from_base(base.config, num_layers=1, intermediate_size=48, layer=LAYER,
                                                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                                 base_model_fingerprint=model_fingerprint(base, LAYER)))
    with torch.no_grad():
        for param in memory.parameters():
            param.normal_(0, 0.3)
    save_memory(directory, memory.eval(), {}, {})  # with meta.json's checksums, as train_mlpmem_* saves it
    return directory


def build_joint(base_dir: Path, memory_dir: Path, output: Path, *extra: str) -> Path:
    assert convert_main(["--joint", "--base_model", str(base_dir), "--memory", str(memory_dir), "--output", str(output),
                         "--lmbda", str(LMBDA), "--knn_temp", str(MEMORY_TEMP), *extra]) == 0
    return output


@pytest.fixture(scope="session")
def plugin_installed():
    names = [plugin.name for plugin in entry_points(group="vllm.general_plugins")]
    if "mlp_memory" not in names:
        pytest.fail("The vllm.general_plugins entry point mlp_memory is missing: install the project into this "
                    "environment (pip install --no-deps -e .)")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, plugin_installed) -> dict:
    """A tiny Llama base, its memory and their joint directory; a Memory Decoder's and a mismatched memory's too."""
    root = tmp_path_factory.mktemp("serving")
    tokenizer_dir = save_word_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = llama_base(root / "base", tokenizer_dir, seed=0)
    other = llama_base(root / "other_base", tokenizer_dir, seed=5)
    memory_dir = fitted_memory(base, tokenizer, root / "memory", seed=1)
    joint_dir = build_joint(root / "base", memory_dir, root / "joint")
    fitted_memory(other, tokenizer, root / "other_memory", seed=2)
    mismatched = build_joint(root / "base", root / "other_memory", root / "joint_mismatched", "--allow_base_mismatch")
    decoder = tiny_model("llama", len(tokenizer), seed=3, num_hidden_layers=1)
    decoder.save_pretrained(root / "decoder")
    tokenizer.save_pretrained(root / "decoder")
    decoder_joint = build_joint(root / "base", root / "decoder", root / "joint_decoder")
    return {"root": root, "base_dir": root / "base", "base": base, "memory_dir": memory_dir, "joint_dir": joint_dir,
            "mismatched": mismatched, "decoder_joint": decoder_joint, "tokenizer": tokenizer}
