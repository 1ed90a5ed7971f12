"""Faults around the memory: planted pickles, killed training, changed settings, stale logs, the wrong base model.

Each test fails without its fix (issue "Artifacts you can trust", items 3, 4, 6 and 8). Training runs on the tiny
pipeline of tests/models/test_memory_training.py (tiny GPT-2 -> datastore -> exact kNN targets) with one torch
thread, so that every run of the same settings gives the same bits, in this process or in a killed one.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate_joint
import train_base
import train_mlpmem_offline
import train_mlpmem_online
from demo.generation_example import main as demo_main
from downstream.eval_qa import main as qa_main
from models import MemoryConfig, build_memory, load_memory
from models.joint import JointLM, attach_memory
from models.memory_directory import save_memory
from tests.conftest import REPO, tiny_model
from tests.knn_fixtures import cpu_launch_env, make_tokenizer, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from tests.models.test_memory_training import final_weights, offline_args, pipeline  # noqa: F401  (pipeline: fixture)
from utils.artifacts.datastore import load_datastore
from utils.artifacts.knn_targets import load_knn_targets
from utils.cli import UsageError
from utils.io import ArtifactError
from utils.modeling import model_fingerprint, tokenizer_fingerprint

LAYER = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def metrics_lines(out) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "rows_per_second"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b) -> bool:
    a, b = final_weights(a), final_weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------
# Item 6: no pickle from disk


class Planted:
    """Unpickling this creates ``path``: the proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


STEPS = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--per_device_train_batch_size", "64",
         "--validation_rows", "64"]


