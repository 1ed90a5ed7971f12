"""Sliding windows over a token stream, and the row numbering every later stage shares.

A split is one stream of ``n`` tokens. Token ``t`` (``1 <= t < n``) is predicted from the tokens before
it; that prediction is **row** ``t - 1``: the datastore key of row ``r`` is the hidden state at input
position ``r`` and its value is token ``r + 1``. A split therefore has ``n - 1`` rows, in corpus order.

Windows of ``block_size`` tokens start every ``stride`` tokens. The first window scores all its
positions; each later window scores only the tokens that no earlier window reached (its last
``stride`` positions, fewer for the final one), so every row is scored exactly once and with at least
``block_size - stride`` tokens of context (except in the first window). A window never starts after
the token preceding its first scored token, so with ``stride == block_size`` consecutive windows
overlap by one token.

A window is stored as four integers ``(begin, end, row_begin, row_end)``: it reads tokens
``[begin, end)`` and scores rows ``[row_begin, row_end)``, i.e. its input positions
``row_begin - begin .. row_end - begin - 1``.
"""

from __future__ import annotations

import numpy as np

from utils.cli import UsageError

BEGIN, END, ROW_BEGIN, ROW_END = range(4)


def make_windows(num_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """All windows of a stream of ``num_tokens`` tokens, as an int64 array of shape (W, 4)."""
    if block_size < 2:
        raise UsageError(f"--block_size must be >= 2, got {block_size}")
    if not 1 <= stride <= block_size:
        raise UsageError(f"--stride must be between 1 and --block_size ({block_size}), got {stride}")
    windows = []
    scored_up_to = 1  # token 0 is never predicted
    begin = 0
    while scored_up_to < num_tokens:
        begin = min(begin, scored_up_to - 1)  # the first unscored token needs its predecessor in the window
        end = min(begin + block_size, num_tokens)
        windows.append((begin, end, scored_up_to - 1, end - 1))
        scored_up_to = end
        begin += stride
    return np.asarray(windows, dtype=np.int64).reshape(-1, 4)


def window_labels(window: np.ndarray, tokens: np.ndarray, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and labels of one window; labels are ``ignore_index`` on unscored positions.

    Labels follow the HF convention (unshifted: ``labels[i]`` is the token at input position ``i``),
    so position ``i`` of the model output predicts ``labels[i + 1]``.
    """
    begin, end, row_begin, _ = (int(x) for x in window)
    input_ids = np.asarray(tokens[begin:end], dtype=np.int64)
    labels = input_ids.copy()
    labels[: row_begin + 1 - begin] = ignore_index
    return input_ids, labels
