"""kNN targets on disk: the sparse distribution a kNN-LM retriever gives each row (CSR), read, written and checked.

Layout of a target directory (rows in the order of the query datastore)::

    offsets.npy    int64   (N + 1,)  row i owns entries offsets[i]:offsets[i + 1]
    token_ids.npy  int32   (nnz,)    token ids, ascending within a row
    probs.npy      float16 (nnz,)    their probabilities, all > 0 (a row sums to 1 up to float16 rounding)
    labels.npy     int32   (N,)      the gold next token of each row
    meta.json      kind "knn_targets": the datastore and index it came from, k, knn_temp, threshold, rows, nnz,
                   the block checksums of the four arrays (utils/checksums.py: checked when the targets are opened)

A row with no neighbour at all (a one-row datastore, or an IVF search that found nothing) has no entries.

While the search runs (knn_utils/knn_targets.py), ``<output>.partial/chunks/NNNNNN/`` holds one finished
chunk of consecutive rows each (``counts.npy``, ``token_ids.npy``, ``probs.npy``), written under a
temporary name and renamed; `merge_chunks` concatenates them in row order into the arrays above.
Reading a target directory needs numpy only (no FAISS).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.artifacts.datastore import Datastore
from utils.checksums import record_checksums, verify_files
from utils.cli import UsageError
from utils.io import (NPY_HEADER_BYTES, ArtifactError, check_free_space, chunk_ranges, load_array, preallocate,
                      read_meta)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ID_DTYPE = np.int32
PROB_DTYPE = np.float16
DATA_FILES = ("offsets.npy", "token_ids.npy", "probs.npy", "labels.npy")
META_FIELDS = ("rows", "nnz")  # what readers take from meta.json
MERGE_ROWS = 1 << 22  # rows of labels and offsets merge_chunks handles at a time


@dataclass
class SparseRows:
    """Sparse per-row distributions of a block of consecutive rows."""

    counts: np.ndarray  # int64 (n,) entries per row
    token_ids: np.ndarray  # int32 (nnz,)
    probs: np.ndarray  # float16 (nnz,)

    @staticmethod
    def concatenate(parts: list["SparseRows"]) -> "SparseRows":
        return SparseRows(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("counts", "token_ids", "probs")))


class KnnTargets:
    """An opened target directory (memory-mapped). Never densified to (rows x vocab).

    With ``verify``, the files are checked against their block checksums before they are mapped (targets without
    them are refused unless ``allow_unverified``).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, allow_unverified: bool = False):
        self.path = Path(path)
        self.meta = read_meta(self.path, "knn_targets", META_FIELDS)
        if verify:
            verify_files(self.path, self.meta, list(DATA_FILES), allow_unverified)
        rows, nnz = self.meta["rows"], self.meta["nnz"]
        self.offsets = load_array(self.path / "offsets.npy", f"{rows + 1} int64 row offsets", mmap_mode="r")  # (N + 1,)
        self.token_ids = load_array(self.path / "token_ids.npy", f"{nnz} int32 token ids", mmap_mode="r")  # (nnz,)
        self.probs = load_array(self.path / "probs.npy", f"{nnz} float16 probabilities", mmap_mode="r")  # (nnz,)
        self.labels = load_array(self.path / "labels.npy", f"{rows} int32 gold tokens", mmap_mode="r")  # (N,)
        if self.offsets.shape != (rows + 1,) or self.labels.shape != (rows,) or len(self.token_ids) != nnz \
                or len(self.probs) != nnz or int(self.offsets[-1]) != nnz:
            raise ArtifactError(f"kNN targets {self.path}: array sizes do not match meta.json ({rows} rows, {nnz} entries)")

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and probabilities (float16) of row ``i``."""
        begin, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.token_ids[begin:end]), np.asarray(self.probs[begin:end])

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of several rows at once: (position in ``rows`` of each entry, token ids, probabilities).

        For a batch of logits ``z`` (B, V) whose row ``b`` is datastore row ``rows[b]``, the kNN term of
        the loss reads ``log_softmax(z)[entry_row, token_ids]`` -- (nnz_batch,) values, no dense target.
        """
        rows = np.asarray(rows, dtype=np.int64)
        begins, ends = self.offsets[rows], self.offsets[rows + 1]  # (B,) each
        counts = ends - begins
        entry_row = np.repeat(np.arange(len(rows)), counts)  # (nnz_batch,)
        first_entry = np.cumsum(counts) - counts  # (B,) where each row starts in the output
        positions = np.arange(int(counts.sum())) - first_entry[entry_row] + begins[entry_row]  # (nnz_batch,)
        return entry_row, np.asarray(self.token_ids[positions]), np.asarray(self.probs[positions])


