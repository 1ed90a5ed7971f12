"""Faults: one directory named through a symbolic link, links planted where a stage writes, and every stage on a full
disk (issue "Fidelity and the last unsafe corners", items 8, 9 and 12).

The full-disk cases write into a small tmpfs mounted for the test (root only; skipped with the reason elsewhere)
and check that each stage ends with one error naming the path, the bytes it needs and the bytes free, leaving
nothing that looks complete. The datastore writer runs in a subprocess: before the fix it died of SIGBUS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import train_base
import train_mlpmem_offline
from knn_utils import build_index, knnlm, saveKNNMulti
from tests.conftest import REPO
from tests.faults.test_locks_and_errors import holder, one_error_line
from tests.knn_fixtures import cpu_launch_env, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from tests.models.test_memory_training import offline_args, pipeline  # noqa: F401  (pipeline: fixture)
from utils.io import ArtifactError, DiskFullError, preallocate
from utils.locking import artifact_lock, lock_file
from utils.preprocess_dataset import main as preprocess

ENV = {**cpu_launch_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SHORT = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--per_device_train_batch_size", "64",
         "--validation_rows", "64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def dataset_flags(tiny_corpus, tokenizer) -> list[str]:
    return ["--tokenizer_path", str(tokenizer), "--block_size", "32", "--stride", "16",
            *[arg for split, path in tiny_corpus.items() for arg in (f"--{split}_file", str(path))]]


# ---------------------------------------------------------------------------------------------------
# Item 8: the lock belongs to the directory, whatever its spelling


def test_a_directory_named_through_a_link_shares_its_lock(pipeline, tmp_path):  # noqa: F811
    out = tmp_path / "memory"
    out.mkdir()
    link = tmp_path / "same_memory"
    link.symlink_to(out)
    assert lock_file(link) == lock_file(out) == tmp_path / ".memory.lock"
    with holder((out, "--output_dir")):
        with pytest.raises(ArtifactError, match=r"--output_dir .*same_memory is being written by another run \(host "):
            train_mlpmem_offline.main(offline_args(pipeline, link, *SHORT))
        with pytest.raises(ArtifactError, match="being written by another run"):
            with artifact_lock(tmp_path / "sub" / ".." / "memory", "--output_dir"):
                pass
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# Item 9: no write follows a link out of the output


def test_a_metrics_file_that_is_a_link_is_refused_and_the_file_elsewhere_kept(pipeline, tmp_path):  # noqa: F811
    elsewhere = tmp_path / "other_run.jsonl"  # another run's log: before, training emptied it and appended its own
    elsewhere.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n')
    out = tmp_path / "memory"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=r"--output_dir .*memory: .*metrics\.jsonl is a symbolic link \(to "
                                            r".*other_run\.jsonl\); a stage never writes through a link"):
        train_mlpmem_offline.main(offline_args(pipeline, out, *SHORT))
    assert elsewhere.read_text() == '{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n'


def test_overwrite_output_dir_through_a_link_replaces_the_directory_it_names(pipeline, tmp_path):  # noqa: F811
    real = tmp_path / "real"
    train_mlpmem_offline.main(offline_args(pipeline, real, *SHORT))
    link = tmp_path / "link"
    link.symlink_to(real)
    (real / "stale.txt").write_text("from an earlier run")
    train_mlpmem_offline.main(offline_args(pipeline, link, *SHORT, "--overwrite_output_dir"))
    assert link.is_symlink() and (real / "meta.json").is_file() and not (real / "stale.txt").exists()


def test_a_staging_directory_that_is_a_link_is_refused(tiny_lm, tiny_corpus, tiny_tokenizer_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (tmp_path / "data.partial").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=r"--output_dir .*data: .*data\.partial is a symbolic link \(to "
                                            r".*elsewhere\); a stage writes its staging directory itself"):
        preprocess([*dataset_flags(tiny_corpus, tiny_tokenizer_dir), "--output_dir", str(tmp_path / "data")])
    (tmp_path / "dstore.partial").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match=r"--dstore_dir .*dstore: .*dstore\.partial is a symbolic link"):
        train_base.main(["--model_name_or_path", str(tiny_lm["model"]), "--dataset_name", str(tiny_lm["data"]),
                         "--do_eval", "--eval_subset", "test", "--save_knnlm_dstore", "--dstore_dir",
                         str(tmp_path / "dstore"), "--output_dir", str(tmp_path / "eval"), "--report_to", "none"])
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "dstore").exists()


# ---------------------------------------------------------------------------------------------------
# Item 12: a full disk


@contextmanager
def small_filesystem(path: Path, size_kb: int):
    """A tmpfs of ``size_kb`` KiB mounted at ``path`` for the block; skips the test where it cannot be mounted."""
    path.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which only root can mount; not root here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def nearly_full(path: Path, free_kb: int):
    """A directory on a 512 KiB file system with ``free_kb`` KiB left free."""
    with small_filesystem(path, 512) as disk:
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - free_kb * 1024))
        yield disk


@pytest.fixture
def full_disk(tmp_path):
    """A directory with one page (4 KiB) free: no artifact of the tiny pipeline fits."""
    with nearly_full(tmp_path / "disk", 4) as disk:
        yield disk


NEEDS = r"needs [\d,]+ bytes, the file system of .* has [\d,]+ free"


def test_preallocating_a_memory_mapped_file_on_a_full_disk_is_an_error(full_disk):
    """What stops the SIGBUS: a sparse file bigger than the free space (as `np.lib.format.open_memmap` creates it),
    its blocks reserved before it is mapped."""
    with open(full_disk / "keys.npy", "wb") as f:
        f.truncate(1 << 20)  # sparse: no block written yet
    with pytest.raises(DiskFullError, match=rf"--dstore_dir D: not enough space for .*keys\.npy: it needs 1,048,576 "
                                            r"bytes, the file system of .* has [\d,]+ free"):
        preallocate(full_disk / "keys.npy", "--dstore_dir D")


def test_the_datastore_writer_on_a_full_disk_exits_with_one_line(tiny_lm, tmp_path):
    """40 KiB free: room for the staging directory's small files and the sparse arrays' first and last pages, not for
    the 70 KB of rows between. Before: the process died of SIGBUS when it wrote the first window, with no message."""
    with nearly_full(tmp_path / "disk", 40) as disk:
        datastore_on_a_full_disk(tiny_lm, disk, tmp_path)


def datastore_on_a_full_disk(tiny_lm, full_disk: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "train_base", "--model_name_or_path", str(tiny_lm["model"]),
                             "--dataset_name", str(tiny_lm["data"]), "--do_eval", "--eval_subset", "train",
                             "--save_knnlm_dstore", "--dstore_dir", str(full_disk / "dstore"), "--output_dir",
                             str(tmp_path / "eval"), "--report_to", "none"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--dstore_dir {full_disk / 'dstore'}: not enough space for {full_disk / 'dstore.partial'}: it needs" in \
        one_error_line(result.stderr)
    assert not (full_disk / "dstore").exists()


def test_preprocessing_on_a_full_disk_names_the_path_and_the_space(tiny_corpus, tiny_tokenizer_dir, full_disk):
    with pytest.raises(DiskFullError, match=rf"--output_dir .*disk/data: not enough space for .*disk/data: it {NEEDS}"):
        preprocess([*dataset_flags(tiny_corpus, tiny_tokenizer_dir), "--output_dir", str(full_disk / "data")])
    assert not (full_disk / "data").exists()


def test_the_other_stages_on_a_full_disk_name_the_path_and_the_space(pipeline, tmp_path):  # noqa: F811
    """32 KiB free: the small files (locks, progress records, metrics) fit, the arrays and weights do not."""
    with nearly_full(tmp_path / "disk", 32) as disk:
        stages_on_a_full_disk(pipeline, disk)


def stages_on_a_full_disk(pipeline, full_disk: Path) -> None:  # noqa: F811
    with pytest.raises(DiskFullError, match=rf"Writing the index .*disk/index\.partial/.*\.faiss: not enough space for "
                                            rf".*disk/index\.partial.*: it {NEEDS}"):
        build_index.main(["--dstore_path", str(pipeline["dstore"]), "--index_path", str(full_disk / "index"),
                          "--index_type", "flat"])
    with pytest.raises(DiskFullError, match=rf"(chunk 0 of the kNN targets|Merging the kNN targets): not enough space "
                                            rf"for .*disk/targets\.partial.*: it {NEEDS}"):
        saveKNNMulti.main(["--dstore_path", str(pipeline["dstore"]), "--output_path", str(full_disk / "targets"),
                           "--k", "8"])
    with pytest.raises(DiskFullError, match=rf"--output_dir .*disk/memory: checkpoint step-00000001: not enough space "
                                            rf"for .*disk/memory/checkpoints: it {NEEDS}"):
        train_mlpmem_offline.main(offline_args(pipeline, full_disk / "memory", *SHORT))
    for artifact in ("index", "targets"):
        assert not (full_disk / artifact).exists()
    assert not (full_disk / "memory" / "meta.json").exists()


def test_a_disk_that_fills_while_writing_is_named_not_a_traceback(tiny_lm, tmp_path):
    """Where no size is known up front (here: the results of the kNN-LM on a disk with no page free), the library's
    OSError is caught and reported with the artifact and the free space."""
    with small_filesystem(tmp_path / "disk", 64) as disk:
        (disk / "filler").write_bytes(b"\0" * shutil.disk_usage(disk).free)
        if not (tiny_lm["dstore"] / "index").exists():
            build_index.main(["--dstore_path", str(tiny_lm["dstore"]), "--index_type", "flat"])
        with pytest.raises(DiskFullError, match=r"--output_dir .*disk/knnlm: the disk is full: writing .* failed "
                                                r"\(\[Errno 28\] No space left on device\); the file system of .* has 0 "
                                                "bytes free"):
            knnlm.main(["--model_name_or_path", str(tiny_lm["model"]), "--dataset_name", str(tiny_lm["data"]),
                        "--dstore_dir", str(tiny_lm["dstore"]), "--eval_subset", "test", "--max_eval_samples", "2",
                        "--k", "4", "--output_dir", str(disk / "knnlm")])
        assert not (disk / "knnlm" / "knnlm_results.json").exists()
