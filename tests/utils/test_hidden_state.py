"""The key hook: which module it reads, that it is removed, and the errors. That the tensor it records is the
family's FFN input, for every row of utils.architectures.ARCHITECTURES, is checked in tests/models/test_architectures.py."""

import pytest
import torch

from tests.conftest import tiny_model
from utils.architectures import ARCHITECTURES, key_module
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
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
    with pytest.raises(UsageError, match="'gpt_neo'.*" + ".*".join(sorted(ARCHITECTURES))):
        HiddenStateHook(model)


def test_layer_out_of_range():
    with pytest.raises(UsageError, match="--dstore_layer 5"):
        HiddenStateHook(tiny_model("gpt2", vocab_size=50), layer=5)