def load_knn_targets(path: str | os.PathLike, verify: bool = True, allow_unverified: bool = False) -> KnnTargets:
    """Open a target directory written by `compute_knn_targets` (its files verified, with ``verify``)."""
    return KnnTargets(path, verify, allow_unverified)


# ---------------------------------------------------------------------------------------------------
# Writing: chunks of rows, then the merged arrays


def chunk_dir(staging: Path, chunk: int) -> Path:
    return staging / "chunks" / f"{chunk:06d}"


def write_chunk(staging: Path, chunk: int, targets: SparseRows) -> None:
    """Write one chunk under a temporary name and rename it: a chunk directory that exists is complete."""
    final = chunk_dir(staging, chunk)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    check_free_space(staging, sum(getattr(targets, name).nbytes + NPY_HEADER_BYTES
                                  for name in ("counts", "token_ids", "probs")), f"chunk {chunk} of the kNN targets")
    tmp.mkdir(parents=True)
    for name in ("counts", "token_ids", "probs"):
        np.save(tmp / f"{name}.npy", getattr(targets, name))
    os.replace(tmp, final)


def missing_chunks(staging: Path, num_rows: int, chunk_rows: int) -> list[int]:
    return [c for c in range(len(chunk_ranges(num_rows, chunk_rows))) if not chunk_dir(staging, c).exists()]


def merge_chunks(staging: Path, queries: Datastore, chunk_rows: int) -> dict:
    """Concatenate the chunk files in row order into the CSR arrays; return row/entry counts and the block
    checksums of the arrays (``meta.json``'s ``checksums``)."""
    num_chunks = len(chunk_ranges(queries.num_rows, chunk_rows))
    if missing := missing_chunks(staging, queries.num_rows, chunk_rows):
        raise ArtifactError(f"{staging}: chunks {missing[:5]} were never written")
    counts = [load_array(chunk_dir(staging, c) / "counts.npy", "the entry count of each row of the chunk", mmap_mode="r")
              for c in range(num_chunks)]
    nnz = int(sum(int(c.sum()) for c in counts))
    shapes = {"offsets.npy": (np.int64, queries.num_rows + 1), "token_ids.npy": (ID_DTYPE, nnz),
              "probs.npy": (PROB_DTYPE, nnz), "labels.npy": (ID_DTYPE, queries.num_rows)}
    check_free_space(staging, sum(np.dtype(dtype).itemsize * size + NPY_HEADER_BYTES for dtype, size in shapes.values()),
                     "Merging the kNN targets")
    arrays = {}
    for name, (dtype, size) in shapes.items():  # blocks reserved: a full disk is an error here, not a SIGBUS later
        arrays[name] = np.lib.format.open_memmap(staging / name, mode="w+", dtype=dtype, shape=(size,))
        preallocate(staging / name, "Merging the kNN targets")
    offsets, token_ids, probs, labels = (arrays[name] for name in DATA_FILES)
    offsets[0], row, entry = 0, 0, 0
    for c in range(num_chunks):
        chunk_counts = np.asarray(counts[c])
        offsets[row + 1 : row + 1 + len(chunk_counts)] = entry + np.cumsum(chunk_counts)
        size = int(chunk_counts.sum())
        token_ids[entry : entry + size] = load_array(chunk_dir(staging, c) / "token_ids.npy", f"{size} int32 token ids")
        probs[entry : entry + size] = load_array(chunk_dir(staging, c) / "probs.npy", f"{size} float16 probabilities")
        row, entry = row + len(chunk_counts), entry + size
    empty_rows = max_row = 0
    for begin, end in chunk_ranges(queries.num_rows, MERGE_ROWS):  # streamed: no (N,) array is held in RAM
        labels[begin:end] = queries.vals[begin:end]
        row_sizes = np.diff(offsets[begin : end + 1])
        empty_rows, max_row = empty_rows + int((row_sizes == 0).sum()), max(max_row, int(row_sizes.max(initial=0)))
    for array in (offsets, token_ids, probs, labels):
        array.flush()
    del labels, arrays
    return {"rows": queries.num_rows, "nnz": nnz, "empty_rows": empty_rows,
            "mean_targets_per_row": round(nnz / max(queries.num_rows, 1), 3), "max_targets_in_a_row": max_row,
            "checksums": record_checksums(staging, list(DATA_FILES))}


