"""utils/cli.py: a mistyped or missing flag is a one-line error that names it, never an argparse page or a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

import evaluate_joint
import train_base
from tests.conftest import REPO
from utils.cli import UsageError, closest_flags

REQUIRED = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--knn_generator_path", "g"]


def test_a_misspelled_flag_names_the_closest_valid_one():
    with pytest.raises(UsageError, match=r"^unknown flag --lambda \(did you mean --lmbda\?\)"):
        evaluate_joint.main([*REQUIRED, "--lambda", "0.3"])
    # reported before the missing required flags it may have caused
    with pytest.raises(UsageError, match=r"unknown flag --knn_tmp \(did you mean --knn_temp\?\); unknown flag --foo;"):
        evaluate_joint.main(["--knn_tmp=2", "--foo", "1"])


def test_a_flag_that_is_the_end_of_valid_ones_lists_them():
    with pytest.raises(UsageError, match="unknown flag --batch_size .*--per_device_eval_batch_size or "
                                         "--per_device_train_batch_size"):
        train_base.main(["--batch_size", "4", "--do_eval", "--dataset_name", "d"])
    assert closest_flags("--zzz", ["--lmbda", "--knn_temp"]) == []


def test_values_without_a_flag_and_bad_values_are_usage_errors():
    with pytest.raises(UsageError, match="unexpected argument.* 0.3 .*every value must follow its --flag"):
        evaluate_joint.main([*REQUIRED, "0.3"])
    with pytest.raises(UsageError, match="argument --lmbda: invalid float value: 'abc'"):
        evaluate_joint.main([*REQUIRED, "--lmbda", "abc"])
    with pytest.raises(UsageError, match="required: --model_name_or_path.*, --dataset_name"):
        evaluate_joint.main(["--lmbda", "0.5"])


def test_the_command_line_prints_one_line_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "train_base", "--batch_size", "4", "--do_eval"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown flag --batch_size")
