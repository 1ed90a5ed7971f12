"""utils.modeling.model_fingerprint: which weights and config fields tell two base models apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_model
from utils.cli import UsageError
from utils.modeling import model_fingerprint

VOCAB = 50


def test_a_saved_copy_and_a_bfloat16_load_match_another_seed_does_not(tmp_path):
    model = tiny_model("llama", VOCAB, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    fingerprint = model_fingerprint(model, -1)
    assert fingerprint == model_fingerprint(model, 1)  # -1 is the last of 2 blocks
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path), 1) == fingerprint
    assert model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16), 1) == fingerprint
    assert model_fingerprint(tiny_model("llama", VOCAB, seed=1, tie_word_embeddings=False), 1) != fingerprint
    assert model_fingerprint(tiny_model("llama", VOCAB, tie_word_embeddings=False, rms_norm_eps=1e-3), 1) != fingerprint
    assert model_fingerprint(model, 0) != fingerprint


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_what_determines_the_keys_counts(arch):
    """Block 0's keys depend on the embeddings and block 0; not on block 1, the final norm or an untied head.
    A change in place is seen (the cache is keyed by the parameters' versions)."""
    model = tiny_model(arch, VOCAB, **({} if arch == "gpt2" else {"tie_word_embeddings": False}))
    before = model_fingerprint(model, 0)
    blocks = model.transformer.h if arch == "gpt2" else model.model.layers
    final_norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    with torch.no_grad():
        for module in [blocks[1], final_norm] + ([] if arch == "gpt2" else [model.lm_head]):
            next(module.parameters()).add_(1.0)
    assert model_fingerprint(model, 0) == before
    assert model_fingerprint(model, 1) != before
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 0] += 0.5
    assert model_fingerprint(model, 0) != before
    with pytest.raises(UsageError, match="Block 2 is out of range"):
        model_fingerprint(model, 2)
