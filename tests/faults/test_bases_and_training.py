"""Faults: the kNN-LM with another base model, a block the base does not have, a memory whose loss turns NaN, and
the first metrics line after a resume (issue "Fidelity and the last unsafe corners", items 10 and 13).

Real entry points on the tiny pipeline (tiny GPT-2 -> datastore -> exact kNN targets), one torch thread.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import train_base
import train_mlpmem_offline
import train_mlpmem_online
from knn_utils import build_index, knnlm
from tests.faults.test_memory_faults import metrics_lines
from tests.knn_fixtures import make_tokenizer, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from tests.models.test_memory_training import offline_args, pipeline  # noqa: F401  (pipeline: fixture)
from utils.cli import UsageError
from utils.io import read_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------
# Item 10: the kNN-LM compares the base model's fingerprint with the datastore's


@pytest.fixture(scope="module")
def other_base(pipeline, tmp_path_factory):  # noqa: F811
    """A GPT-2 of the tiny model's shape with other weights (seed 1), the same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = make_tokenizer(tmp_path_factory.mktemp("other") / "model")
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=42, n_layer=2, n_embd=32, n_head=2, n_positions=64)).save_pretrained(directory)
    return directory


def knnlm_run(pipeline, model, out, dstore=None, *extra) -> dict:  # noqa: F811
    if not (pipeline["dstore"] / "index").exists():
        build_index.main(["--dstore_path", str(pipeline["dstore"]), "--index_type", "flat"])
    return knnlm.main(["--model_name_or_path", str(model), "--dataset_name", str(pipeline["data"]), "--dstore_dir",
                       str(dstore or pipeline["dstore"]), "--eval_subset", "test", "--max_eval_samples", "2", "--k", "8",
                       "--output_dir", str(out), *extra])


def test_the_knnlm_refuses_another_base_of_the_same_shape(pipeline, other_base, tmp_path):  # noqa: F811
    with pytest.raises(UsageError, match=r"--dstore_dir .*dstore \(the keys of a base model\) belongs to the base model "
                                         r"with fingerprint \w+, but --model_name_or_path .*other\d*/model has fingerprint "
                                         r"\w+.*--allow_base_mismatch"):
        knnlm_run(pipeline, other_base, tmp_path / "other")
    assert not (tmp_path / "other" / "knnlm_results.json").exists()
    allowed = knnlm_run(pipeline, other_base, tmp_path / "allowed", None, "--allow_base_mismatch")
    assert allowed["base_check"]["matches"] is False and allowed["base_check"]["allow_base_mismatch"] is True
    assert read_json(tmp_path / "allowed" / "knnlm_results.json")["base_check"]["matches"] is False


def test_the_knnlm_refuses_the_same_path_with_replaced_weights(pipeline, other_base, tmp_path):  # noqa: F811
    """The datastore records the base model's path; the weights at that path changed (retrained, overwritten)."""
    model = tmp_path / "model"
    shutil.copytree(pipeline["model"], model)
    dstore = tmp_path / "dstore"
    shutil.copytree(pipeline["dstore"], dstore)
    meta = read_json(dstore / "meta.json")
    meta["model"]["model_name_or_path"] = str(model)
    (dstore / "meta.json").write_text(json.dumps(meta))
    shutil.copy(other_base / "model.safetensors", model / "model.safetensors")
    with pytest.raises(UsageError, match="belongs to the base model with fingerprint"):
        knnlm_run(pipeline, model, tmp_path / "out", dstore)


def test_the_knnlm_accepts_its_base_on_a_copied_datastore_without_a_warning(pipeline, tmp_path, caplog):  # noqa: F811
    dstore = tmp_path / "copied"
    shutil.copytree(pipeline["dstore"], dstore)
    results = knnlm_run(pipeline, pipeline["model"], tmp_path / "out", dstore)
    assert results["base_check"]["matches"] is True
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "dstore" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------
# Item 13: a block the base model does not have; a loss that turns NaN; the first line logged after a resume


def test_online_training_refuses_a_block_the_base_does_not_have(pipeline, tmp_path):  # noqa: F811
    """Before: --dstore_layer 5 on a 2-block base wrapped round to block 1 and the memory recorded layer 1."""
    with pytest.raises(UsageError, match=r"--dstore_layer 5 is out of range for a base model with 2 blocks \(0 to 1, or "
                                         r"-2 to -1 from the last\)"):
        train_mlpmem_online.main(["--model_name_or_path", str(pipeline["model"]), "--dataset_name", str(pipeline["data"]),
                                  "--knn_save_path", str(pipeline["targets"]), "--output_dir", str(tmp_path / "memory"),
                                  "--dstore_layer", "5", "--max_train_steps", "1", "--base_model_name", "tiny"])
    assert not (tmp_path / "memory").exists()


def test_a_refused_dstore_layer_leaves_no_staging_directory(pipeline, tmp_path):  # noqa: F811
    """Before: the 700 KB staging directory was allocated before the block was checked."""
    with pytest.raises(UsageError, match="--dstore_layer 99 is out of range for a base model with 2 blocks"):
        train_base.main(["--model_name_or_path", str(pipeline["model"]), "--dataset_name", str(pipeline["data"]),
                         "--do_eval", "--eval_subset", "train", "--save_knnlm_dstore", "--dstore_dir",
                         str(tmp_path / "dstore"), "--dstore_layer", "99", "--output_dir", str(tmp_path / "eval"),
                         "--report_to", "none"])
    assert not (tmp_path / "dstore.partial").exists() and not (tmp_path / "dstore").exists()


def test_a_loss_that_turns_nan_stops_the_run_with_an_error(pipeline, tmp_path):  # noqa: F811
    """A learning rate of 1e30 sends the weights past float32 after one step: before, the NaN memory was saved and
    the run exited 0."""
    out = tmp_path / "memory"
    with pytest.raises(UsageError, match=r"Training diverged: the gradient norm is nan \(the loss of step \d+ is NaN or "
                                         r"infinite\), so the memory is not saved\. Lower --learning_rate \(now 1e\+30\)"):
        train_mlpmem_offline.main(offline_args(pipeline, out, "--learning_rate", "1e30", "--max_train_steps", "6",
                                               "--num_warmup_steps", "0", "--per_device_train_batch_size", "64",
                                               "--validation_rows", "64"))
    assert not (out / "meta.json").exists() and not (out / "model.safetensors").exists()


def test_the_first_line_logged_after_a_resume_is_an_uninterrupted_runs(pipeline, tmp_path):  # noqa: F811
    """Checkpoints every 2 steps, log lines every 3: the line of step 3 sums steps 1-3 in both runs (before, the
    resumed run's summed step 3 alone)."""
    args = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--logging_steps", "3", "--eval_steps", "6",
            "--per_device_train_batch_size", "64", "--validation_rows", "64"]
    resumed = tmp_path / "resumed"
    assert train_mlpmem_offline.main(offline_args(pipeline, resumed, *args), stop_after_steps=2) is None
    train_mlpmem_offline.main(offline_args(pipeline, resumed, *args))
    straight = tmp_path / "straight"
    train_mlpmem_offline.main(offline_args(pipeline, straight, *args))
    lines = metrics_lines(straight)
    assert [(line["type"], line["step"]) for line in lines] == [("train", 3), ("train", 6), ("validation", 6)]
    assert metrics_lines(resumed) == lines
