"""The one loader (models/joint/loading.py): Memory Decoders saved as pytorch_model.bin, the memory's dtype, and what
evaluate_joint leaves in its output directory."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate_joint
from models import load_memory
from models.joint import JointLM
from models.joint.loading import load_joint
from models.joint.settings import DOWNSTREAM, MemoryArguments
from models.joint.token_memory import load_any_memory
from models.memory_directory import save_memory as save_with_checksums
from tests.conftest import tiny_model
from tests.models.test_joint_perplexity import save_memory
from utils.arguments import PretrainedModelArguments
from utils.artifacts.dataset import load_split
from utils.io import ArtifactError

LMBDA = 0.4


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, tiny_gpt2_dir):
    """A tiny Memory Decoder (a 1-layer Llama over the base's tokens) saved twice: safetensors, and pytorch_model.bin
    only, as a Memory Decoder's training saves it."""
    root = tmp_path_factory.mktemp("decoders")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    decoder = tiny_model("llama", len(tokenizer), seed=2, num_hidden_layers=1)
    decoder.save_pretrained(root / "safetensors")
    decoder.config.save_pretrained(root / "bin")  # transformers 5 saves safetensors only: the .bin as torch.save writes it
    torch.save(decoder.state_dict(), root / "bin" / "pytorch_model.bin")
    for directory in ("safetensors", "bin"):
        tokenizer.save_pretrained(root / directory)
    assert sorted(p.name for p in (root / "bin").glob("*.bin")) == ["pytorch_model.bin"]
    assert not list((root / "bin").glob("*.safetensors"))
    return root


def test_a_memory_decoder_saved_as_pytorch_model_bin_loads(decoders, tiny_gpt2_dir):
    model_args = PretrainedModelArguments(model_name_or_path=str(tiny_gpt2_dir))
    loaded = load_joint(model_args, MemoryArguments(memory=str(decoders / "bin"), lmbda=[LMBDA]), DOWNSTREAM)
    assert loaded.memory.kind == "memory_decoder" and loaded.record["base_check"]["memory_kind"] == "memory_decoder"
    reference = JointLM(loaded.model, load_any_memory(str(decoders / "safetensors")), LMBDA)
    ids = torch.randint(3, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.joint().log_probs(ids), reference.log_probs(ids))


class Planted:
    """Unpickling this would create a file: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_planted_pickle_object_is_refused_without_running(decoders, tmp_path, tiny_gpt2_dir):
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "config.json").write_text((decoders / "bin" / "config.json").read_text())
    state = torch.load(decoders / "bin" / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "it-ran"
    torch.save({**state, "extra": Planted(marker)}, planted / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin: refused, it is not a plain tensor state dict"):
        load_any_memory(str(planted))
    with pytest.raises(ArtifactError, match="weights_only=True"):
        load_joint(PretrainedModelArguments(model_name_or_path=str(tiny_gpt2_dir)),
                   MemoryArguments(memory=str(planted)), DOWNSTREAM)
    assert not marker.exists()


def joint_perplexity_by_jointlm(base, memory, split) -> float:
    """The joint perplexity of the scored rows of every window, from `JointLM.log_probs` over the whole window."""
    joint = JointLM(base, memory, LMBDA)
    nll, rows = 0.0, 0
    for begin, end, row_begin, row_end in split.windows:
        ids = torch.from_numpy(np.asarray(split.tokens[begin:end], dtype=np.int64))[None]
        labels = ids[0, row_begin + 1 - begin: row_end + 1 - begin]
        log_p = joint.log_probs(ids)[0, row_begin - begin: row_end - begin].double()
        nll -= log_p[torch.arange(len(labels)), labels].sum().item()
        rows += len(labels)
    return math.exp(nll / rows)


def test_a_bfloat16_memory_computes_the_same_in_evaluate_joint_and_jointlm(tmp_path, tiny_dataset, tiny_gpt2_dir):
    """A memory saved in bfloat16 meets a float32 base: every entry point casts it to the base's dtype."""
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    split = load_split(str(tiny_dataset), "test")
    save_memory(tmp_path / "f32", base.config, split.meta["tokenizer"]["fingerprint"])
    save_with_checksums(tmp_path / "bf16", load_memory(str(tmp_path / "f32")).to(torch.bfloat16), {}, {})
    assert load_memory(str(tmp_path / "bf16")).dtype == torch.bfloat16
    metrics = evaluate_joint.main(["--model_name_or_path", str(tiny_gpt2_dir), "--dataset_name", str(tiny_dataset),
                                   "--dataset_split_name", "test", "--per_device_eval_batch_size", "3",
                                   "--memory", str(tmp_path / "bf16"), "--lmbda", str(LMBDA),
                                   "--output_dir", str(tmp_path / "out")])
    assert metrics["dtype"] == "float32"
    expected = joint_perplexity_by_jointlm(base, load_memory(str(tmp_path / "bf16")), split)
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-6)
    # the memory run in bfloat16 (inputs rounded to bfloat16) would give another number: the test can tell
    in_bf16 = joint_perplexity_by_jointlm(base.to(torch.bfloat16), load_memory(str(tmp_path / "bf16")), split)
    assert in_bf16 != pytest.approx(expected, rel=1e-6)


def test_a_rerun_with_one_lmbda_leaves_no_stale_sweep(tmp_path, tiny_dataset, tiny_gpt2_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    fingerprint = load_split(str(tiny_dataset), "test").meta["tokenizer"]["fingerprint"]
    memory = save_memory(tmp_path / "memory", base.config, fingerprint)
    common = ["--model_name_or_path", str(tiny_gpt2_dir), "--dataset_name", str(tiny_dataset), "--eval_subset",
              "test", "--max_eval_samples", "3", "--memory", str(memory), "--output_dir", str(tmp_path / "out")]
    evaluate_joint.main([*common, "--lmbda", "0.25", "0.5"])
    assert (tmp_path / "out" / "lmbda_sweep.md").is_file() and (tmp_path / "out" / "lmbda_sweep.png").is_file()
    metrics = evaluate_joint.main([*common, "--lmbda", "0.3"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["all_results.json", "joint_results.json"]
    saved = json.loads((tmp_path / "out" / "joint_results.json").read_text())
    assert saved["lmbda"] == metrics["lmbda"] == 0.3 and [e["lmbda"] for e in saved["lmbda_sweep"]] == [0.3]
    assert saved["lmbda_source"] == "--lmbda" and saved["threads"] == torch.get_num_threads()
    default = evaluate_joint.main(common)
    assert default["lmbda"] == 0.25 and default["lmbda_source"] == "the default for perplexity"