# ---------------------------------------------------------------------------------------------------
# Checking that targets belong to the rows they are used with


def targets_summary(targets: KnnTargets) -> dict:
    """What meta.json records about the kNN targets (and the retriever that produced them)."""
    queries = targets.meta.get("queries", {})
    return {"path": str(targets.path.resolve()), "rows": targets.num_rows, "nnz": targets.meta.get("nnz"),
            "k": targets.meta.get("k"), "knn_temp": targets.meta.get("knn_temp"),
            "retriever": {"model": queries.get("model"), "model_fingerprint": queries.get("model_fingerprint"),
                          "layer": queries.get("layer"), "dim": queries.get("dim")}}


def check_labels(targets: KnnTargets, expected: np.ndarray, what: str, chunk: int = 1 << 22) -> None:
    """``targets.labels`` must equal ``expected`` (the next tokens of the same rows), compared chunk by chunk."""
    if targets.num_rows != len(expected):
        raise UsageError(f"--knn_save_path {targets.path} has {targets.num_rows} rows but {what} has {len(expected)}: "
                         "the targets were computed for other rows")
    for begin in range(0, len(expected), chunk):
        ours = np.asarray(targets.labels[begin : begin + chunk])
        theirs = np.asarray(expected[begin : begin + chunk], dtype=ours.dtype)
        if not np.array_equal(ours, theirs):
            row = begin + int(np.flatnonzero(ours != theirs)[0])
            raise UsageError(f"--knn_save_path {targets.path}: the gold token of row {row} is {int(ours[row - begin])} but "
                             f"{what} has {int(theirs[row - begin])}; the targets were computed over another text")


def check_fingerprint(targets: KnnTargets, fingerprint: str | None, what: str) -> None:
    """The targets' token ids must be ids of the same tokenizer as the memory's inputs."""
    theirs = targets.meta.get("queries", {}).get("tokenizer_fingerprint")
    if theirs and fingerprint and theirs != fingerprint:
        raise UsageError(f"--knn_save_path {targets.path} was made with tokenizer fingerprint {theirs}, but {what} "
                         f"uses {fingerprint}: a retriever must share the base model's tokenizer")


def check_targets_for_datastore(targets: KnnTargets, datastore: Datastore) -> None:
    """Offline: the targets must describe the datastore's rows (possibly from another retriever model)."""
    what = f"--knn_dstore_path {datastore.path}"
    check_fingerprint(targets, datastore.meta.get("tokenizer_fingerprint"), what)
    queries = targets.meta.get("queries", {})
    if targets.num_rows != datastore.num_rows:
        raise UsageError(f"--knn_save_path {targets.path} has {targets.num_rows} rows but {what} has {datastore.num_rows}")
    # Always compared, even when both meta.json files record the same vals_sha256: that says which values the
    # targets were computed from, not that the files still hold them when either artifact was opened without
    # verification or predates block checksums. It reads 8 bytes a row, little next to the keys.
    check_labels(targets, datastore.vals, what)
    if queries.get("keys_sha256") != datastore.meta.get("keys_sha256"):
        logger.info("The kNN targets come from another retriever (%s, dim %s) than the memory's inputs (%s, dim %d)",
                    (queries.get("model") or {}).get("model_name_or_path"), queries.get("dim"),
                    (datastore.meta.get("model") or {}).get("model_name_or_path"), datastore.dim)
