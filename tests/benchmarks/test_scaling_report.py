"""The scaling report's comparisons, from points written by hand: the parameters every memory size shares, and the
base's continued pretraining at a memory point's training FLOPs (interpolated in log FLOPs, never extrapolated)."""

from __future__ import annotations

import math

import pytest

from benchmarks.scaling_report import same_compute, shared_head, tables, write_report

HEAD, PER_BLOCK = 28_311_552 + 576, 2_654_928


def memory(blocks: int, epochs: int, joint: float) -> dict:
    parameters = HEAD + blocks * PER_BLOCK
    return {"kind": "memory", "blocks": blocks, "parameters": parameters, "epochs": epochs, "steps": 10 * epochs,
            "datastore_rows": 1000, "datastore_fraction": 1.0, "train_flops": 6 * parameters * 1000 * epochs,
            "validation_memory_perplexity": 30.0, "test_memory_perplexity": 31.0, "validation_joint_perplexity": joint - 3,
            "test_joint_perplexity": joint, "lmbda": 0.3, "train_rows_per_second": 100.0,
            "load_start": [1.0, 1.0, 1.0], "load_end": [1.0, 1.0, 1.0], "wall_seconds": 60.0}


def base(steps: int, flops: float, test: float) -> dict:
    return {"kind": "base", "steps": steps, "epochs": steps / 10, "train_flops": flops, "validation_perplexity": test - 4,
            "test_perplexity": test, "test_tokens": 100, "load_start": [1.0, 1.0, 1.0], "load_end": [1.0, 1.0, 1.0],
            "wall_seconds": 120.0}


@pytest.fixture
def data():
    points = {"base/steps_0": base(0, 0, 26.0), "base/steps_7": base(7, 1e11, 21.0), "base/steps_15": base(15, 4e11, 19.0)}
    for blocks in (1, 4):
        for epochs in (1, 2):
            points[f"memory/blocks_{blocks}/epochs_{epochs}"] = memory(blocks, epochs, 18.0 + blocks / 10 + epochs / 100)
    settings = {"cpt_learning_rate": 5e-5, "memory_blocks": [4, 1], "epochs": [1, 2], "cpt_epochs": [0.7, 1.5],
                "datastore_fractions": [1.0], "datastore_blocks": 4, "datastore_epochs": 2}
    return {"points": points, "setup": {"settings": settings}}


def test_shared_head_is_the_intercept_of_parameters_against_blocks(data):
    grid = [p for p in data["points"].values() if p["kind"] == "memory"]
    assert shared_head(grid) == pytest.approx(HEAD)
    assert shared_head([p for p in grid if p["blocks"] == 4]) is None  # one size: nothing to separate


def test_same_compute_interpolates_in_log_flops_and_never_extrapolates(data):
    found = {(p["blocks"], p["epochs"]): value for p, value in same_compute(data, "test")}
    for (blocks, epochs), value in found.items():
        flops = 6 * (HEAD + blocks * PER_BLOCK) * 1000 * epochs
        if 1e11 <= flops <= 4e11:
            t = math.log(flops / 1e11) / math.log(4)
            assert value == pytest.approx(21.0 - 2.0 * t)
        else:
            assert value is None
    # The fixture has both cases: 4 blocks x 2 epochs is beyond the run's last point, the rest are inside it.
    assert [key for key, value in found.items() if value is None] == [(4, 2)]


def test_tables_show_the_blocks_own_parameters_and_the_same_compute_rows(data, tmp_path):
    text = tables(data)
    assert "In progress" not in text  # every point the settings make is there
    assert f"({4 * PER_BLOCK / 1e6:.1f}M)" in text and f"({HEAD / 1e6:.1f}M parameters)" in text
    same = text[text.index("At the same training compute"):]
    beyond = next(line for line in same.splitlines() if line.startswith("| 4 | 2 | "))
    assert beyond.endswith("| - | - |")
    inside = next(line for line in same.splitlines() if line.startswith("| 1 | 1 | "))
    test = 21.0 - 2.0 * math.log(6 * (HEAD + PER_BLOCK) * 1000 / 1e11) / math.log(4)
    assert inside.endswith(f"| {test - 4:.2f} / {test:.2f} | {18.11 / test:.3f} |")
    write_report(data, tmp_path / "scaling")
    assert (tmp_path / "scaling.png").stat().st_size > 0 and (tmp_path / "scaling.md").read_text() == text
