"""models/joint/interpolation.py: gold-token log-probabilities from one log-sum-exp per distribution give what the
full-distribution formula (`interpolate_log_probs` over (n, V), then a gather) gives, for every lmbda and temperature."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config

from models import MemoryConfig, build_memory
from models.joint import gold_log_probs, interpolate_log_probs, memory_gold_log_probs, memory_log_probs

LMBDAS = [0.0, 1e-4, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0]
TEMPS = [0.3, 1.0, 2.5]


def at_labels(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(-1, labels[:, None]).squeeze(-1)


def reference(lm_logits: torch.Tensor, other_logits: torch.Tensor, labels: torch.Tensor, lmbda: float,
              temp: float) -> torch.Tensor:
    """p = (1 - lmbda) softmax(lm) + lmbda softmax(other / T) at the labels, in float64 from the definition."""
    p_lm = torch.softmax(lm_logits.double(), dim=-1)
    q = torch.softmax(other_logits.double() / temp, dim=-1)
    return at_labels(((1 - lmbda) * p_lm + lmbda * q).log(), labels)


@pytest.mark.parametrize("temp", TEMPS)
def test_gold_formula_equals_the_full_distribution_formula(temp):
    generator = torch.Generator().manual_seed(0)
    n, vocab = 300, 1000
    lm_logits = torch.randn(n, vocab, generator=generator) * 4  # peaked and flat rows alike
    other_logits = torch.randn(n, vocab, generator=generator) * 6
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[:20] = lm_logits[:20].argmax(-1)  # some gold tokens the LM is sure of, some the other one is
    labels[20:40] = other_logits[20:40].argmax(-1)
    lm_gold, other_gold = gold_log_probs(lm_logits, labels), gold_log_probs(other_logits, labels, temp)
    assert lm_gold.shape == (n,) and lm_gold.dtype == torch.float32
    full_lm, full_other = torch.log_softmax(lm_logits, -1), torch.log_softmax(other_logits / temp, -1)
    for lmbda in LMBDAS:
        got = interpolate_log_probs(lm_gold, other_gold, lmbda)  # (n,)
        full = at_labels(interpolate_log_probs(full_lm, full_other, lmbda), labels)  # from (n, V)
        torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), reference(lm_logits, other_logits, labels, lmbda, temp),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(interpolate_log_probs(lm_gold, other_gold, 0.0), lm_gold)  # lmbda 0: the base exactly
    assert torch.equal(interpolate_log_probs(lm_gold, other_gold, 1.0), other_gold)


def test_half_precision_logits_are_scored_in_float32():
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 500, generator=generator) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 500, (64,), generator=generator)
    expected = at_labels(torch.log_softmax(logits.float() / 0.7, -1), labels)
    torch.testing.assert_close(gold_log_probs(logits, labels, 0.7), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("knn_temp", TEMPS)
def test_memory_gold_equals_the_memory_distribution_at_the_labels(knn_temp):
    torch.manual_seed(0)
    base = GPT2Config(vocab_size=211, n_embd=24, n_layer=2, n_head=2, n_positions=32)
    memory = build_memory(MemoryConfig.from_base(base, num_layers=2, intermediate_size=40, layer=1)).eval()
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.3)
        hidden = torch.randn(50, 24)
        labels = torch.randint(0, 211, (50,))
        full = at_labels(memory_log_probs(memory, hidden, knn_temp), labels)
        torch.testing.assert_close(memory_gold_log_probs(memory, hidden, labels, knn_temp), full, rtol=1e-6, atol=1e-6)
