"""models/joint/perplexity.py and evaluate_joint: base, memory-alone and joint perplexity on a tiny GPT-2 with a tiny random memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import evaluate_joint
from models import MemoryConfig, build_memory, load_memory
from models.memory_directory import save_memory as write_memory
from tests.conftest import REPO
from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.windows import ROW_BEGIN, ROW_END

LAYER = 1
MEMORY_TEMP = 2.0
SWEEP = [0.0, 0.3, 1.0]


def save_memory(directory, base_config, fingerprint: str, seed: int = 0, **fields):
    """A tiny random memory for ``base_config`` (1 block, reading block LAYER), saved in ``directory``."""
    torch.manual_seed(seed)
    config = MemoryConfig.from_base(base_config, num_layers=1, intermediate_size=48, layer=LAYER,
                                    tokenizer_fingerprint=fingerprint, **fields)
    memory = build_memory(config)
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.3)  # far from the base model, so the mixture is not trivial
    write_memory(directory, memory, results={}, record={})
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dataset, tiny_gpt2_dir):
    root = tmp_path_factory.mktemp("joint")
    fingerprint = load_split(str(tiny_dataset), "test").meta["tokenizer"]["fingerprint"]
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    memory_dir = save_memory(root / "memory", base.config, fingerprint)
    common = ["--model_name_or_path", str(tiny_gpt2_dir), "--dataset_name", str(tiny_dataset),
              "--per_device_eval_batch_size", "3", "--knn_temp", str(MEMORY_TEMP)]
    sweep_out = root / "sweep"
    metrics = evaluate_joint.main([*common, "--do_test", "--dataset_split_name", "test", "--output_dir", str(sweep_out),
                                   "--knn_generator_path", str(memory_dir), "--report_to", "none",
                                   "--lmbda", *map(str, SWEEP)])
    return dict(root=root, common=common, memory_dir=memory_dir, base=base, fingerprint=fingerprint,
                metrics=metrics, sweep_out=sweep_out)


def hand_perplexities(model, memory, split, lmbda: float, memory_temp: float) -> tuple[float, float]:
    """Base and joint perplexity by hand in float64, one window at a time: p = (1 - l) p_lm + l q."""
    captured = {}
    hook = model.transformer.h[LAYER].mlp.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    base_nll = joint_nll = 0.0
    rows = 0
    try:
        with torch.no_grad():
            for begin, end, row_begin, row_end in split.windows:
                ids = torch.from_numpy(np.asarray(split.tokens[begin:end], dtype=np.int64))[None]
                logits = model(input_ids=ids).logits[0].double()  # (T, V)
                scored = slice(row_begin - begin, row_end - begin)
                labels = ids[0, row_begin + 1 - begin: row_end + 1 - begin]
                p_lm = torch.softmax(logits[scored], dim=-1)
                q = torch.softmax(memory(captured["x"][0, scored]).double() / memory_temp, dim=-1)
                p = (1 - lmbda) * p_lm + lmbda * q
                base_nll -= p_lm[torch.arange(len(labels)), labels].log().sum().item()
                joint_nll -= p[torch.arange(len(labels)), labels].log().sum().item()
                rows += len(labels)
    finally:
        hook.remove()
    return math.exp(base_nll / rows), math.exp(joint_nll / rows)


def test_lmbda_zero_gives_the_base_exactly(setup):
    metrics = setup["metrics"]
    assert metrics["eval_subset"] == "test" and metrics["memory_layer"] == LAYER
    assert [entry["lmbda"] for entry in metrics["lmbda_sweep"]] == SWEEP
    assert metrics["lmbda_sweep"][0]["perplexity"] == metrics["base_perplexity"]
    assert metrics["lmbda_sweep"][2]["perplexity"] == pytest.approx(metrics["memory_perplexity"], rel=1e-6)
    assert metrics["memory_perplexity"] != pytest.approx(metrics["base_perplexity"], rel=1e-3)


def test_joint_matches_hand_computation(setup, tiny_dataset):
    split = load_split(str(tiny_dataset), "test")
    memory = load_memory(setup["memory_dir"]).eval()
    base_ppl, joint_ppl = hand_perplexities(setup["base"].eval(), memory, split, SWEEP[1], MEMORY_TEMP)
    metrics = setup["metrics"]
    assert metrics["eval_tokens"] == split.windows[-1, ROW_END] - split.windows[0, ROW_BEGIN]
    assert metrics["base_perplexity"] == pytest.approx(base_ppl, rel=1e-6)
    assert metrics["lmbda_sweep"][1]["perplexity"] == pytest.approx(joint_ppl, rel=1e-6)  # the gold-only path
    assert min(base_ppl, metrics["memory_perplexity"]) != pytest.approx(joint_ppl, rel=1e-3)


def test_outputs_of_a_sweep_and_of_one_lmbda(setup):
    out = setup["sweep_out"]
    saved = json.loads((out / "joint_results.json").read_text())
    assert len(saved["lmbda_sweep"]) == len(SWEEP) and saved["memory_temp"] == MEMORY_TEMP
    assert saved["base_tokens_per_second"] > 0 and saved["joint_tokens_per_second"] > 0
    assert saved["perplexity"] == saved["lmbda_sweep"][0]["perplexity"]
    table = (out / "lmbda_sweep.md").read_text()
    assert table.count("\n| ") == len(SWEEP) + 2 + 1  # header, base, sweep, memory
    assert (out / "lmbda_sweep.png").read_bytes()[:4] == b"\x89PNG"

    single = setup["root"] / "single"
    metrics = evaluate_joint.main([*setup["common"], "--eval_subset", "test", "--max_eval_samples", "2",
                                   "--output_dir", str(single), "--knn_generator_path", str(setup["memory_dir"])])
    assert metrics["lmbda_sweep"][0]["lmbda"] == 0.25 and metrics["eval_windows"] == 2
    assert sorted(p.name for p in single.iterdir()) == ["all_results.json", "joint_results.json"]


@pytest.mark.parametrize("fields, message", [(dict(n_embd=16), "dimension 16.*hidden size is 32"),
                                             (dict(vocab_size=7), "predicts over 7 tokens")])
def test_memory_of_another_model_is_refused(setup, tmp_path, fields, message):
    other = setup["base"].config.__class__(**{**setup["base"].config.to_dict(), **fields})
    wrong = save_memory(tmp_path / "wrong", other, setup["fingerprint"])
    with pytest.raises(UsageError, match=message):
        evaluate_joint.main([*setup["common"], "--output_dir", str(tmp_path / "out"),
                             "--knn_generator_path", str(wrong)])


def test_conflicting_split_flags_are_refused(setup, tmp_path):
    with pytest.raises(UsageError, match="--do_test evaluates the test split"):
        evaluate_joint.main([*setup["common"], "--do_test", "--dataset_split_name", "validation", "--output_dir",
                             str(tmp_path), "--knn_generator_path", str(setup["memory_dir"])])


def test_cli_without_memory_exits_2_without_traceback(setup, tmp_path):
    result = subprocess.run([sys.executable, "-m", "evaluate_joint", *setup["common"], "--output_dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--knn_generator_path" in result.stderr and "Traceback" not in result.stderr


def test_the_logged_arguments_name_the_split_that_runs(tmp_path, capfd):
    with pytest.raises(UsageError):  # no such dataset: the arguments are logged before that is found out
        evaluate_joint.main(["--model_name_or_path", str(tmp_path / "m"), "--dataset_name", str(tmp_path / "d"),
                             "--do_test", "--output_dir", str(tmp_path / "o"), "--knn_generator_path", "g"])
    logged = capfd.readouterr().err
    assert "eval_subset='test'" in logged and "eval_subset='validation'" not in logged
