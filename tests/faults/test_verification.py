"""Faults: verification that metadata could switch off, joint and memory directories that were never verified, bad
metadata and config files, planted pickles in model directories, absurd sizes, shard names pointing elsewhere, and a
reader meeting a staging directory that is still being written (issue "Fidelity and the last unsafe corners",
items 7, 11, 12 and 13).

Every test runs the real readers, `python -m utils.verify` and the entry points on the tiny fixtures; each fails on
the code before the fix (verified by running it there).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import evaluate_joint
import train_base
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import load_index
from models import MemoryConfig, build_memory, load_memory
from models.joint.build import main as build_joint
from models.memory_directory import save_memory
from tests.conftest import REPO
from tests.faults.test_locks_and_errors import holder, one_error_line
from tests.knn_fixtures import cpu_launch_env, random_datastore
from utils import verify
from utils.arguments import ModelArguments
from utils.artifacts.datastore import load_datastore
from utils.checksums import checksum_npy
from utils.io import ArtifactError, read_json, write_json
from utils.modeling import load_causal_lm, model_fingerprint, tokenizer_fingerprint

ENV = {**cpu_launch_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LAYER = 1


def edit_meta(directory: Path, change) -> None:
    meta = read_json(directory / "meta.json")
    change(meta)
    write_json(directory / "meta.json", meta)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


@pytest.fixture
def dstore(tmp_path) -> Path:
    return random_datastore(tmp_path / "dstore", rows=600, dim=8, vocab=50, seed=0)


@pytest.fixture(scope="module")
def joint(tiny_gpt2_dir, tiny_tokenizer_dir, tmp_path_factory) -> dict:
    """A memory written by `save_memory` (meta.json with block checksums) for tiny_gpt2_dir, and the joint model
    directory built from the two by ``python -m models.convert --joint``."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("joint")
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(
        base.config, num_layers=1, intermediate_size=48, layer=LAYER, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        base_model_fingerprint=model_fingerprint(base, LAYER)))
    save_memory(root / "memory", memory, results={}, record={})
    assert build_joint(["--base_model", str(tiny_gpt2_dir), "--memory", str(root / "memory"), "--output",
                        str(root / "joint"), "--lmbda", "0.5"]) == 0
    return {"root": root, "memory": root / "memory", "joint": root / "joint", "base": tiny_gpt2_dir}


# ---------------------------------------------------------------------------------------------------
# Item 7: utils.verify checks joint and memory directories


def test_verify_checks_a_joint_and_a_memory_directory(joint, tmp_path, capsys):
    assert verify.main([str(joint["root"])]) == 0
    out = capsys.readouterr().out
    for directory in (joint["joint"], joint["memory"]):
        for name in ("config.json", "model.safetensors"):
            assert f"ok            {directory / name} (" in out
    assert out.splitlines()[-1] == "2 verified"

    damaged = tmp_path / "joint"
    shutil.copytree(joint["joint"], damaged)
    flip_byte(damaged / "model.safetensors", (damaged / "model.safetensors").stat().st_size - 7)
    assert verify.main([str(damaged)]) == 1
    assert f"MISMATCH      {damaged / 'model.safetensors'}: block 0" in capsys.readouterr().out


