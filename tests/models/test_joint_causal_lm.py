"""The joint model as one HF causal LM (models/joint/causal_lm.py, build.py) and Memory Decoder memories
(models/joint/token_memory.py), against the hook path (JointLM) and independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import evaluate_joint
import models
from demo.generation_example import main as demo_main
from downstream.eval_qa import main as qa_main
from models import MemoryConfig, MLPMemoryForCausalLM, build_memory
from models.convert import main as convert_main
from models.joint import JointLM
from models.memory_directory import save_memory
from tests.conftest import WORDS, tiny_model
from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.modeling import model_fingerprint, tokenizer_fingerprint

LAYER = 1
LMBDA = 0.4
MEMORY_TEMP = 0.8
NEW = 6


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_gpt2_dir):
    """The tiny GPT-2 base (saved with its tokenizer), a tiny random MLP memory for it and a tiny random Memory
    Decoder (a 1-layer Llama over the same tokens), both saved, and a joint directory built by models.convert."""
    root = tmp_path_factory.mktemp("joint_hf")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    torch.manual_seed(1)
    memory = build_memory(MemoryConfig.from_base(base.config, num_layers=1, intermediate_size=48, layer=LAYER,
                                                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                                 base_model_fingerprint=model_fingerprint(base, LAYER)))
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.3)  # far from the base, so the mixture matters
    save_memory(root / "memory", memory.eval(), results={}, record={})
    decoder = tiny_model("llama", base.config.vocab_size, seed=2, num_hidden_layers=1)
    decoder.save_pretrained(root / "decoder")
    tokenizer.save_pretrained(root / "decoder")
    joint_dir = root / "joint"
    assert convert_main(["--joint", "--base_model", str(tiny_gpt2_dir), "--memory", str(root / "memory"),
                         "--output", str(joint_dir), "--lmbda", str(LMBDA), "--memory_temp", str(MEMORY_TEMP)]) == 0
    return {"root": root, "base": base, "memory": memory, "decoder": decoder, "tokenizer": tokenizer,
            "joint_dir": joint_dir, "base_dir": tiny_gpt2_dir}


def prompts(batch: int = 1, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 30, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 3 and 6 tokens, left padded with id 0."""
    ids = prompts(2, 6, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def generate_kwargs(ids, mask=None, **kwargs):
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=NEW,
                pad_token_id=0, eos_token_id=None, **kwargs)


STRATEGIES = {
    "greedy": {"do_sample": False},
    "beam": {"do_sample": False, "num_beams": 3},
    "sampling": {"do_sample": True, "top_k": 0, "temperature": 1.3},
}


