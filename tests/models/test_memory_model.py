"""models/: each block type against a hand computation, sizes, presets, save/load (and directories written before
the styles were records), base-model checks. --init_lm_head, per base family: tests/models/test_architectures.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, GPT2Config, LlamaConfig, MistralConfig

from models import (MEMORY_MODELS, MEMORY_STYLES, MemoryConfig, build_memory, check_memory_matches, load_memory,
                    parameter_count)
from models.training.modes import base_parameter_count
from tests.conftest import tiny_model
from utils.cli import UsageError

D, V = 16, 37


def randomised(style: str, **fields) -> torch.nn.Module:
    """A tiny memory of ``style`` in eval mode with every parameter (norms and biases too) random."""
    config = MemoryConfig.from_preset("tiny", memory_style=style, hidden_size=D, vocab_size=V, intermediate_size=24,
                                      **fields)
    model = build_memory(config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(x, module):
    out = x @ module.weight.T
    return out if module.bias is None else out + module.bias


def gelu_ffn(h, ffn):
    return linear(gelu_tanh(linear(h, ffn.fc)), ffn.proj)


def gated_ffn(activation):
    return lambda h, ffn: linear(activation(linear(h, ffn.gate)) * linear(h, ffn.up), ffn.down)


# Each style's norm and FFN, written out from the paper / the HF models (a style without one fails).
HAND = {
    "gpt2": (lambda h, n, eps: layer_norm(h, n.weight, n.bias, eps), gelu_ffn),
    "llama": (lambda h, n, eps: rms_norm(h, n.weight, eps), gated_ffn(lambda g: g * torch.sigmoid(g))),
    "mistral": (lambda h, n, eps: rms_norm(h, n.weight, eps), gated_ffn(lambda g: g * torch.sigmoid(g))),
    "gemma": (lambda h, n, eps: rms_norm(h, n.weight, eps), gated_ffn(gelu_tanh)),
}


def by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """The memory's logits computed from its weights with the formulas of the paper / the HF models."""
    norm, ffn = HAND[model.config.memory_style]
    eps = model.config.norm_eps
    for block in model.blocks:
        x = x + ffn(norm(x, block.norm, eps), block.ffn)
    return linear(norm(x, model.final_norm, eps), model.lm_head)


@pytest.mark.parametrize("style", MEMORY_STYLES)
def test_blocks_match_hand_computation(style):
    model = randomised(style)
    assert type(model) is MEMORY_MODELS[style] and model.config.model_type == f"mlp_memory_{style}"
    x = torch.randn(5, D)
    torch.testing.assert_close(model(x), by_hand(model, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x[None]), model(x)[None])  # any leading shape: (B, T, d) -> (B, T, V)


def test_style_defaults():
    gpt2 = MemoryConfig.from_preset("tiny", hidden_size=D, vocab_size=V)
    assert (gpt2.memory_style, gpt2.norm_eps, gpt2.dropout, gpt2.ffn_bias, gpt2.intermediate_size) == ("gpt2", 1e-5, 0.1, True, 4 * D)
    llama = MemoryConfig.from_preset("tiny", memory_style="llama", hidden_size=D, vocab_size=V)
    assert (llama.dropout, llama.ffn_bias) == (0.0, False)
    mistral = build_memory(MemoryConfig.from_preset("tiny", memory_style="mistral", hidden_size=D, vocab_size=V))
    assert all("bias" not in name for name, _ in mistral.named_parameters())
    with pytest.raises(UsageError, match="no FFN bias"):
        MemoryConfig.from_preset("tiny", memory_style="mistral", hidden_size=D, vocab_size=V, ffn_bias=True)


def test_dropout_only_in_training():
    model = build_memory(MemoryConfig.from_preset("tiny", hidden_size=D, vocab_size=V, dropout=0.5))
    x = torch.randn(4, D)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("style, bias", [(name, bias) for name, style in MEMORY_STYLES.items()
                                         for bias in (True, False) if style.bias_allowed or not bias])
def test_parameter_count_formula(style, bias):
    config = MemoryConfig.from_preset("tiny", memory_style=style, hidden_size=D, vocab_size=V, intermediate_size=24,
                                      num_layers=3, ffn_bias=bias)
    assert build_memory(config).num_parameters() == parameter_count(config)


def test_sized_like_the_paper_from_gpt2_large():
    """GPT2-large (d=1280, 774M parameters) gets 54 blocks and 772.6M parameters, as in the paper."""
    base = GPT2Config(n_embd=1280, n_layer=36, n_head=20)
    parameters = base_parameter_count(base)
    assert parameters == 774_030_080
    config = MemoryConfig.from_base(base, base_parameters=parameters)
    assert (config.num_layers, parameter_count(config)) == (54, 772_604_160)
    assert MemoryConfig.from_base(base, preset="large").num_layers == 54
    assert MemoryConfig.from_base(base, num_layers=3, intermediate_size=100).intermediate_size == 100