def test_verify_lists_a_memory_without_meta_json_as_not_recorded(joint, tmp_path, capsys):
    memory = tmp_path / "memory"
    shutil.copytree(joint["memory"], memory)
    (memory / "meta.json").unlink()
    assert verify.main([str(memory)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"not recorded  {memory / name} (no meta.json)"
                                                    for name in ("config.json", "model.safetensors")] + ["1 not recorded"]


# ---------------------------------------------------------------------------------------------------
# Item 11: a record must cover its files; the identity hashes are checked; a missing record is an error


def test_an_empty_block_list_verifies_nothing_and_is_refused(dstore, capsys):
    edit_meta(dstore, lambda meta: meta["checksums"]["keys.npy"].update(blocks=[]))
    flip_byte(dstore / "keys.npy", 500)  # unseen by an empty block list
    with pytest.raises(ArtifactError, match=r"keys\.npy has 0 block checksums in meta\.json, but 9,728 bytes in blocks "
                                            r"of [\d,]+ make 1: the record does not cover the whole file"):
        load_datastore(str(dstore))
    assert verify.main([str(dstore)]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH      {dstore / 'keys.npy'}: has 0 block checksums" in out
    assert out.splitlines()[-1] == "1 mismatched"


def test_verify_compares_the_identity_sha256_recorded_beside_the_blocks(dstore, capsys):
    """Other keys with a block record made to match them: the blocks agree, the keys_sha256 that indexes, targets
    and memories refer to does not."""
    keys = np.load(dstore / "keys.npy")
    np.save(dstore / "keys.npy", keys[::-1])  # same size, other rows
    record, _ = checksum_npy(dstore / "keys.npy", read_json(dstore / "meta.json")["checksums"]["keys.npy"]["block_bytes"])
    edit_meta(dstore, lambda meta: meta["checksums"].update({"keys.npy": record}))
    load_datastore(str(dstore))  # a loader checks the blocks only (one fast read)
    assert verify.main([str(dstore)]) == 1
    out = capsys.readouterr().out
    assert (f"MISMATCH      {dstore / 'keys.npy'}: matches its block checksums, but its array's SHA-256" in out
            and "the file and its block record were replaced" in out)
    assert f"ok            {dstore / 'vals.npy'} (2,528 bytes, identity SHA-256 checked)" in out


def test_a_datastore_without_its_checksums_record_is_refused_unless_allowed(dstore):
    edit_meta(dstore, lambda meta: meta.pop("checksums"))
    with pytest.raises(ArtifactError, match="records no block checksums.*pass --allow_unverified"):
        load_datastore(str(dstore))
    assert load_datastore(str(dstore), allow_unverified=True).num_rows == 600
    edit_meta(dstore, lambda meta: meta.update(checksums={"keys.npy": meta_record(dstore, "keys.npy")}))
    with pytest.raises(ArtifactError, match=r"records no checksums for vals\.npy.*--allow_unverified"):
        load_datastore(str(dstore))  # one file's record deleted: that file would go unverified


def meta_record(dstore: Path, name: str) -> dict:
    return checksum_npy(dstore / name, 4096)[0]


def test_a_memory_without_meta_json_or_checksums_is_refused_unless_allowed(joint, tiny_dataset, tmp_path):
    """Altered weights and a deleted meta.json: before, one "older artifact" warning, and the memory was used."""
    memory = tmp_path / "memory"
    shutil.copytree(joint["memory"], memory)
    flip_byte(memory / "model.safetensors", (memory / "model.safetensors").stat().st_size - 7)
    (memory / "meta.json").unlink()
    with pytest.raises(ArtifactError, match=r"^--knn_generator_path .*memory: it has no meta\.json .*--allow_unverified"):
        load_memory(memory)
    with pytest.raises(ArtifactError, match="has no meta.json"):
        evaluate_joint.main(["--model_name_or_path", str(joint["base"]), "--dataset_name", str(tiny_dataset),
                             "--eval_subset", "test", "--max_eval_samples", "2", "--knn_generator_path", str(memory),
                             "--output_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval" / "joint_results.json").exists()
    load_memory(memory, allow_unverified=True)  # the explicit way round it

    shutil.copy(joint["memory"] / "meta.json", memory / "meta.json")
    edit_meta(memory, lambda meta: meta["checksums"].pop("model.safetensors"))
    with pytest.raises(ArtifactError, match=r"records no checksums for model\.safetensors"):
        load_memory(memory)


# ---------------------------------------------------------------------------------------------------
# Item 12: bad meta.json and config.json files, pickles and absurd sizes: one line naming the file


def test_a_meta_json_lacking_a_field_or_not_json_is_one_error_line(dstore, tmp_path):
    edit_meta(dstore, lambda meta: meta.pop("rows"))
    with pytest.raises(ArtifactError, match=rf"{dstore / 'meta.json'} lacks 'rows': it was edited or is corrupt"):
        load_datastore(str(dstore))
    result = subprocess.run([sys.executable, "-m", "knn_utils.build_index", "--dstore_path", str(dstore),
                             "--index_type", "flat"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "lacks 'rows'" in one_error_line(result.stderr)

    (dstore / "meta.json").write_text('{"kind": "datastore", "rows": ')
    with pytest.raises(ArtifactError, match="meta.json is truncated or corrupt"):
        load_datastore(str(dstore))
    assert verify.main([str(tmp_path)]) == 1  # before: a JSONDecodeError traceback


def test_a_memory_config_that_is_not_json_or_lacks_a_field_is_one_error_line(joint, tiny_dataset, tmp_path):
    memory = tmp_path / "memory"
    shutil.copytree(joint["memory"], memory)
    config = read_json(memory / "config.json")
    (memory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ArtifactError, match=r"config\.json lacks 'hidden_size'"):
        load_memory(memory, allow_unverified=True)
    (memory / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"config\.json is truncated or corrupt"):
        load_memory(memory, allow_unverified=True)
    with pytest.raises(ArtifactError, match=r"--knn_generator_path .*config\.json is truncated or corrupt"):
        evaluate_joint.main(["--model_name_or_path", str(joint["base"]), "--dataset_name", str(tiny_dataset),
                             "--eval_subset", "test", "--knn_generator_path", str(memory), "--output_dir",
                             str(tmp_path / "eval")])  # before: a JSONDecodeError traceback


class Planted:
    """Unpickling this creates ``path``: the proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_base_or_joint_directory_holding_only_a_pickle_is_refused(joint, tiny_dataset, tmp_path):
    marker = tmp_path / "the_pickle_ran"
    base = tmp_path / "base"
    shutil.copytree(joint["base"], base)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ArtifactError, match=r"--model_name_or_path .*pytorch_model\.bin is a pickle .*never loaded"):
        train_base.main(["--model_name_or_path", str(base), "--dataset_name", str(tiny_dataset), "--do_eval",
                         "--eval_subset", "test", "--output_dir", str(tmp_path / "eval"), "--report_to", "none"])
    joint_copy = tmp_path / "joint"
    shutil.copytree(joint["joint"], joint_copy)
    (joint_copy / "model.safetensors").unlink()
    (joint_copy / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin is a pickle"):
        evaluate_joint.main(["--model_name_or_path", str(joint_copy), "--dataset_name", str(tiny_dataset),
                             "--eval_subset", "test", "--output_dir", str(tmp_path / "eval2")])
    assert not marker.exists()


def test_absurd_sizes_in_a_config_are_refused_before_anything_is_built(joint, tiny_dataset, tmp_path):
    """An edited base vocabulary (an allocation of about 4e18 bytes before) and a memory of a million blocks (which
    ran past 300 s before) are refused at once, naming the file and the field."""
    base = tmp_path / "base"
    shutil.copytree(joint["base"], base)
    config = read_json(base / "config.json")
    write_json(base / "config.json", {**config, "vocab_size": 10**15})
    with pytest.raises(ArtifactError, match=r"--model_name_or_path .*config\.json: its sizes \(.*vocab_size "
                                            r"1,000,000,000,000,000.*\) make a model of at least .* GB, more than this "
                                            "machine's"):
        load_causal_lm(ModelArguments(model_name_or_path=str(base)))
    memory = tmp_path / "memory"
    shutil.copytree(joint["memory"], memory)
    write_json(memory / "config.json", {**read_json(memory / "config.json"), "num_layers": 10**6})
    (memory / "meta.json").unlink()  # else its checksums already refuse the edited config.json
    with pytest.raises(ArtifactError, match=r"config\.json: num_layers is 1,000,000, more blocks than any model has"):
        load_memory(memory, allow_unverified=True)
    joint_copy = tmp_path / "joint"
    shutil.copytree(joint["joint"], joint_copy)
    config = read_json(joint_copy / "config.json")
    config["text_config"]["n_embd"] = 10**9
    write_json(joint_copy / "config.json", config)
    with pytest.raises(ArtifactError, match=r"config\.json: its sizes .* make a model of at least"):
        evaluate_joint.main(["--model_name_or_path", str(joint_copy), "--dataset_name", str(tiny_dataset),
                             "--eval_subset", "test", "--output_dir", str(tmp_path / "eval")])


# ---------------------------------------------------------------------------------------------------
# Item 13: shard names inside the index; a reader meeting a staging directory asks its lock


def test_shard_names_must_stay_inside_the_index_directory(tmp_path):
    dstore = random_datastore(tmp_path / "dstore", rows=400, dim=8, vocab=50, seed=1)
    build_index(str(dstore), str(tmp_path / "index"), IndexSettings(index_type="flat", index_shards=2),
                show_progress=False)
    outside = tmp_path / "outside.faiss"
    shutil.copy(tmp_path / "index" / "shard_000.faiss", outside)

    def point_outside(meta):
        meta["shards"][0]["file"] = "../outside.faiss"
        meta["checksums"]["../outside.faiss"] = meta["checksums"].pop("shard_000.faiss")

    edit_meta(tmp_path / "index", point_outside)
    with pytest.raises(ArtifactError, match=r"shard file '\.\./outside\.faiss' is not a \.faiss file inside the index "
                                            "directory"):
        load_index(tmp_path / "index", load_datastore(str(dstore)))


def test_a_reader_meeting_a_staging_directory_being_written_says_to_wait(tmp_path):
    dstore = tmp_path / "dstore"
    (tmp_path / "dstore.partial").mkdir()
    with holder((dstore, "--dstore_dir")):
        with pytest.raises(ArtifactError, match=r"is not finished: another run is writing it now \(host .*, pid \d+.*\) "
                                                r"in .*dstore\.partial\. Wait for it to finish; do not delete"):
            load_datastore(str(dstore))
    with pytest.raises(ArtifactError, match="its stage was interrupted .* delete that directory to start over"):
        load_datastore(str(dstore))  # the writer is gone: now deleting it is the advice
    assert os.path.isdir(tmp_path / "dstore.partial")