@pytest.fixture(scope="module")
def stopped_run(pipeline, tmp_path_factory):  # noqa: F811
    """A run stopped after step 2, with its checkpoint of step 2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("stopped") / "memory"
    torch.set_num_threads(1)
    assert train_mlpmem_offline.main(offline_args(pipeline, out, *STEPS), stop_after_steps=2) is None
    return out


def checkpoint_of(out):
    (checkpoint,) = sorted((out / "checkpoints").iterdir())
    return checkpoint


def test_a_checkpoint_holds_no_pickle(stopped_run):
    names = sorted(p.name for p in checkpoint_of(stopped_run).iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng_state_0.json",
                     "rng_state_0.safetensors", "running_0.json", "scheduler.json", "trainer_state.json"]


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "notes.txt", "optimizer.safetensors"])
def test_a_planted_pickle_is_refused_and_never_runs(pipeline, stopped_run, tmp_path, name):  # noqa: F811
    """accelerate's names (it loaded custom_checkpoint_0.pkl with weights_only=False: the pickle ran), and pickle
    bytes under a harmless name or in place of one of our files."""
    out = tmp_path / "memory"
    shutil.copytree(stopped_run, out)
    marker = tmp_path / "the_pickle_ran"
    (checkpoint_of(out) / name).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ArtifactError, match=f"pickle format.*{name}.*--overwrite_output_dir"):
        train_mlpmem_offline.main(offline_args(pipeline, out, *STEPS))
    assert not marker.exists()


def test_a_pickled_memory_is_never_loaded(tmp_path):
    """The memory directory is read from safetensors only: a pytorch_model.bin beside config.json is not loaded."""
    memory = tmp_path / "memory"
    build_memory(MemoryConfig.from_preset("tiny", hidden_size=32, vocab_size=42)).save_pretrained(memory)
    (memory / "model.safetensors").unlink()
    marker = tmp_path / "the_pickle_ran"
    (memory / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ArtifactError, match="no meta.json"):
        load_memory(memory)
    with pytest.raises(UsageError, match="safetensors"):
        load_memory(memory, allow_unverified=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Items 6 and 8: a real training process killed with SIGKILL resumes exactly; a restart leaves no stale lines


KILL_RUN = ["--max_train_steps", "240", "--checkpointing_steps", "20", "--save_total_limit", "2",
            "--per_device_train_batch_size", "16", "--validation_rows", "64", "--eval_steps", "60"]


def test_resume_after_sigkill_matches_an_uninterrupted_run(pipeline, tmp_path):  # noqa: F811
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "train_mlpmem_offline", *offline_args(pipeline, killed, *KILL_RUN)],
                               cwd=REPO, env={**cpu_launch_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(killed.glob("checkpoints/step-*/trainer_state.json")):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL and not (killed / "meta.json").exists(), "finished before the kill"
    assert len(metrics_lines(killed)) >= 20

    train_mlpmem_offline.main(offline_args(pipeline, killed, *KILL_RUN))  # resumes from its newest checkpoint
    straight = tmp_path / "straight"
    train_mlpmem_offline.main(offline_args(pipeline, straight, *KILL_RUN))
    assert same_weights(straight, killed)
    assert metrics_lines(killed) == metrics_lines(straight)


def test_a_restart_before_the_first_checkpoint_leaves_no_stale_metrics(pipeline, tmp_path):  # noqa: F811
    args = ["--max_train_steps", "4", "--checkpointing_steps", "no", "--per_device_train_batch_size", "64",
            "--validation_rows", "64"]
    restarted = tmp_path / "restarted"
    train_mlpmem_offline.main(offline_args(pipeline, restarted, *args), stop_after_steps=3)
    assert [r["step"] for r in metrics_lines(restarted) if r["type"] == "train"] == [1, 2, 3]
    train_mlpmem_offline.main(offline_args(pipeline, restarted, *args))  # no checkpoint: from step 0 again
    straight = tmp_path / "straight"
    train_mlpmem_offline.main(offline_args(pipeline, straight, *args))
    assert metrics_lines(restarted) == metrics_lines(straight)
    assert [r["step"] for r in metrics_lines(restarted) if r["type"] == "train"] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------
# Item 4: a rerun with other settings does not resume the old run


@pytest.mark.parametrize("flag, value, saved, now", [
    ("--learning_rate", "1e-3", "0.0005", "0.001"),
    ("--alpha", "0.9", "0.5", "0.9"),
    ("--lr_scheduler_type", "cosine", "'linear'", "'cosine'"),
    ("--max_train_steps", "6", "4", "6"),
    ("--memory_dropout", "0.0", "None", "0.0"),
])
def test_a_rerun_with_other_settings_is_refused(pipeline, stopped_run, tmp_path, flag, value, saved, now):  # noqa: F811
    out = tmp_path / "memory"
    shutil.copytree(stopped_run, out)
    args = offline_args(pipeline, out, *STEPS)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(UsageError, match=rf"another run.*{flag} {saved} in the checkpoint, {now} now.*--overwrite_output_dir"):
        train_mlpmem_offline.main(args)


def test_logging_settings_may_change_on_resume(pipeline, stopped_run, tmp_path):  # noqa: F811
    out = tmp_path / "memory"
    shutil.copytree(stopped_run, out)
    train_mlpmem_offline.main(offline_args(pipeline, out, *STEPS, "--logging_steps", "3", "--save_total_limit", "3",
                                           "--eval_steps", "1", "--per_device_eval_batch_size", "7"))
    assert json.loads((out / "meta.json").read_text())["results"]["train_steps"] == 4


# ---------------------------------------------------------------------------------------------------
# Item 3: the memory belongs to one base model (same shape is not enough)


def save_base(directory, seed: int):
    """A GPT-2 of tiny_lm's shape and tokenizer (tests.knn_fixtures.make_model, make_tokenizer) with ``seed``'s weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=42, n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(directory)
    return make_tokenizer(directory)


@pytest.fixture(scope="module")
def other_base(pipeline, tmp_path_factory):  # noqa: F811
    """Another tiny_lm-shaped GPT-2 (seed 1) with the same tokenizer, and the datastore of its own keys over the same rows."""
    root = tmp_path_factory.mktemp("other_base")
    model = save_base(root / "model", seed=1)
    train_base.main(["--model_name_or_path", str(model), "--dataset_name", str(pipeline["data"]), "--do_eval",
                     "--eval_subset", "train", "--save_knnlm_dstore", "--dstore_dir", str(root / "dstore"),
                     "--output_dir", str(root / "eval"), "--per_device_eval_batch_size", "8", "--report_to", "none"])
    return {"model": model, "dstore": root / "dstore"}