@pytest.mark.parametrize("memory_name", ["memory", "decoder"])
def test_wrapper_log_probs_equal_the_hook_path(parts, memory_name):
    base, memory = parts["base"], parts[memory_name]
    joint = MLPMemoryForCausalLM.from_parts(base, memory, LMBDA, MEMORY_TEMP)
    ids, mask = left_padded()
    expected = JointLM(base, memory, LMBDA, MEMORY_TEMP).log_probs(ids, mask)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = joint(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        labels = ids.clone()
        loss = joint(input_ids=ids[1:], labels=labels[1:]).loss
    assert torch.equal(got[mask.bool()], expected[mask.bool()])
    gold = expected[1, :-1].gather(-1, ids[1, 1:, None])
    assert loss.item() == pytest.approx(-gold.mean().item(), rel=1e-6)  # the joint NLL


@pytest.mark.parametrize("memory_name", ["memory", "decoder"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_generation_equals_the_hook_path(parts, memory_name, strategy):
    base, memory = parts["base"], parts[memory_name]
    joint = MLPMemoryForCausalLM.from_parts(base, memory, LMBDA, MEMORY_TEMP)
    hooks = JointLM(base, memory, LMBDA, MEMORY_TEMP)
    for ids, mask in [(prompts(), None), left_padded()]:
        kwargs = generate_kwargs(ids, mask, **STRATEGIES[strategy])
        torch.manual_seed(7)
        expected = hooks.generate(**kwargs)
        torch.manual_seed(7)
        got = joint.generate(**kwargs)
        assert torch.equal(got, expected)
        assert got.shape[1] == ids.shape[1] + NEW


def hand_decoder_log_probs(base, decoder, ids, lmbda, memory_temp):
    """p = (1 - lmbda) p_base + lmbda softmax(decoder_logits / T), in float64, from two plain forwards."""
    with torch.no_grad():
        p_lm = torch.softmax(base(input_ids=ids).logits.double(), dim=-1)
        q = torch.softmax(decoder(input_ids=ids).logits.double() / memory_temp, dim=-1)
    return ((1 - lmbda) * p_lm + lmbda * q).log()


def test_memory_decoder_through_jointlm_matches_an_independent_computation(parts):
    base, decoder = parts["base"], parts["decoder"]
    ids = prompts(2, 7, seed=5)
    expected = hand_decoder_log_probs(base, decoder, ids, LMBDA, MEMORY_TEMP)
    got = JointLM(base, decoder, LMBDA, MEMORY_TEMP).log_probs(ids)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # greedy generation, KV cache on: each step's argmax of the full-prefix joint distribution
    hand = ids[:1]
    for _ in range(NEW):
        next_id = hand_decoder_log_probs(base, decoder, hand, LMBDA, MEMORY_TEMP)[:, -1].argmax(-1, keepdim=True)
        hand = torch.cat([hand, next_id], dim=-1)
    assert torch.equal(JointLM(base, decoder, LMBDA, MEMORY_TEMP).generate(**generate_kwargs(ids[:1], do_sample=False)),
                       hand)


def test_memory_decoder_with_another_vocabulary_is_refused(parts, tmp_path, tiny_dataset):
    other = tiny_model("gpt2", parts["base"].config.vocab_size + 3, seed=4)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UsageError, match=r"Memory Decoder .* predicts over \d+ tokens.*share the base model's tokenizer"):
        models.joint.load_checked_memory(str(tmp_path / "other"), parts["base"], None)
    with pytest.raises(UsageError, match=r"drop --memory \(--knn_generator_path\)"):
        evaluate_joint.main(["--model_name_or_path", str(parts["joint_dir"]), "--knn_generator_path",
                             str(parts["root"] / "memory"), "--dataset_name", str(tiny_dataset), "--output_dir",
                             str(tmp_path / "o")])


def test_save_load_round_trip_and_pipeline(parts, tmp_path):
    joint_dir = parts["joint_dir"]
    meta = json.loads((joint_dir / "meta.json").read_text())
    assert meta["kind"] == "mlp_memory_joint" and meta["memory_kind"] == "mlp_memory"
    assert meta["memory_layer"] == LAYER and meta["lmbda"] == LMBDA and meta["base_check"]["matches"] is True
    loaded = AutoModelForCausalLM.from_pretrained(joint_dir)
    assert isinstance(loaded, MLPMemoryForCausalLM)
    assert loaded.base.lm_head.weight is loaded.base.transformer.wte.weight  # the tied embedding, stored once
    assert loaded.get_input_embeddings() is loaded.base.transformer.wte
    ids = prompts(2, 6, seed=9)
    expected = JointLM(parts["base"], parts["memory"], LMBDA, MEMORY_TEMP).log_probs(ids)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)
    bf16 = AutoModelForCausalLM.from_pretrained(joint_dir, dtype=torch.bfloat16)
    assert bf16.memory.dtype == bf16.base.dtype == torch.bfloat16

    generator = pipeline("text-generation", model=str(joint_dir))
    text = "the king was born near the old tower"
    out = generator(text, max_new_tokens=NEW, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = parts["tokenizer"](text, return_tensors="pt").input_ids
    greedy = JointLM(parts["base"], parts["memory"], LMBDA, MEMORY_TEMP).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert out == parts["tokenizer"].decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)


def test_convert_joint_refuses_to_overwrite_and_checks_the_base(parts, tmp_path):
    args = ["--joint", "--base_model", str(parts["base_dir"]), "--memory", str(parts["root"] / "memory"),
            "--output", str(parts["joint_dir"])]
    with pytest.raises(UsageError, match="already exists.*--overwrite_output_dir"):
        convert_main(args)
    other = tiny_model("gpt2", parts["base"].config.vocab_size, seed=11)
    other.save_pretrained(tmp_path / "other")
    parts["tokenizer"].save_pretrained(tmp_path / "other")
    with pytest.raises(UsageError, match="fingerprint"):
        convert_main([*args[:2], str(tmp_path / "other"), *args[3:6], str(tmp_path / "j")])
    assert not (tmp_path / "j").exists()


@pytest.fixture(scope="module")
def perplexities(parts, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppl")
    common = ["--dataset_name", str(tiny_dataset), "--dataset_split_name", "test", "--per_device_eval_batch_size", "3"]
    flags = evaluate_joint.main([*common, "--model_name_or_path", str(parts["base_dir"]), "--knn_generator_path",
                                 str(parts["root"] / "memory"), "--lmbda", str(LMBDA), "--knn_temp", str(MEMORY_TEMP),
                                 "--output_dir", str(out / "flags")])
    joint = evaluate_joint.main([*common, "--model_name_or_path", str(parts["joint_dir"]), "--output_dir",
                                 str(out / "joint")])
    decoder = evaluate_joint.main([*common, "--model_name_or_path", str(parts["base_dir"]), "--knn_generator_path",
                                   str(parts["root"] / "decoder"), "--lmbda", str(LMBDA), "--knn_temp",
                                   str(MEMORY_TEMP), "--output_dir", str(out / "decoder")])
    return flags, joint, decoder


def test_evaluate_joint_on_a_joint_directory_gives_the_same_numbers(perplexities):
    flags, joint, _ = perplexities
    assert joint["lmbda"] == LMBDA and joint["memory_temp"] == MEMORY_TEMP and joint["memory_layer"] == LAYER
    for key in ("perplexity", "base_perplexity", "memory_perplexity", "eval_tokens"):
        assert joint[key] == flags[key]


def test_evaluate_joint_with_a_memory_decoder_matches_an_independent_computation(parts, perplexities, tiny_dataset):
    decoder_metrics = perplexities[2]
    split = load_split(str(tiny_dataset), "test")
    nll = memory_nll = 0.0
    rows = 0
    for begin, end, row_begin, row_end in split.windows:
        ids = torch.from_numpy(np.asarray(split.tokens[begin:end], dtype=np.int64))[None]
        scored = slice(row_begin - begin, row_end - begin)
        labels = ids[0, row_begin + 1 - begin: row_end + 1 - begin]
        log_p = hand_decoder_log_probs(parts["base"], parts["decoder"], ids, LMBDA, MEMORY_TEMP)[0, scored]
        log_q = hand_decoder_log_probs(parts["base"], parts["decoder"], ids, 1.0, MEMORY_TEMP)[0, scored]
        nll -= log_p[torch.arange(len(labels)), labels].sum().item()
        memory_nll -= log_q[torch.arange(len(labels)), labels].sum().item()
        rows += len(labels)
    assert decoder_metrics["memory_layer"] is None and decoder_metrics["base_check"]["memory_kind"] == "memory_decoder"
    assert decoder_metrics["perplexity"] == pytest.approx(math.exp(nll / rows), rel=1e-5)
    assert decoder_metrics["memory_perplexity"] == pytest.approx(math.exp(memory_nll / rows), rel=1e-5)
    assert decoder_metrics["perplexity"] != pytest.approx(decoder_metrics["base_perplexity"], rel=1e-3)


def test_eval_qa_and_demo_on_a_joint_directory_give_the_same_answers(parts, tmp_path):
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text("".join(json.dumps({"question": f"{a} {b} {c}", "answer": [d]}) + "\n"
                               for a, b, c, d in zip(WORDS, WORDS[3:], WORDS[6:], WORDS[9:16])))
    common = ["--data_file", str(qa_file), "--prompt_template", "{question} .", "--max_new_tokens", "4",
              "--per_device_eval_batch_size", "3"]
    flags = qa_main(["--model_name_or_path", str(parts["base_dir"]), *common, "--output_dir", str(tmp_path / "flags"),
                     "--use_neural_knn", "--knn_generator_path", str(parts["root"] / "memory"), "--lmbda", str(LMBDA),
                     "--knn_temp", str(MEMORY_TEMP)])
    joint = qa_main(["--model_name_or_path", str(parts["joint_dir"]), *common, "--output_dir", str(tmp_path / "joint")])
    assert joint["use_neural_knn"] and joint["lmbda"] == LMBDA and joint["memory_temp"] == MEMORY_TEMP
    def read(name):
        return [json.loads(line)["continuation"] for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]

    assert read("joint") == read("flags")
    assert joint["exact_match"] == flags["exact_match"]
    decoder = qa_main(["--model_name_or_path", str(parts["base_dir"]), *common, "--output_dir",
                       str(tmp_path / "decoder"), "--use_neural_knn", "--knn_generator_path",
                       str(parts["root"] / "decoder")])
    assert decoder["base_check"]["memory_kind"] == "memory_decoder" and decoder["lmbda"] == 0.5

    demo = ["--prompt", "the king was born", "--prompt", "a river city", "--max_new_tokens", "5"]
    demo_flags = demo_main(["--model_name_or_path", str(parts["base_dir"]), "--knn_generator_path",
                            str(parts["root"] / "memory"), "--lmbda", str(LMBDA), "--knn_temp", str(MEMORY_TEMP), *demo])
    demo_joint = demo_main(["--model_name_or_path", str(parts["joint_dir"]), *demo])
    assert demo_joint["examples"] == demo_flags["examples"]
    assert demo_joint["summary"]["lmbda"] == LMBDA
    demo_decoder = demo_main(["--model_name_or_path", str(parts["base_dir"]), "--knn_generator_path",
                              str(parts["root"] / "decoder"), *demo])
    assert len(demo_decoder["examples"]) == 2


def test_a_memory_decoder_joint_model_saves_and_loads(parts, tmp_path):
    joint = MLPMemoryForCausalLM.from_parts(parts["base"], parts["decoder"], LMBDA, MEMORY_TEMP)
    joint.save_pretrained(tmp_path / "md")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "md")
    assert loaded.config.memory_kind == "memory_decoder" and loaded.config.memory_layer is None
    ids, mask = left_padded()
    kwargs = generate_kwargs(ids, mask, do_sample=False, num_beams=2)
    assert torch.equal(loaded.generate(**kwargs), JointLM(parts["base"], parts["decoder"], LMBDA, MEMORY_TEMP).generate(**kwargs))
