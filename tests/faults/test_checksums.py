"""Artifacts whose bytes changed on disk after they were written are refused by the stages that read them.

Real artifacts built by the real writers in tmp_path, bytes corrupted in place, then the real consumer:
it must stop with an `ArtifactError` naming the file (and its first bad block) instead of building on it.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

import train_mlpmem_offline
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.knn_targets import TargetSettings, compute_knn_targets
from models import MemoryConfig, build_memory, load_memory
from models.memory_directory import save_memory
from tests.conftest import REPO
from tests.knn_fixtures import random_datastore
from utils import checksums, verify
from utils.artifacts.dataset import load_split
from utils.artifacts.datastore import load_datastore
from utils.artifacts.knn_targets import check_targets_for_datastore, load_knn_targets
from utils.cli import UsageError
from utils.io import ArtifactError, array_sha256, read_json, write_json

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

ROWS, DIM, VOCAB = 1200, 8, 40
FLAT = IndexSettings(index_type="flat")
TARGETS = TargetSettings(k=8, knn_temp=1.0)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """4 KiB blocks, so that the tiny files have several and the error can name which one."""
    monkeypatch.setattr(checksums, "BLOCK_BYTES", 4096)


@pytest.fixture
def dstore(tmp_path):
    """A datastore (keys 19,328 bytes = 5 blocks of 4 KiB; vals 4,928 bytes = 2 blocks) with its exact index."""
    path = random_datastore(tmp_path / "dstore", ROWS, DIM, VOCAB, seed=0)
    build_index(str(path), settings=FLAT, show_progress=False)
    return path


def overwrite_values(path, begin: int, end: int, value) -> None:
    """Overwrite rows [begin, end) of a .npy file in place, through a read-write memory map."""
    array = np.load(path, mmap_mode="r+")
    array[begin:end] = value
    array.flush()
    del array


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def targets_of(dstore, tmp_path):
    compute_knn_targets(str(dstore), str(tmp_path / "targets"), settings=TARGETS)
    return tmp_path / "targets"


def strip_checksums(directory) -> None:
    """Make an artifact look like one written before block checksums were recorded."""
    meta = read_json(directory / "meta.json")
    meta.pop("checksums", None)
    write_json(directory / "meta.json", meta)


def test_a_mismatch_names_the_file_its_first_bad_block_bytes_and_rows(tmp_path):
    keys = np.arange(1000 * 8, dtype=np.float16).reshape(1000, 8)  # 16 bytes a row
    np.save(tmp_path / "keys.npy", keys)
    record, sha256 = checksums.checksum_npy(tmp_path / "keys.npy")
    assert sha256 == array_sha256(keys)  # the identity meta.json already recorded, from the same read
    assert (record["algorithm"], record["block_bytes"], len(record["blocks"])) == ("xxh3_128", 4096, 4)
    meta = {"checksums": {"keys.npy": record}}
    assert checksums.verify_files(tmp_path, meta) is True

    flip_byte(tmp_path / "keys.npy", 3 * 4096 + 100)
    with pytest.raises(ArtifactError, match=r"keys\.npy block 3 \(bytes 12,288-16,127, rows 760-999\) does not match "
                                            r"meta\.json: the file changed or is corrupt"):
        checksums.verify_files(tmp_path, meta)
    np.save(tmp_path / "keys.npy", keys[:900])
    with pytest.raises(ArtifactError, match=r"keys\.npy is 14,528 bytes, meta\.json records 16,128"):
        checksums.verify_files(tmp_path, meta)


def test_values_overwritten_in_the_datastore_stop_the_index_and_the_targets(dstore, tmp_path):
    overwrite_values(dstore / "vals.npy", 100, 1100, VOCAB + 1)  # 1,000 values
    with pytest.raises(ArtifactError, match=r"vals\.npy block 0 \(bytes 0-4,095, rows 0-991\) does not match"):
        build_index(str(dstore), str(tmp_path / "index2"), settings=FLAT, show_progress=False)
    with pytest.raises(ArtifactError, match=r"^--dstore_path .*vals\.npy block 0"):
        compute_knn_targets(str(dstore), str(tmp_path / "targets"), settings=TARGETS)
    assert not (tmp_path / "targets").exists() and not (tmp_path / "targets.partial").exists()


def test_flipped_bytes_in_the_keys_are_located(dstore, tmp_path):
    flip_byte(dstore / "keys.npy", 5000)  # block 1: bytes 4,096-8,191 hold rows 248-503
    with pytest.raises(ArtifactError, match=r"keys\.npy block 1 \(bytes 4,096-8,191, rows 248-503\)"):
        build_index(str(dstore), str(tmp_path / "index2"), settings=FLAT, show_progress=False)


def test_a_corrupt_index_stops_the_target_search(dstore, tmp_path):
    flip_byte(dstore / "index" / "index.faiss", 2000)
    with pytest.raises(ArtifactError, match=r"index\.faiss block 0 .*does not match"):
        compute_knn_targets(str(dstore), str(tmp_path / "targets"), settings=TARGETS)


def test_corrupt_targets_or_datastore_stop_offline_memory_training(dstore, tmp_path):
    targets = targets_of(dstore, tmp_path)
    load_knn_targets(targets)  # intact
    args = ["--knn_dstore_path", str(dstore), "--knn_save_path", str(targets), "--output_dir", str(tmp_path / "memory"),
            "--base_model_name", "tiny", "--disable_tqdm"]

    flip_byte(targets / "probs.npy", 200)
    with pytest.raises(ArtifactError, match=r"probs\.npy block 0"):
        load_knn_targets(targets)
    with pytest.raises(ArtifactError, match=r"probs\.npy block 0"):
        train_mlpmem_offline.main(args)

    overwrite_values(dstore / "vals.npy", 0, 1000, VOCAB + 1)
    with pytest.raises(ArtifactError, match=r"vals\.npy block 0"):
        train_mlpmem_offline.main(args)
    assert not (tmp_path / "memory" / "meta.json").exists()


def test_labels_are_compared_even_when_the_recorded_checksums_agree(dstore, tmp_path):
    """An unverified datastore (here: one predating block checksums, read with --allow_unverified) whose values
    changed after its targets were computed: both meta.json files still record the same vals_sha256, yet the
    targets must be refused."""
    targets = targets_of(dstore, tmp_path)
    strip_checksums(dstore)
    overwrite_values(dstore / "vals.npy", 10, 20, VOCAB + 1)
    with pytest.raises(UsageError, match="the gold token of row 10 is"):
        check_targets_for_datastore(load_knn_targets(targets), load_datastore(str(dstore), allow_unverified=True))


def test_a_corrupt_memory_is_refused_on_load(tmp_path):
    memory = build_memory(MemoryConfig.from_preset("tiny", hidden_size=DIM, vocab_size=VOCAB))
    meta = save_memory(tmp_path / "memory", memory, results={}, record={})
    assert sorted(meta["checksums"]) == ["config.json", "model.safetensors"]
    load_memory(tmp_path / "memory")
    flip_byte(tmp_path / "memory" / "model.safetensors", (tmp_path / "memory" / "model.safetensors").stat().st_size - 10)
    with pytest.raises(ArtifactError, match=r"model\.safetensors block \d+ \(bytes [\d,]+-[\d,]+\) does not match"):
        load_memory(tmp_path / "memory")
    load_memory(tmp_path / "memory", verify=False)  # the library's way round it, for a file known to be fine


def test_a_corrupt_dataset_split_is_refused(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    from utils.preprocess_dataset import main as preprocess

    preprocess(["--tokenizer_path", str(tiny_tokenizer_dir), "--output_dir", str(tmp_path / "data"), "--block_size",
                "32", "--stride", "16", "--train_file", str(tiny_corpus["train"]), "--test_file", str(tiny_corpus["test"])])
    meta = read_json(tmp_path / "data" / "meta.json")
    assert sorted(meta["checksums"]) == ["test/tokens.npy", "test/windows.npy", "train/tokens.npy", "train/windows.npy"]
    overwrite_values(tmp_path / "data" / "train" / "tokens.npy", 5, 6, 9999)
    load_split(str(tmp_path / "data"), "test")  # the other split is intact
    with pytest.raises(ArtifactError, match=r"train/tokens\.npy block 0 .*rows 0-"):
        load_split(str(tmp_path / "data"), "train")


def test_an_artifact_without_block_checksums_is_refused_unless_allowed_then_read_with_one_warning(dstore, tmp_path,
                                                                                                  caplog):
    strip_checksums(dstore)
    with pytest.raises(ArtifactError, match=r"records no block checksums, so its files cannot be verified .*"
                                            "--allow_unverified"):
        load_datastore(str(dstore))
    with pytest.raises(ArtifactError, match="--allow_unverified"):
        build_index(str(dstore), str(tmp_path / "index2"), settings=FLAT, show_progress=False)
    assert not (tmp_path / "index2").exists()
    with caplog.at_level(logging.WARNING, logger="utils.checksums"):
        load_datastore(str(dstore), allow_unverified=True)
        build_index(str(dstore), str(tmp_path / "index2"), settings=FLAT, show_progress=False, allow_unverified=True)
    warnings = [r.getMessage() for r in caplog.records if "read unverified" in r.getMessage()]
    assert len(warnings) == 1 and str(dstore) in warnings[0]


def test_verify_command(dstore, tmp_path, capsys):
    targets = targets_of(dstore, tmp_path)
    assert verify.main([str(tmp_path)]) == 0  # the datastore, its index/ and the targets, found below tmp_path
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 2 + 1 + 4 and lines[-1] == "3 verified"

    overwrite_values(dstore / "vals.npy", 0, ROWS, VOCAB + 1)
    result = subprocess.run([sys.executable, "-m", "utils.verify", str(dstore), str(targets)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"MISMATCH      {dstore / 'vals.npy'}: block 0 (bytes 0-4,095, rows 0-991)" in result.stdout
    assert f"ok            {dstore / 'index' / 'index.faiss'}" in result.stdout
    assert result.stdout.splitlines()[-1] == "2 verified, 1 mismatched"

    strip_checksums(targets)
    assert verify.main([str(targets)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"not recorded  {targets / name}" for name in
                                                    ("offsets.npy", "token_ids.npy", "probs.npy", "labels.npy")] + ["1 not recorded"]
    with pytest.raises(UsageError, match="holds no artifact"):
        verify.main([str(REPO / "scripts")])
