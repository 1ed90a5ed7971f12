"""downstream.judgment_stats: Wilson intervals, McNemar's exact test, the paired bootstrap, and the report read from
the predictions.jsonl lines of strategyqa and halueval."""

from __future__ import annotations

import numpy as np
import pytest

from downstream.judgment_stats import judgment_report, paired_difference, wilson_interval


def test_wilson_interval_by_hand():
    z = 1.959963984540054
    for successes, count in ((50, 100), (0, 10), (111, 245)):
        p = successes / count
        centre = (p + z * z / (2 * count)) / (1 + z * z / count)
        half = z * np.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
        assert wilson_interval(successes, count) == pytest.approx([100 * (centre - half), 100 * (centre + half)])


def test_paired_difference():
    base = np.array([1] * 20 + [0] * 20 + [1] * 1 + [0] * 9)  # 1 item right under base alone, 9 under memory alone
    joint = np.array([1] * 20 + [0] * 20 + [0] * 1 + [1] * 9)
    found = paired_difference(base, joint)
    assert found["points"] == pytest.approx(100 * 8 / 50)
    assert (found["base_only"], found["memory_only"]) == (1, 9)
    assert found["mcnemar_p"] == pytest.approx(2 * (1 + 10) / 2 ** 10)  # two-sided binomial, n 10, at most 1
    low, high = found["interval"]
    assert low < found["points"] < high and low > 0  # 8 of the 10 differing items favour the memory
    assert paired_difference(base, joint) == found  # seeded
    same = paired_difference(base, base)
    assert same == {"points": 0.0, "interval": [0.0, 0.0], "base_only": 0, "memory_only": 0, "mcnemar_p": 1.0}


def test_report_of_strategyqa_and_halueval_lines():
    def outcome(prediction, right, yes_margin=0.0):
        return {"prediction": prediction, "correct": right, "logliks": [yes_margin, 0.0]}

    strategyqa_rows = [  # choices recorded; gold from the labels; base margins: gold Yes -1 and 3, gold No -2 and -2
        {"choices": ["Yes", "No"], "labels": [1, 0], "base": outcome(1, False, -1.0), "base_plus_memory": outcome(0, True)},
        {"choices": ["Yes", "No"], "labels": [0, 1], "base": outcome(1, True, -2.0), "base_plus_memory": outcome(1, True)},
        {"choices": ["Yes", "No"], "labels": [0, 1], "base": outcome(1, True, -2.0), "base_plus_memory": outcome(0, False)},
        {"choices": ["Yes", "No"], "labels": [1, 0], "base": outcome(0, True, 3.0), "base_plus_memory": outcome(0, True)},
    ]
    found = judgment_report(strategyqa_rows)
    assert found["items"] == 4 and found["always_no"] == found["always_yes"] == found["majority"] == 50.0
    assert found["base"]["accuracy"] == 75.0 and found["base"]["yes_rate"] == 25.0
    assert found["base_plus_memory"]["accuracy"] == 75.0 and found["base_plus_memory"]["yes_rate"] == 75.0
    assert found["base"]["interval"] == pytest.approx(wilson_interval(3, 4))
    assert found["base"]["margin_auc"] == 100.0  # every gold-Yes margin above every gold-No one
    assert found["base_plus_memory"]["margin_auc"] == 50.0  # all margins equal
    assert found["memory_minus_base"]["base_only"] == found["memory_minus_base"]["memory_only"] == 1
    halueval_rows = [{"gold": "Yes", "base": outcome(0, True)}, {"gold": "No", "base": outcome(0, False)},
                     {"gold": "No", "base": {"judgment": "No", "correct": True}}]  # --judge generate: no margin
    found = judgment_report(halueval_rows)
    assert found["always_no"] == pytest.approx(200 / 3) and found["majority"] == pytest.approx(200 / 3)
    assert found["base"]["yes_rate"] == pytest.approx(200 / 3) and "memory_minus_base" not in found
    assert found["base"]["margin_auc"] is None
