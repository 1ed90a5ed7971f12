"""vLLM serving base + memory (models/serving) against JointLM, on a tiny random Llama: one engine for the module."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.serving.conftest import LMBDA, MEMORY_TEMP, engine, vllm  # noqa: F401  (vllm: skips without it)

from models import load_memory  # noqa: E402
from models.joint import JointLM  # noqa: E402
from models.serving import JointModelRefused  # noqa: E402
from models.serving.checks import check_joint_directory  # noqa: E402

SamplingParams, TokensPrompt = vllm.SamplingParams, vllm.inputs.TokensPrompt
PROMPTS = [[5, 7, 9, 11, 3, 20, 21], [30, 4, 4, 17], [12, 3, 8, 25, 6, 19, 2, 14, 9, 33]]
NEW = 8


@pytest.fixture(scope="module")
def joint_llm(tiny):
    llm = engine(tiny["joint_dir"])
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def reference(tiny) -> JointLM:
    return JointLM(tiny["base"], load_memory(str(tiny["memory_dir"])), lmbda=LMBDA, knn_temp=MEMORY_TEMP)


def prompt_log_probs(llm, prompts: list[list[int]]) -> list[torch.Tensor]:
    """vLLM's log-probability of each prompt token after the first, one tensor per prompt."""
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
    return [torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
            for out, ids in zip(outputs, prompts)]


def greedy(llm, prompts: list[list[int]], new: int = NEW, **kwargs) -> list[list[int]]:
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, **kwargs), use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def test_prompt_log_probs_equal_joint_lm(joint_llm, reference):
    for ids, served in zip(PROMPTS, prompt_log_probs(joint_llm, PROMPTS)):
        expected = reference.log_probs(torch.tensor([ids]))[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(served, expected, rtol=0, atol=1e-4)


def test_greedy_generation_equals_joint_lm_in_a_batch(joint_llm, reference):
    served = greedy(joint_llm, PROMPTS)  # one batch: prompts of different lengths decoded together
    for ids, tokens in zip(PROMPTS, served):
        expected = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                                      max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert tokens == expected[0, len(ids):].tolist()


def test_sampled_log_probs_are_the_joint_distribution(joint_llm, reference):
    ids = PROMPTS[0]
    out = joint_llm.generate([TokensPrompt(prompt_token_ids=ids)],
                             SamplingParams(max_tokens=1, temperature=0, logprobs=5), use_tqdm=False)[0]
    top = out.outputs[0].logprobs[0]  # the 5 most likely next tokens (and the sampled one)
    expected = reference.log_probs(torch.tensor([ids]))[0, -1]
    for token, logprob in top.items():
        assert logprob.logprob == pytest.approx(expected[token].item(), abs=1e-4)
    assert set(top) >= set(expected.topk(5).indices.tolist())


def test_lmbda_zero_equals_plain_vllm_on_the_base(tiny, joint_llm):
    joint = greedy(joint_llm, PROMPTS)
    llm = engine(tiny["base_dir"])
    base_tokens, base_log_probs = greedy(llm, PROMPTS), prompt_log_probs(llm, PROMPTS)
    del llm
    gc.collect()
    llm = engine(tiny["joint_dir"], hf_overrides={"lmbda": 0.0})
    zero_tokens, zero_log_probs = greedy(llm, PROMPTS), prompt_log_probs(llm, PROMPTS)
    del llm
    gc.collect()
    assert zero_tokens == base_tokens
    for zero, base in zip(zero_log_probs, base_log_probs):
        torch.testing.assert_close(zero, base, rtol=0, atol=1e-5)
    assert joint != base_tokens  # the memory changes the answers at lmbda 0.4, so the test above can fail


def test_memory_of_another_base_is_refused_before_the_engine_starts(tiny):
    with pytest.raises(JointModelRefused, match="belongs to the base model with fingerprint"):
        engine(tiny["mismatched"])
    record = check_joint_directory(str(tiny["mismatched"]), allow_base_mismatch=True)  # as --allow_base_mismatch
    assert record["matches"] is False and record["allow_base_mismatch"] is True


def test_memory_decoder_is_refused_in_one_line(tiny):
    with pytest.raises(JointModelRefused, match="vLLM serving takes an MLP memory only") as error:
        engine(tiny["decoder_joint"])
    assert "\n" not in str(error.value)


def test_corrupt_weights_are_refused(tiny, tmp_path):
    import shutil

    copy = tmp_path / "joint"
    shutil.copytree(tiny["joint_dir"], copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    with pytest.raises(JointModelRefused, match="model.safetensors"):
        engine(copy)


def test_an_lmbda_override_out_of_range_is_refused(tiny):
    with pytest.raises(JointModelRefused, match=r"lmbda must be in \[0, 1\], got 1.5"):
        engine(tiny["joint_dir"], hf_overrides={"lmbda": 1.5})
