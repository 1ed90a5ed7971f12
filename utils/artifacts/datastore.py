"""The kNN-LM datastore: one (key, value) row per scored token of a split, in corpus order.

Layout of a datastore directory::

    keys.npy    float16 (N, d)  input of the last block's feed-forward layer (utils/architectures.py)
    vals.npy    int32   (N,)    the next token
    meta.json   what produced it: model (and its weights' fingerprint, utils.modeling.model_fingerprint),
                tokenizer, architecture, layer, dimension, source dataset and split, row count, SHA-256 of
                both arrays (their identity), block checksums of both files (utils/checksums.py: checked
                when the datastore is opened)

Row ``r`` is the row numbering of utils/windows.py, so row ``r`` of the datastore belongs to the window
whose ``[row_begin, row_end)`` contains ``r``.

Writing happens in ``<dir>.partial``: the arrays are pre-allocated memory maps that every process writes
its own windows into, and ``done_windows.npy`` marks the windows already flushed, so a killed run resumes
where it stopped (with any number of processes) and never runs a finished window through the model again.
``window_nll.npy`` (float64, one per window) keeps what the writer's caller summed over each window in the
same pass (train_base: the negative log-likelihood), so a resumed run reports the perplexity of an
uninterrupted one. Only when every window is done are the checksums computed, ``meta.json`` written and
the directory renamed to its final name.

The arrays' disk blocks are reserved when they are created (`utils.io.preallocate`), after checking the free
space: a write into a sparse memory map on a full disk would kill every process with SIGBUS and no message.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.checksums import checksum_npy, verify_files
from utils.io import (NPY_HEADER_BYTES, ArtifactError, check_free_space, load_array, partial_path, preallocate, read_meta,
                      reuse_staging, timed, write_json)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_DTYPE = np.float16
VAL_DTYPE = np.int32
DATA_FILES = ("keys.npy", "vals.npy")
META_FIELDS = ("rows", "dim", "keys_sha256", "vals_sha256", "layer", "dataset")  # what readers take from meta.json


@dataclass
class Datastore:
    """An opened datastore: memory-mapped keys and values plus its meta."""

    keys: np.ndarray  # float16 (N, d)
    vals: np.ndarray  # int32 (N,)
    meta: dict
    path: Path

    @property
    def num_rows(self) -> int:
        return len(self.vals)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]


def identity_hashes(meta: dict) -> dict[str, str]:
    """The SHA-256 each array's data must have (the datastore's identity, which indexes and targets record)."""
    return {"keys.npy": meta["keys_sha256"], "vals.npy": meta["vals_sha256"]}


def load_datastore(path: str, verify: bool = True, allow_unverified: bool = False) -> Datastore:
    """Open a finished datastore, checking its arrays against its ``meta.json``: their shapes and, with
    ``verify``, their contents (block checksums, one streamed read of both files; a datastore without them is
    refused unless ``allow_unverified``)."""
    meta = read_meta(path, "datastore", META_FIELDS)
    path = Path(path)
    if verify:
        verify_files(path, meta, list(DATA_FILES), allow_unverified)
    expected = (meta["rows"], meta["dim"])
    keys = load_array(path / "keys.npy", f"float16 keys of shape {expected}, as meta.json says", mmap_mode="r")
    vals = load_array(path / "vals.npy", f"{meta['rows']} int32 values, as meta.json says", mmap_mode="r")
    if keys.shape != expected or vals.shape != (meta["rows"],):
        raise ArtifactError(
            f"Datastore {path}: keys {keys.shape} / vals {vals.shape} do not match meta.json (rows, dim) = {expected}"
        )
    return Datastore(keys=keys, vals=vals, meta=meta, path=path)


class DatastoreWriter:
    """Fills a datastore window by window, from one or many processes, resumably.

    ``identity`` is everything that must match for an interrupted run to be resumed (model, dataset,
    rows, dimension ...); it becomes part of ``meta.json``. ``state`` is an ``accelerate.PartialState``.
    """

    def __init__(self, path: str, num_rows: int, dim: int, num_windows: int, identity: dict, state):
        self.path = Path(path).resolve()  # through a link: staged beside the directory it names (where its lock is)
        self.staging = partial_path(self.path)
        self.identity = {**identity, "rows": int(num_rows), "dim": int(dim), "windows": int(num_windows)}
        self.state = state
        self.start_time = time.time()
        if self.path.exists():
            raise ArtifactError(f"--dstore_dir {self.path} already holds a datastore; delete it or choose another directory.")
        if state.is_main_process:
            self._prepare()
        state.wait_for_everyone()
        rows, dim, windows = self.identity["rows"], self.identity["dim"], self.identity["windows"]
        self.keys = load_array(self.staging / "keys.npy", f"float16 keys of shape ({rows}, {dim})", mmap_mode="r+")
        self.vals = load_array(self.staging / "vals.npy", f"{rows} int32 values", mmap_mode="r+")
        self.done = load_array(self.staging / "done_windows.npy", f"{windows} done flags", mmap_mode="r+")
        self.window_nll = load_array(self.staging / "window_nll.npy", f"{windows} per-window sums", mmap_mode="r+")

    def _prepare(self) -> None:
        """Create the staging directory, or keep it if it belongs to the same run."""
        if (self.staging / "progress.json").is_file() and not (self.staging / "window_nll.npy").is_file():
            (self.staging / "progress.json").unlink()  # staged by a version without per-window sums: start afresh
        if reuse_staging(self.staging, self.identity, self._allocate):
            for name in DATA_FILES:  # staged by a version that left them sparse: reserve their blocks now
                preallocate(self.staging / name, f"--dstore_dir {self.path}")
            done = load_array(self.staging / "done_windows.npy", f"{self.identity['windows']} done flags")
            logger.info("Resuming datastore %s: %d of %d windows already written", self.staging, int(done.sum()),
                        self.identity["windows"])

    def _allocate(self, staging: Path) -> None:
        """Pre-allocate the arrays, the per-window done flags and the per-window sums (NaN: never written)."""
        rows, dim, windows = self.identity["rows"], self.identity["dim"], self.identity["windows"]
        arrays = {"keys.npy": (KEY_DTYPE, (rows, dim)), "vals.npy": (VAL_DTYPE, (rows,))}
        needed = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in arrays.values()) \
            + windows * (1 + 8) + 4 * NPY_HEADER_BYTES
        check_free_space(staging, needed, f"--dstore_dir {self.path}")
        for name, (dtype, shape) in arrays.items():
            np.lib.format.open_memmap(staging / name, mode="w+", dtype=dtype, shape=shape).flush()
            preallocate(staging / name, f"--dstore_dir {self.path}")
        np.save(staging / "done_windows.npy", np.zeros(windows, dtype=bool))
        np.save(staging / "window_nll.npy", np.full(windows, np.nan, dtype=np.float64))

    def pending(self, window_ids: np.ndarray) -> bool:
        """Whether any of these windows still has to be written."""
        return not bool(self.done[window_ids].all())

    def written_nll(self, window_ids: np.ndarray) -> dict[int, float]:
        """The per-window sums stored with these (written) windows, as `utils.scoring.window_sums` gives them."""
        return dict(zip(np.asarray(window_ids).tolist(), self.window_nll[window_ids].tolist()))

    def write(self, rows: np.ndarray, keys: np.ndarray, vals: np.ndarray, window_ids: np.ndarray,
              window_nll: dict[int, float] | None = None) -> None:
        """Store the rows of some whole windows (and the caller's per-window sums), then mark those windows done."""
        self.keys[rows] = keys.astype(KEY_DTYPE, copy=False)
        self.vals[rows] = vals.astype(VAL_DTYPE, copy=False)
        if window_nll is not None:
            self.window_nll[list(window_nll)] = list(window_nll.values())
        for array in (self.keys, self.vals, self.window_nll):
            array.flush()
        self.done[window_ids] = True
        self.done.flush()

    def finish(self, extra_meta: dict | None = None) -> dict | None:
        """Check every window is written, write ``meta.json`` and move the datastore into place."""
        self.state.wait_for_everyone()
        meta = None
        if self.state.is_main_process:
            missing = np.flatnonzero(~np.asarray(self.done))
            if len(missing):
                raise ArtifactError(f"Datastore {self.staging}: {len(missing)} windows were never written (first: {missing[:5]})")
            with timed("Checksumming the datastore", logger):  # one read: block checksums and identity together
                (keys_blocks, keys_sha256), (vals_blocks, vals_sha256) = (checksum_npy(self.staging / name)
                                                                          for name in DATA_FILES)
            meta = {
                "kind": "datastore", "format_version": FORMAT_VERSION, **self.identity,
                "keys_sha256": keys_sha256, "vals_sha256": vals_sha256,
                "checksums": {"keys.npy": keys_blocks, "vals.npy": vals_blocks},
                "key_dtype": np.dtype(KEY_DTYPE).name, "val_dtype": np.dtype(VAL_DTYPE).name,
                "seconds": round(time.time() - self.start_time, 2), **(extra_meta or {}),
            }
            del self.keys, self.vals, self.done, self.window_nll
            for name in ("done_windows.npy", "window_nll.npy", "progress.json"):
                (self.staging / name).unlink()
            write_json(self.staging / "meta.json", meta)
            self.staging.rename(self.path)
            logger.info("Datastore written to %s: %d rows of dimension %d", self.path, meta["rows"], meta["dim"])
        self.state.wait_for_everyone()
        return meta


def open_datastore(path: str | os.PathLike, flag: str, verify: bool = True, allow_unverified: bool = False) -> Datastore:
    """`load_datastore`, with errors that name the flag the path came from."""
    try:
        return load_datastore(str(path), verify, allow_unverified)
    except ArtifactError as err:
        raise ArtifactError(f"{flag} {path}: {err}") from None


def datastore_summary(datastore: Datastore) -> dict:
    """What an index or a target file records about the datastore it was made from."""
    meta = datastore.meta
    return {
        "path": str(datastore.path.resolve()), "rows": datastore.num_rows, "dim": datastore.dim,
        "keys_sha256": meta["keys_sha256"], "vals_sha256": meta["vals_sha256"],
        "architecture": meta.get("architecture"), "layer": meta.get("layer"),
        "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"), "model": meta.get("model"),
        "model_fingerprint": meta.get("model_fingerprint"),
    }
