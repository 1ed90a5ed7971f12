"""Joint generation through HF `generate` with the memory attached by hooks (models/joint/hooks.py)."""

from __future__ import annotations

import pytest
import torch

from models import MemoryConfig, build_memory
from models.joint import JointLM, attach_memory, interpolate_log_probs
from tests.conftest import tiny_model
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook

VOCAB = 50
PAD = 0
LAYER = 1
LMBDA = 0.5
MEMORY_TEMP = 0.7
NEW = 8
ARCHS = ["gpt2", "llama"]


def tiny_memory(base_config, seed: int = 0, **overrides):
    """A tiny random memory reading block LAYER, far from the base model so the mixture matters."""
    if overrides:
        base_config = base_config.__class__(**{**base_config.to_dict(), **overrides})
    torch.manual_seed(seed)
    memory = build_memory(MemoryConfig.from_base(base_config, num_layers=1, intermediate_size=48, layer=LAYER))
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.3)
    return memory.eval()


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    model = tiny_model(request.param, VOCAB)
    model.config.pad_token_id = PAD
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # always NEW tokens, so outputs compare position by position
    model.generation_config.bos_token_id = None
    return model, tiny_memory(model.config)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, **kwargs):
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW,
                          do_sample=False, **kwargs)


@torch.no_grad()
def hand_joint_log_probs(model, memory, input_ids, lmbda=LMBDA):
    """Joint log-probs of every position, with no hook on the model's head: full forward + separate memory."""
    with HiddenStateHook(model, LAYER) as hook:
        logits = model(input_ids=input_ids, use_cache=False).logits
        hidden = hook.hidden
    lm = torch.log_softmax(logits.float(), dim=-1)
    mem = torch.log_softmax(memory(hidden).float() / MEMORY_TEMP, dim=-1)
    return interpolate_log_probs(lm, mem, lmbda)


@torch.no_grad()
def hand_greedy(model, memory, input_ids, lmbda=LMBDA):
    ids = input_ids
    for _ in range(NEW):
        next_id = hand_joint_log_probs(model, memory, ids, lmbda)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=-1)
    return ids


def test_greedy_generation_matches_a_hand_loop(pair):
    model, memory = pair
    ids = prompt(5, 1)
    expected = hand_greedy(model, memory, ids)
    with attach_memory(model, memory, lmbda=LMBDA, memory_temp=MEMORY_TEMP):
        got = greedy(model, ids)
    assert torch.equal(got, expected)
    assert not torch.equal(got, greedy(model, ids)), "the memory should change this greedy continuation"
    assert torch.equal(JointLM(model, memory, LMBDA, MEMORY_TEMP).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False), expected)


def test_log_probs_match_the_hand_computation(pair):
    model, memory = pair
    ids = prompt(9, 2)
    got = JointLM(model, memory, LMBDA, MEMORY_TEMP).log_probs(ids, torch.ones_like(ids))
    torch.testing.assert_close(got, hand_joint_log_probs(model, memory, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(ids.shape), rtol=1e-5, atol=1e-5)
    expected = hand_joint_log_probs(model, memory, ids)
    with attach_memory(model, memory, lmbda=LMBDA, memory_temp=MEMORY_TEMP), torch.no_grad():
        for keep, positions in ((3, slice(-3, None)), (torch.tensor([1, 4, 8]), torch.tensor([1, 4, 8]))):
            kept = model(input_ids=ids, logits_to_keep=keep).logits  # the head sees only some positions
            torch.testing.assert_close(kept, expected[:, positions], rtol=1e-5, atol=1e-5)


def test_batched_left_padded_prompts_match_each_prompt_alone(pair):
    model, memory = pair
    prompts = [prompt(n, 10 + n) for n in (3, 7, 5)]
    width = max(p.shape[1] for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - p.shape[1]:] = p[0]
        attention_mask[row, width - p.shape[1]:] = 1
    joint = JointLM(model, memory, LMBDA, MEMORY_TEMP)
    batched = joint.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False)
    for row, p in enumerate(prompts):
        alone = joint.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=NEW, do_sample=False)
        assert torch.equal(batched[row, width:], alone[0, p.shape[1]:]), f"prompt {row}"


def test_lmbda_zero_is_the_base_and_hooks_are_removed(pair):
    model, memory = pair
    ids = prompt(6, 3)
    head = model.get_output_embeddings()
    before = greedy(model, ids)
    with attach_memory(model, memory, lmbda=0.0, memory_temp=MEMORY_TEMP):
        assert torch.equal(greedy(model, ids), before)
        assert head._forward_hooks
    assert not head._forward_hooks and not model._forward_pre_hooks
    with attach_memory(model, memory, lmbda=LMBDA, memory_temp=MEMORY_TEMP):
        assert not torch.equal(greedy(model, ids), before)
    assert torch.equal(greedy(model, ids), before)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert not torch.allclose(plain.exp().sum(-1), torch.ones(ids.shape)), "raw logits again, not log-probs"
    with pytest.raises(RuntimeError, match="boom"), attach_memory(model, memory):
        raise RuntimeError("boom")
    assert not head._forward_hooks and torch.equal(greedy(model, ids), before)


def test_beam_search_sampling_and_cache(pair):
    model, memory = pair
    ids = prompt(4, 4)
    joint = JointLM(model, memory, LMBDA, MEMORY_TEMP)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW)
    beams = joint.generate(**common, num_beams=3, num_return_sequences=3, do_sample=False)
    torch.manual_seed(7)
    sampled = joint.generate(**common, do_sample=True, top_k=0, num_return_sequences=4)
    torch.manual_seed(7)
    again = joint.generate(**common, do_sample=True, top_k=0, num_return_sequences=4)
    assert torch.equal(sampled, again)
    for out, rows in ((beams, 3), (sampled, 4)):
        assert out.shape == (rows, ids.shape[1] + NEW)
        assert torch.equal(out[:, : ids.shape[1]], ids.expand(rows, -1))
        assert 0 <= out.min() and out.max() < VOCAB
    assert torch.equal(joint.generate(**common, do_sample=False, use_cache=False),
                       joint.generate(**common, do_sample=False, use_cache=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_of_another_hidden_size_is_refused(arch):
    model = tiny_model(arch, VOCAB)
    other = tiny_memory(model.config, **({"n_embd": 16} if arch == "gpt2" else {"hidden_size": 16}))
    with pytest.raises(UsageError, match="dimension 16.*hidden size is 32"):
        with attach_memory(model, other):
            pass
    with pytest.raises(UsageError, match="dimension 16"):
        JointLM(model, other)
    assert not model.get_output_embeddings()._forward_hooks
    with pytest.raises(UsageError, match="lmbda"):
        JointLM(model, tiny_memory(model.config), lmbda=1.5)
