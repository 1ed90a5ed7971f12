"""Run a frozen causal LM over the windows of a split and yield what each scored row needs.

One pass gives, for every scored row: its global row id, the kNN key (the hidden state captured by
`HiddenStateHook`), the LM's logits and the gold next token. Perplexity, the datastore, kNN-LM and the
joint model with a memory all consume these batches.

Windows are grouped into fixed batches (``batch_size`` consecutive windows) and batch ``b`` goes to
process ``b % num_processes``: the same windows are always computed together, so one process and many
produce bit-identical numbers.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.hidden_state import HiddenStateHook
from utils.io import ArtifactError
from utils.windows import BEGIN, END, ROW_BEGIN, ROW_END

logger = logging.getLogger(__name__)


@dataclass
class ScoredBatch:
    """The scored rows of a batch of whole windows, in row order."""

    window_ids: np.ndarray  # int64 (W,)
    rows: np.ndarray  # int64 (n,) global row ids
    hidden: torch.Tensor | None  # (n, d) kNN key of each row (None: no block captured)
    logits: torch.Tensor | None  # (n, V) LM logits predicting each row's next token (None: not computed)
    labels: torch.Tensor  # (n,) the next token


def batch_ids(num_windows: int, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """The window ids of the batches this process owns."""
    starts = range(rank * batch_size, num_windows, world_size * batch_size)
    return [np.arange(s, min(s + batch_size, num_windows)) for s in starts]


def collate_windows(tokens: np.ndarray, windows: np.ndarray, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded input ids and attention mask of some windows, and the first position any of them scores."""
    lengths = windows[:, END] - windows[:, BEGIN]
    input_ids = torch.full((len(windows), int(lengths.max())), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (begin, end) in enumerate(windows[:, [BEGIN, END]]):
        input_ids[i, : end - begin] = torch.from_numpy(np.asarray(tokens[begin:end], dtype=np.int64))
        attention_mask[i, : end - begin] = 1
    first_scored = int((windows[:, ROW_BEGIN] - windows[:, BEGIN]).min())
    return input_ids, attention_mask, first_scored


@torch.no_grad()
def score_windows(model: torch.nn.Module, hook: HiddenStateHook | None, tokens: np.ndarray, windows: np.ndarray,
                  window_ids: np.ndarray, with_logits: bool = True) -> ScoredBatch:
    """One forward pass over some whole windows; ``with_logits=False`` runs only the transformer body
    (no LM head) and leaves ``logits`` empty; without a ``hook`` ``hidden`` is None."""
    device = next(model.parameters()).device
    batch = windows[window_ids]
    input_ids, attention_mask, first_scored = collate_windows(tokens, batch)
    inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    if with_logits:
        logits = model(**inputs, logits_to_keep=input_ids.shape[1] - first_scored).logits  # (B, T', V)
    else:
        model.base_model(**inputs)
        logits = None
    hidden = hook.hidden[:, first_scored:] if hook is not None else None  # (B, T', d), T' = T - first_scored
    rows, keep_h, keep_l, labels = [], [], [], []
    for i, (begin, end, row_begin, row_end) in enumerate(batch):
        local = slice(row_begin - begin - first_scored, row_end - begin - first_scored)
        rows.append(np.arange(row_begin, row_end))
        if hidden is not None:
            keep_h.append(hidden[i, local])
        if logits is not None:
            keep_l.append(logits[i, local])
        labels.append(input_ids[i, row_begin + 1 - begin : row_end + 1 - begin])
    return ScoredBatch(
        window_ids=window_ids, rows=np.concatenate(rows), hidden=torch.cat(keep_h) if keep_h else None,
        logits=torch.cat(keep_l) if keep_l else None, labels=torch.cat(labels).to(device),
    )


def score_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    windows: np.ndarray,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    layer: int | None = -1,
    skip: Callable[[np.ndarray], bool] | None = None,
    show_progress: bool = True,
) -> Iterator[ScoredBatch]:
    """Yield a `ScoredBatch` for every batch of windows this process owns (unless ``skip(window_ids)``), with the
    feed-forward input of block ``layer`` as ``hidden`` (``layer`` None: no hidden states)."""
    model.eval()
    batches = batch_ids(len(windows), batch_size, rank, world_size)
    with HiddenStateHook(model, layer) if layer is not None else nullcontext() as hook:
        for window_ids in tqdm(batches, desc="Scoring windows", disable=not show_progress, unit="batch"):
            if skip is None or not skip(window_ids):
                yield score_windows(model, hook, tokens, windows, window_ids)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each label, computed in float32: (n, V), (n,) -> (n,)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, labels[:, None]).squeeze(-1)


def window_sums(values: torch.Tensor, batch: ScoredBatch, windows: np.ndarray) -> dict[int, float]:
    """Sum per-row ``values`` (n,) back into one float64 total per window of ``batch``."""
    values = values.double().cpu().numpy()
    sizes = windows[batch.window_ids, ROW_END] - windows[batch.window_ids, ROW_BEGIN]
    totals = np.add.reduceat(values, np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    return dict(zip(batch.window_ids.tolist(), totals.tolist()))


def gather_window_totals(totals: dict[int, float], num_windows: int, state) -> np.ndarray:
    """Every process's per-window totals as one float64 vector (W,), identical on all processes.

    Each window is owned by exactly one process and the others contribute 0.0, so the sum is exact
    and the result does not depend on the number of processes.
    """
    vector = torch.zeros(num_windows, dtype=torch.float64)
    if totals:
        vector[list(totals)] = torch.tensor(list(totals.values()), dtype=torch.float64)
    if state.num_processes > 1:
        vector = vector.to(state.device)
        torch.distributed.all_reduce(vector)
    return vector.cpu().numpy()


def check_finite_loss(loss: float, whose: str, cause: str) -> float:
    """``loss`` (a mean NLL over scored tokens) when it is a finite number; otherwise an `ArtifactError` that says
    whose log-probabilities are NaN or infinite and the likely ``cause``, so that no results are written."""
    if math.isfinite(loss):
        return loss
    what = "NaN" if math.isnan(loss) else "infinite (a scored token has probability 0)"
    raise ArtifactError(f"{whose} log-probabilities are {what}: {cause}. No results were written.")
