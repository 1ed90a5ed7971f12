"""The hooked key is the normed input of the last block's feed-forward layer."""

import pytest
import torch

from tests.conftest import tiny_model
from utils.architectures import ARCHITECTURES, key_module
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook


def hand_norm(model, x: torch.Tensor) -> torch.Tensor:
    """The last block's second norm, written out by hand from its weights."""
    config = model.config
    if config.model_type == "gpt2":
        norm = model.transformer.h[-1].ln_2
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + config.layer_norm_epsilon) * norm.weight + norm.bias
    norm = model.model.layers[-1].post_attention_layernorm
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * norm.weight


def expose_residual(model) -> None:
    """Zero the last feed-forward layer's output and drop the final norm, so the model's last hidden
    state is the residual stream that enters the last block's second norm."""
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            block = model.transformer.h[-1]
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
            block.ln_2.weight.uniform_(0.5, 1.5)
            block.ln_2.bias.uniform_(-0.5, 0.5)
            model.transformer.ln_f = torch.nn.Identity()
        else:
            block = model.model.layers[-1]
            block.mlp.down_proj.weight.zero_()
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            model.model.norm = torch.nn.Identity()


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral"])
def test_hooked_key_equals_hand_computed_norm(model_type):
    model = tiny_model(model_type, vocab_size=50)
    expose_residual(model)
    input_ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), HiddenStateHook(model) as hook:
        out = model(input_ids, output_hidden_states=True)
        key = hook.hidden.clone()
    residual = out.hidden_states[-1]  # (B, T, d)
    assert key.shape == (2, 12, model.config.hidden_size)
    torch.testing.assert_close(key, hand_norm(model, residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral"])
def test_hook_reads_the_chosen_layer_and_is_removed(model_type):
    model = tiny_model(model_type, vocab_size=50)
    module = key_module(model, 0)
    assert module is key_module(model, -2)
    with HiddenStateHook(model, layer=0) as hook:
        model(torch.zeros(1, 4, dtype=torch.long))
        assert hook.hidden.shape == (1, 4, model.config.hidden_size)
    assert not module._forward_pre_hooks


def test_unknown_architecture_names_the_supported_ones():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                           attention_types=[[["global"], 1]]))
    with pytest.raises(UsageError, match="gpt_neo.*" + ".*".join(sorted(ARCHITECTURES))):
        HiddenStateHook(model)


def test_layer_out_of_range():
    with pytest.raises(UsageError, match="--dstore_layer 5"):
        HiddenStateHook(tiny_model("gpt2", vocab_size=50), layer=5)
