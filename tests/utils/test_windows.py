"""Windows score every row exactly once, with the promised context."""

import numpy as np
import pytest

from utils.cli import UsageError
from utils.windows import BEGIN, END, ROW_BEGIN, ROW_END, make_windows, window_labels


@pytest.mark.parametrize("num_tokens", [2, 3, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("block_size,stride", [(32, 16), (32, 32), (32, 1), (8, 5), (2, 1)])
def test_every_row_scored_exactly_once(num_tokens, block_size, stride):
    windows = make_windows(num_tokens, block_size, stride)
    counts = np.zeros(num_tokens - 1, dtype=int)
    for begin, end, row_begin, row_end in windows:
        assert end - begin <= block_size
        assert begin <= row_begin < row_end <= end - 1  # a window predicts only from positions it reads
        counts[row_begin:row_end] += 1
    assert (counts == 1).all()
    assert windows[0, BEGIN] == 0 and windows[-1, END] == num_tokens


def test_later_windows_keep_block_size_minus_stride_context():
    windows = make_windows(1000, 32, 8)
    for begin, end, row_begin, row_end in windows[1:]:
        assert row_begin - begin >= 32 - 8 - 1  # row r is predicted from r - begin + 1 tokens
        assert row_end - row_begin <= 8
    assert windows[0, ROW_END] - windows[0, ROW_BEGIN] == 31  # the first window scores all it can


def test_window_labels_mask_unscored_positions():
    tokens = np.arange(100, 200)
    window = make_windows(len(tokens), 10, 4)[1]  # reads tokens 4..13, scores tokens 10..13
    input_ids, labels = window_labels(window, tokens)
    assert input_ids.tolist() == list(range(104, 114))
    assert labels.tolist() == [-100] * 6 + [110, 111, 112, 113]


@pytest.mark.parametrize("block_size,stride,flag", [(1, 1, "--block_size"), (8, 0, "--stride"), (8, 9, "--stride")])
def test_bad_settings_name_the_flag(block_size, stride, flag):
    with pytest.raises(UsageError, match=flag):
        make_windows(100, block_size, stride)
