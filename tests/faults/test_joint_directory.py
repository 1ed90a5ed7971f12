"""A joint model directory (python -m models.convert --joint) whose bytes changed after it was written is refused.

Its meta.json records the block checksums of config.json and model.safetensors; every entry point that takes a
joint directory as --model_name_or_path goes through `models.joint.loading.load_joint`, which checks them first.
Before, 4 flipped bytes in model.safetensors gave another perplexity and QA answers, with exit status 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import evaluate_joint
from downstream import eval_qa, strategyqa
from models import MemoryConfig, build_memory
from models.convert import main as convert_main
from models.memory_directory import save_memory
from tests.conftest import REPO
from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.io import ArtifactError
from utils.modeling import model_fingerprint


@pytest.fixture(scope="module")
def joint_dir(tmp_path_factory, tiny_gpt2_dir, tiny_dataset):
    root = tmp_path_factory.mktemp("joint_faults")
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(
        base.config, num_layers=1, intermediate_size=48, layer=1,
        tokenizer_fingerprint=load_split(str(tiny_dataset), "test").meta["tokenizer"]["fingerprint"],
        base_model_fingerprint=model_fingerprint(base, 1)))
    save_memory(root / "memory", memory, {}, {})  # with its checksums, as train_mlpmem_* saves it
    assert convert_main(["--joint", "--base_model", str(tiny_gpt2_dir), "--memory", str(root / "memory"),
                         "--output", str(root / "joint"), "--lmbda", "0.5"]) == 0
    return root / "joint"


def flipped_copy(joint_dir, tmp_path):
    """A copy of the joint directory with 4 bytes of model.safetensors flipped, in the last tensor's data."""
    copy = tmp_path / "joint"
    shutil.copytree(joint_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for offset in range(len(data) - 64, len(data) - 60):
        data[offset] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


def test_the_joint_directory_records_checksums(joint_dir):
    meta = json.loads((joint_dir / "meta.json").read_text())
    assert {"config.json", "model.safetensors"} <= set(meta["checksums"])


def test_flipped_bytes_are_refused_by_every_entry_point(joint_dir, tmp_path, tiny_dataset):
    corrupt = flipped_copy(joint_dir, tmp_path)
    message = rf"{corrupt / 'model.safetensors'} .*block"
    with pytest.raises(ArtifactError, match=message):
        evaluate_joint.main(["--model_name_or_path", str(corrupt), "--dataset_name", str(tiny_dataset),
                             "--eval_subset", "test", "--output_dir", str(tmp_path / "ppl")])
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text(json.dumps({"question": "the king was", "answer": "born"}) + "\n")
    with pytest.raises(ArtifactError, match=message):
        eval_qa.main(["--model_name_or_path", str(corrupt), "--data_file", str(qa_file), "--output_dir",
                      str(tmp_path / "qa")])
    yes_no = tmp_path / "task.json"
    yes_no.write_text(json.dumps({"examples": [{"input": "Is it?", "target_scores": {"Yes": 1, "No": 0}}]}))
    with pytest.raises(ArtifactError, match=message):
        strategyqa.main(["--model_name_or_path", str(corrupt), "--data_file", str(yes_no), "--output_dir",
                         str(tmp_path / "yes_no")])
    assert not (tmp_path / "ppl" / "joint_results.json").exists() and not (tmp_path / "qa" / "qa_results.json").exists()


def test_the_command_exits_2_with_one_line(joint_dir, tmp_path, tiny_dataset):
    corrupt = flipped_copy(joint_dir, tmp_path)
    done = subprocess.run([sys.executable, "-m", "evaluate_joint", "--model_name_or_path", str(corrupt),
                           "--dataset_name", str(tiny_dataset), "--eval_subset", "test", "--output_dir",
                           str(tmp_path / "ppl")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {corrupt / 'model.safetensors'} ")
    assert "Traceback" not in done.stderr


def test_an_intact_joint_directory_is_verified_and_recorded(joint_dir, tmp_path, tiny_dataset):
    metrics = evaluate_joint.main(["--model_name_or_path", str(joint_dir), "--dataset_name", str(tiny_dataset),
                                   "--eval_subset", "test", "--max_eval_samples", "2", "--output_dir",
                                   str(tmp_path / "ppl")])
    assert metrics["joint_dir_verified"] is True and metrics["lmbda"] == 0.5
    assert metrics["lmbda_source"] == f"the joint directory {joint_dir}"


def test_outputs_named_through_a_link_are_written_where_it_points(joint_dir, tiny_gpt2_dir, tmp_path):
    """--output through a symbolic link, dangling or naming a directory: the directory it names is written (and, with
    --overwrite_output_dir, replaced), the link stays. Before, a dangling link failed in os.replace and
    --overwrite_output_dir in shutil.rmtree ("Cannot call rmtree on a symbolic link"), both as tracebacks."""
    memory = joint_dir.parent / "memory"
    real, link = tmp_path / "real", tmp_path / "link"
    link.symlink_to(real)  # dangling: real does not exist yet
    args = ["--joint", "--base_model", str(tiny_gpt2_dir), "--memory", str(memory), "--output", str(link), "--lmbda", "0.5"]
    assert convert_main(args) == 0
    assert link.is_symlink() and (real / "meta.json").is_file() and not (tmp_path / "link.partial").exists()
    assert (real / "model.safetensors").read_bytes() == (joint_dir / "model.safetensors").read_bytes()
    (real / "stale.txt").write_text("from an earlier build")
    with pytest.raises(UsageError, match="already exists; pass --overwrite_output_dir"):
        convert_main(args)
    assert convert_main([*args, "--overwrite_output_dir"]) == 0
    assert link.is_symlink() and (real / "meta.json").is_file() and not (real / "stale.txt").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)  # a memory the released layout has a form for
    save_memory(tmp_path / "gpt2_memory", build_memory(MemoryConfig.from_base(
        base.config, num_layers=1, intermediate_size=4 * base.config.n_embd, layer=1)), {}, {})
    official, official_link = tmp_path / "official", tmp_path / "official_link"
    official_link.symlink_to(official)
    assert convert_main(["--to", "official", "--input", str(tmp_path / "gpt2_memory"), "--base_model",
                         str(tiny_gpt2_dir), "--output", str(official_link)]) == 0
    assert official_link.is_symlink() and official.is_dir() and any(official.iterdir())
