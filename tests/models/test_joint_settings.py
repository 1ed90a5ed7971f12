"""The settings of a memory in use (models/joint/settings.py): one group, its released aliases, one lmbda policy."""

from __future__ import annotations

import pytest

from demo.generation_example import main as demo_main
from downstream.eval_qa import QAArguments
from models.convert import main as convert_main
from models.joint.perplexity import JointArguments
from models.joint.settings import (BUILD, DOWNSTREAM, PERPLEXITY, MemoryArguments, resolve_lmbdas,
                                   resolve_memory_temp)
from utils.arguments import DataArguments, PretrainedModelArguments
from utils.cli import UsageError, parse_args

# The groups each entry point parses, with the memory's group among them.
ENTRY_POINTS = {
    "evaluate_joint": ((PretrainedModelArguments, DataArguments, JointArguments, MemoryArguments),
                       ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"]),
    "eval_qa": ((PretrainedModelArguments, QAArguments, MemoryArguments),
                ["--model_name_or_path", "m", "--data_file", "q.jsonl", "--output_dir", "o"]),
}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_the_released_flag_names_parse_to_the_same_settings(entry_point):
    groups, required = ENTRY_POINTS[entry_point]
    released = parse_args(groups, [*required, "--use_neural_knn", "--knn_generator_path", "mem", "--lmbda", "0.5",
                                   "--knn_temp", "0.8", "--allow_base_mismatch"])[-1]
    ours = parse_args(groups, [*required, "--use_neural_knn", "--memory", "mem", "--lmbda", "0.5", "--memory_temp",
                               "0.8", "--allow_base_mismatch"])[-1]
    assert released == ours == MemoryArguments(memory="mem", lmbda=[0.5], memory_temp=0.8, use_neural_knn=True,
                                               allow_base_mismatch=True)


def test_the_group_checks_its_values_once():
    assert MemoryArguments(lmbda=[0.0, 1.0]).lmbda == [0.0, 1.0]
    with pytest.raises(UsageError, match=r"--lmbda values must be in \[0, 1\], got 1.5"):
        MemoryArguments(lmbda=[0.25, 1.5])
    with pytest.raises(UsageError, match=r"--lmbda must be a finite number, got nan"):
        MemoryArguments(lmbda=[float("nan")])
    with pytest.raises(UsageError, match=r"--memory_temp \(--knn_temp\) must be a finite number > 0, got 0.0"):
        MemoryArguments(memory_temp=0.0)
    with pytest.raises(UsageError, match=r"--lmbda takes one value here, got 2 \(0.25 0.5\)"):
        MemoryArguments(lmbda=[0.25, 0.5]).one_lmbda()
    assert MemoryArguments(lmbda=[0.3]).one_lmbda() == 0.3 and MemoryArguments().one_lmbda() is None


def test_the_help_names_both_temperatures():
    from transformers import HfArgumentParser

    text = HfArgumentParser(MemoryArguments).format_help()
    assert "--knn_temp MEMORY_TEMP" in text and "--knn_generator_path MEMORY" in text
    assert "released name of --memory_temp: the temperature of the memory's logits" in " ".join(text.split())


def test_the_lmbda_policy_and_its_sources():
    joint = ("the joint directory J", 0.4)
    preset = ("--protocol nq", 0.75)
    assert resolve_lmbdas([0.1, 0.2], DOWNSTREAM, preset, joint) == ([0.1, 0.2], "--lmbda")
    assert resolve_lmbdas(None, DOWNSTREAM, preset, joint) == ([0.75], "--protocol nq")
    assert resolve_lmbdas(None, DOWNSTREAM, None, joint) == ([0.4], "the joint directory J")
    assert resolve_lmbdas(None, PERPLEXITY, None, joint) == ([0.4], "the joint directory J")
    assert resolve_lmbdas(None, PERPLEXITY) == ([0.25], "the default for perplexity")
    assert resolve_lmbdas(None, DOWNSTREAM) == ([0.5], "the default for downstream")
    with pytest.raises(UsageError, match="--lmbda is required"):
        resolve_lmbdas(None, BUILD)
    assert resolve_lmbdas(None, BUILD, None, joint) == ([0.4], "the joint directory J")
    assert resolve_memory_temp(None) == (1.0, "the default")
    assert resolve_memory_temp(None, ("the joint directory J", 0.7)) == (0.7, "the joint directory J")
    assert resolve_memory_temp(2.0, ("the joint directory J", 0.7)) == (2.0, "--memory_temp")


def test_tools_that_take_one_lmbda_refuse_several(tmp_path):
    with pytest.raises(UsageError, match="--lmbda takes one value here, got 2"):
        demo_main(["--prompt", "a", "--lmbda", "0.25", "0.5", "--quickstart_dir", str(tmp_path)])
    with pytest.raises(UsageError, match="--lmbda takes one value here, got 2"):
        convert_main(["--joint", "--base_model", "b", "--memory", "m", "--output", str(tmp_path / "j"), "--lmbda",
                      "0.25", "0.5"])
