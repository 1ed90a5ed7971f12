"""Where the training rows come from: a `MemoryBatch` of inputs and sparse kNN targets, the `RowSource`
protocol the loop needs, and its two implementations -- `DatastoreRows` (offline: the saved datastore
keys) and `OnTheFlyRows` (online: hidden states the frozen base model computes from the windows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from models.training.losses import SparseTargets
from utils.artifacts.datastore import Datastore
from utils.artifacts.knn_targets import KnnTargets
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook
from utils.scoring import score_windows
from utils.windows import ROW_BEGIN, ROW_END


@dataclass
class MemoryBatch:
    """Inputs and targets of n rows."""

    inputs: torch.Tensor  # (n, d) float32
    targets: SparseTargets
    labels: torch.Tensor  # (n,) int64

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def to(self, device) -> "MemoryBatch":
        return MemoryBatch(self.inputs.to(device, non_blocking=True), self.targets.to(device),
                           self.labels.to(device, non_blocking=True))

    def pin_memory(self) -> MemoryBatch:
        """A copy in page-locked memory (what a ``DataLoader(pin_memory=True)`` calls), so that ``to(cuda)`` is
        asynchronous."""
        targets = self.targets
        return MemoryBatch(self.inputs.pin_memory(), SparseTargets(targets.entry_row.pin_memory(),
                                                                   targets.token_ids.pin_memory(),
                                                                   targets.probs.pin_memory(), targets.num_rows),
                           self.labels.pin_memory())


def make_batch(inputs: torch.Tensor, rows: np.ndarray, targets: KnnTargets, vocab_size: int) -> MemoryBatch:
    """Pair the inputs of ``rows`` (n, d) with their sparse kNN targets and gold tokens."""
    entry_row, token_ids, probs = targets.batch(rows)
    labels = np.asarray(targets.labels[rows], dtype=np.int64)
    if len(token_ids) and int(token_ids.max()) >= vocab_size or len(labels) and int(labels.max()) >= vocab_size:
        raise UsageError(f"--knn_save_path {targets.path} holds token ids >= the memory's vocabulary size {vocab_size}")
    return MemoryBatch(inputs.float(), SparseTargets.from_numpy(entry_row, token_ids, probs, len(rows)),
                       torch.from_numpy(labels))


class RowSource(Protocol):
    """What the training loop needs from a mode: training units, their batches, and validation batches."""

    unit: str  # "row" or "window"
    num_train_units: int
    train_batch_size: int  # units per device per micro-batch
    eval_batch_size: int
    loader_workers: int  # processes that prepare the next batches while one trains (0: in the training process)

    def train_batch(self, units: np.ndarray) -> MemoryBatch: ...

    def validation_batches(self, rank: int, world_size: int) -> Iterator[MemoryBatch]: ...

    def describe(self) -> dict: ...


class DatastoreRows:
    """Offline: the input of row r is the datastore key r; units are rows ``[0, boundary)``.

    A batch reads only its own rows from the memory-mapped keys and targets, in ascending row order (the
    rows are sorted first, and the targets and labels follow the same order, so the loss is the same), so
    a datastore far larger than RAM trains from what the page cache and read-ahead give; ``loader_workers``
    processes gather the next batches while the current one trains (`models.training.loop.train_batches`).
    """

    unit = "row"

    def __init__(self, datastore: Datastore, targets: KnnTargets, boundary: int, vocab_size: int,
                 train_batch_size: int, eval_batch_size: int, max_train_samples: int | None = None,
                 loader_workers: int = 0):
        self.datastore, self.targets, self.boundary, self.vocab_size = datastore, targets, boundary, vocab_size
        self.num_train_units = min(boundary, max_train_samples or boundary)
        self.train_batch_size, self.eval_batch_size = train_batch_size, eval_batch_size
        self.loader_workers = loader_workers

    def rows_batch(self, rows: np.ndarray) -> MemoryBatch:
        rows = np.sort(rows)  # sequential reads of the memory-mapped keys
        keys = torch.from_numpy(np.asarray(self.datastore.keys[rows], dtype=np.float32))  # (n, d)
        return make_batch(keys, rows, self.targets, self.vocab_size)

    def train_batch(self, units: np.ndarray) -> MemoryBatch:
        return self.rows_batch(units)

    def validation_batches(self, rank: int, world_size: int) -> Iterator[MemoryBatch]:
        mine = np.array_split(np.arange(self.boundary, self.datastore.num_rows), world_size)[rank]
        for begin in range(0, len(mine), self.eval_batch_size):
            yield self.rows_batch(mine[begin : begin + self.eval_batch_size])

    def describe(self) -> dict:
        return {"mode": "offline", "unit": self.unit, "train_units": self.num_train_units,
                "validation_rows": self.datastore.num_rows - self.boundary}


@torch.no_grad()
def window_hidden_states(model: torch.nn.Module, tokens: np.ndarray, windows: np.ndarray, layer: int = -1
                         ) -> tuple[np.ndarray, torch.Tensor]:
    """The kNN key of every scored row of some windows, computed by the frozen base model.

    Returns the global row ids (n,) and the hidden states (n, d): the input of block ``layer``'s
    feed-forward layer, the same tensor the datastore stores. Only the transformer body runs (no LM head).
    """
    with HiddenStateHook(model, layer) as hook:
        scored = score_windows(model, hook, tokens, windows, np.arange(len(windows)), with_logits=False)
    return scored.rows, scored.hidden


class OnTheFlyRows:
    """Online: the frozen base model computes the inputs from the windows; units are windows."""

    unit = "window"
    loader_workers = 0  # the base model runs in the training process, on its device

    def __init__(self, model: torch.nn.Module, tokens: np.ndarray, windows: np.ndarray, layer: int,
                 targets: KnnTargets, boundary: int, vocab_size: int, train_batch_size: int, eval_batch_size: int,
                 max_train_samples: int | None = None):
        self.model, self.tokens, self.windows, self.layer = model.eval(), tokens, windows, layer
        self.targets, self.boundary, self.vocab_size = targets, boundary, vocab_size
        self.train_windows = np.flatnonzero(windows[:, ROW_BEGIN] < boundary)[:max_train_samples]
        self.validation_windows = np.flatnonzero(windows[:, ROW_END] > boundary)
        self.num_train_units = len(self.train_windows)
        self.train_batch_size, self.eval_batch_size = train_batch_size, eval_batch_size

    def windows_batch(self, window_ids: np.ndarray, keep) -> MemoryBatch:
        """The rows of some windows for which ``keep(rows)`` is true."""
        if len(window_ids) == 0:
            return make_batch(torch.zeros(0, self.model.config.hidden_size), np.zeros(0, np.int64), self.targets, self.vocab_size)
        rows, hidden = window_hidden_states(self.model, self.tokens, self.windows[np.sort(window_ids)], self.layer)
        mask = keep(rows)
        return make_batch(hidden[torch.from_numpy(mask).to(hidden.device)], rows[mask], self.targets, self.vocab_size)

    def train_batch(self, units: np.ndarray) -> MemoryBatch:
        return self.windows_batch(self.train_windows[units], lambda rows: rows < self.boundary)

    def validation_batches(self, rank: int, world_size: int) -> Iterator[MemoryBatch]:
        mine = np.array_split(self.validation_windows, world_size)[rank]
        for begin in range(0, len(mine), self.eval_batch_size):
            yield self.windows_batch(mine[begin : begin + self.eval_batch_size], lambda rows: rows >= self.boundary)

    def describe(self) -> dict:
        return {"mode": "online", "unit": self.unit, "train_units": self.num_train_units,
                "validation_rows": self.targets.num_rows - self.boundary, "layer": self.layer}


def rows_of_windows(windows: np.ndarray, num_rows: int, what: str) -> int:
    """How many leading windows score exactly rows ``[0, num_rows)``."""
    ends = windows[:, ROW_END]
    count = int(np.searchsorted(ends, num_rows, side="left")) + 1
    if windows[0, ROW_BEGIN] != 0 or count > len(windows) or ends[count - 1] != num_rows:
        raise UsageError(f"The kNN targets have {num_rows} rows, which is not the rows of whole windows of {what} "
                         f"({int(ends[-1])} rows in {len(windows)} windows)")
    return count