def test_the_fingerprint_travels_from_the_datastore_to_the_memory(pipeline, stopped_run):  # noqa: F811
    from utils.arguments import ModelArguments
    from utils.modeling import load_causal_lm

    datastore = load_datastore(str(pipeline["dstore"]))
    expected = model_fingerprint(load_causal_lm(ModelArguments(model_name_or_path=str(pipeline["model"]))), LAYER)
    assert datastore.meta["model_fingerprint"] == expected
    targets = load_knn_targets(pipeline["targets"])
    assert targets.meta["queries"]["model_fingerprint"] == targets.meta["datastore"]["model_fingerprint"] == expected
    config = json.loads((checkpoint_of(stopped_run) / "trainer_state.json").read_text())["identity"]["memory"]
    assert config["base_model_fingerprint"] == expected


def test_offline_with_another_base_model_is_refused(pipeline, other_base, tmp_path):  # noqa: F811
    args = offline_args(pipeline, tmp_path / "m", "--max_train_steps", "1", "--validation_rows", "64",
                        "--model_name_or_path", str(other_base["model"]))
    with pytest.raises(UsageError, match="--knn_dstore_path .* fingerprint .* --model_name_or_path .*--allow_base_mismatch"):
        train_mlpmem_offline.main(args)
    train_mlpmem_offline.main([*args, "--allow_base_mismatch"])
    check = json.loads((tmp_path / "m" / "meta.json").read_text())["base_check"]
    assert check["matches"] is False and check["allow_base_mismatch"] is True


def test_online_with_targets_of_another_base_model_is_refused(pipeline, other_base, tmp_path):  # noqa: F811
    args = ["--model_name_or_path", str(other_base["model"]), "--dataset_name", str(pipeline["data"]),
            "--knn_save_path", str(pipeline["targets"]), "--output_dir", str(tmp_path / "m"), "--max_train_steps", "1",
            "--per_device_train_batch_size", "2", "--validation_rows", "50", "--base_model_name", "tiny", "--disable_tqdm"]
    with pytest.raises(UsageError, match="--knn_save_path .* fingerprint .*--allow_base_mismatch"):
        train_mlpmem_online.main(args)
    train_mlpmem_online.main([*args, "--allow_base_mismatch"])
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["base_check"]["matches"] is False and meta["base_model_fingerprint"] == meta["base_check"]["model_fingerprint"]


def test_a_fine_tuned_bases_memory_on_the_base_retrievers_targets(pipeline, other_base, tmp_path):  # noqa: F811
    """The real run's case: keys of one model, targets of another's retriever over the same rows. Allowed without
    the flag; the memory belongs to the model of its keys and meta.json records the targets' retriever."""
    args = offline_args(pipeline, tmp_path / "m", "--max_train_steps", "1", "--validation_rows", "64")
    args[args.index("--knn_dstore_path") + 1] = str(other_base["dstore"])
    train_mlpmem_offline.main(args)
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    keys = load_datastore(str(other_base["dstore"])).meta["model_fingerprint"]
    retriever = load_datastore(str(pipeline["dstore"])).meta["model_fingerprint"]
    assert keys != retriever
    assert load_memory(tmp_path / "m").config.base_model_fingerprint == meta["base_model_fingerprint"] == keys
    assert meta["knn_targets"]["retriever"]["model_fingerprint"] == retriever