def test_sized_from_llama_and_mistral_configs():
    llama = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                        vocab_size=500, rms_norm_eps=1e-5, mlp_bias=True)
    config = MemoryConfig.from_base(llama, base_parameters=base_parameter_count(llama), layer=3)
    assert (config.memory_style, config.intermediate_size, config.norm_eps, config.ffn_bias, config.layer) == ("llama", 176, 1e-5, True, 3)
    assert abs(parameter_count(config) - base_parameter_count(llama)) <= 3 * 64 * 176  # within one block
    mistral = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=500)
    assert MemoryConfig.from_base(mistral, num_layers=2).memory_style == "mistral"


def test_presets_refuse_other_sizes():
    with pytest.raises(UsageError, match="hidden size 1280"):
        MemoryConfig.from_base(GPT2Config(n_embd=64, n_head=4), preset="large")
    with pytest.raises(UsageError, match="gpt2-style"):
        MemoryConfig.from_base(LlamaConfig(hidden_size=1280, num_attention_heads=16), preset="large")
    with pytest.raises(UsageError, match="Unknown memory preset"):
        MemoryConfig.from_preset("huge", hidden_size=D, vocab_size=V)
    with pytest.raises(UsageError, match="--num_layers"):
        MemoryConfig.from_base(GPT2Config(n_embd=64, n_head=4))


@pytest.mark.parametrize("style", MEMORY_STYLES)
def test_save_and_load_round_trip(tmp_path, style):
    model = randomised(style, base_model={"model_name_or_path": "/some/base"}, layer=1, tokenizer_fingerprint="abc")
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    x = torch.randn(3, D)
    for loaded in (load_memory(tmp_path, allow_unverified=True), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is type(model)
        assert torch.equal(loaded.eval()(x), model(x))
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.layer, config.tokenizer_fingerprint, config.base_model) == (1, "abc", {"model_name_or_path": "/some/base"})


@pytest.mark.parametrize("style, eps, dropout, bias", [("gpt2", 1e-5, 0.1, True), ("llama", 1e-6, 0.0, False),
                                                        ("mistral", 1e-6, 0.0, False)])
def test_directories_written_by_earlier_versions_load_unchanged(tmp_path, style, eps, dropout, bias):
    """A config.json as the per-style classes wrote it before the records (mlp_memory_<style>, every field)."""
    written = {"architectures": [f"{MEMORY_STYLES[style].class_prefix}MemoryModel"], "base_architecture": None,
               "base_model": None, "base_model_fingerprint": None, "dropout": dropout, "dtype": "float32",
               "ffn_bias": bias, "hidden_size": D, "initializer_range": 0.02, "intermediate_size": 24, "layer": 1,
               "model_type": f"mlp_memory_{style}", "norm_eps": eps, "num_layers": 2, "released_layout": None,
               "tokenizer_fingerprint": None, "transformers_version": "5.24.0", "vocab_size": V}
    model = randomised(style)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(written))
    loaded = load_memory(tmp_path)
    assert type(loaded) is MEMORY_MODELS[style]
    assert (loaded.config.norm_eps, loaded.config.dropout, loaded.config.ffn_bias, loaded.config.layer) == (eps, dropout, bias, 1)
    x = torch.randn(3, D)
    assert torch.equal(loaded.eval()(x), model(x))


def test_load_memory_refuses_other_directories(tmp_path, tiny_gpt2_dir):
    with pytest.raises(UsageError, match="no config.json"):
        load_memory(tmp_path)
    with pytest.raises(UsageError, match="not an MLP memory"):
        load_memory(tiny_gpt2_dir)


def test_memory_must_match_its_base_model():
    base = tiny_model("gpt2", vocab_size=V)  # hidden size 32
    memory_config = MemoryConfig.from_base(base.config, num_layers=1, layer=1, tokenizer_fingerprint="tok-a",
                                           base_model={"model_name_or_path": "/trained/base"})
    check_memory_matches(memory_config, base, "tok-a", layer=1)
    with pytest.raises(UsageError, match="dimension 32.*hidden size is 64.*/trained/base"):
        check_memory_matches(memory_config, tiny_model("gpt2", vocab_size=V, n_embd=64), "tok-a")
    with pytest.raises(UsageError, match=f"predicts over {V} tokens.*has {V + 5}"):
        check_memory_matches(memory_config, tiny_model("gpt2", vocab_size=V + 5), "tok-a")
    with pytest.raises(UsageError, match="tokenizer fingerprint tok-a.*tok-b"):
        check_memory_matches(memory_config, base, "tok-b", memory_path="MEM")
    with pytest.raises(UsageError, match="block 1, not block 0"):
        check_memory_matches(memory_config, base, "tok-a", layer=0)