# ---------------------------------------------------------------------------------------------------
# Item 3: where a memory meets a base model (evaluate_joint, JointLM / attach_memory, QA, the demo)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_gpt2_dir, tiny_tokenizer_dir):
    """tiny_gpt2_dir, another GPT-2 of its shape (seed 1) with the same tokenizer, and memories trained 'for' the first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bases")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    other = root / "other"
    tiny_model("gpt2", len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    record = {"layer": LAYER, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
              "base_model_fingerprint": model_fingerprint(base, LAYER)}
    memories = {}
    for name, fields in (("memory", {}), ("other_tokenizer", {"tokenizer_fingerprint": "another-tokenizer"}),
                         ("legacy", {"base_model_fingerprint": None})):
        torch.manual_seed(0)
        memory = build_memory(MemoryConfig.from_base(base.config, num_layers=1, intermediate_size=48, **{**record, **fields}))
        save_memory(root / name, memory, results={}, record={})
        memories[name] = root / name
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": ["river"]}) + "\n" for q in ("the city of", "a king")))
    return {"base": tiny_gpt2_dir, "other": other, "qa": qa, **memories}


MISMATCH = "belongs to the base model with fingerprint .* but the base model .* has fingerprint .*--allow_base_mismatch"


def test_evaluate_joint_refuses_another_base_of_the_same_shape(bases, tiny_dataset, tmp_path):
    def run(model, *extra):
        return evaluate_joint.main(["--model_name_or_path", str(model), "--dataset_name", str(tiny_dataset),
                                    "--eval_subset", "test", "--max_eval_samples", "2", "--output_dir", str(tmp_path),
                                    "--knn_generator_path", str(bases["memory"]), *extra])

    assert run(bases["base"])["base_check"]["matches"] is True
    with pytest.raises(UsageError, match=MISMATCH):
        run(bases["other"])
    run(bases["other"], "--allow_base_mismatch")
    check = json.loads((tmp_path / "joint_results.json").read_text())["base_check"]
    assert check["matches"] is False and check["allow_base_mismatch"] is True


def test_joint_lm_and_attach_memory_refuse_another_base(bases):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(bases["other"])
    memory = load_memory(bases["memory"])
    with pytest.raises(UsageError, match=MISMATCH):
        JointLM(other, memory)
    with pytest.raises(UsageError, match=MISMATCH), attach_memory(other, memory):
        pass
    assert not other.get_output_embeddings()._forward_hooks
    joint = JointLM(other, memory, allow_base_mismatch=True)
    assert joint.base_check["matches"] is False
    ids = torch.tensor([[3, 4, 5]])
    assert joint.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2).shape == (1, 5)
    assert JointLM(AutoModelForCausalLM.from_pretrained(bases["base"]), memory).base_check["matches"] is True
    with pytest.raises(UsageError, match="tokenizer fingerprint"):
        JointLM(other, memory, tokenizer_fingerprint="another-tokenizer", allow_base_mismatch=True)


def test_a_memory_without_a_fingerprint_is_accepted_with_one_warning(bases, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bases["other"])
    memory = load_memory(bases["legacy"])
    with caplog.at_level(logging.WARNING):
        assert JointLM(model, memory).base_check["matches"] is None
        ids = torch.tensor([[3, 4, 5]])
        JointLM(model, memory).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    assert sum("records no base model fingerprint" in r.getMessage() for r in caplog.records) == 1


def test_qa_refuses_another_base_and_another_tokenizer(bases, tmp_path):
    def run(model, memory, *extra):
        return qa_main(["--model_name_or_path", str(model), "--data_file", str(bases["qa"]), "--output_dir",
                        str(tmp_path), "--max_new_tokens", "2", "--use_neural_knn", "--knn_generator_path", str(memory),
                        *extra])

    with pytest.raises(UsageError, match=MISMATCH):
        run(bases["other"], bases["memory"])
    with pytest.raises(UsageError, match="tokenizer fingerprint another-tokenizer"):
        run(bases["base"], bases["other_tokenizer"])
    run(bases["other"], bases["memory"], "--allow_base_mismatch")
    check = json.loads((tmp_path / "qa_results.json").read_text())["base_check"]
    assert check["matches"] is False and check["allow_base_mismatch"] is True


def test_the_demo_refuses_another_base_and_another_tokenizer(bases, tmp_path):
    def run(model, memory, *extra):
        return demo_main(["--model_name_or_path", str(model), "--knn_generator_path", str(memory), "--prompt",
                          "the city of", "--max_new_tokens", "2", *extra])

    with pytest.raises(UsageError, match=MISMATCH):
        run(bases["other"], bases["memory"])
    with pytest.raises(UsageError, match="tokenizer fingerprint another-tokenizer"):
        run(bases["base"], bases["other_tokenizer"])
    check = run(bases["other"], bases["memory"], "--allow_base_mismatch")["summary"]["base_check"]
    assert check["matches"] is False and check["allow_base_mismatch"] is True
