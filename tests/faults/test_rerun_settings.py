"""A rerun of the pipeline over complete outputs with another setting (issue 24, item 14).

Before recipes, ``scripts/pipeline.sh`` rerun with another ``k``, index type, temperature or ``lmbda`` over a
complete run reported every stage "already done" and kept the old results. Now a stage is complete only if it
was made with the settings asked for: the rerun is refused before any work, naming each run and setting that
differ, and ``--rebuild`` remakes them and the stages that read what they make.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from scripts import pipeline
from tests.conftest import REPO
from tests.test_pipeline_script import tiny_recipe
from utils.cli import UsageError
from utils.io import read_json
from utils.run_layout import RunLayout


@pytest.fixture(scope="module")
def complete(tmp_path_factory, tiny_gpt2_dir, tiny_corpus):
    """A complete tiny run of the standard pipeline, and its recipe."""
    directory = tmp_path_factory.mktemp("rerun")
    recipe = directory / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe(tiny_gpt2_dir, tiny_corpus), "out": str(directory / "run")}))
    pipeline.main([str(recipe)])
    return recipe, RunLayout(directory / "run")


def results_mtimes(layout: RunLayout) -> dict:
    return {p: os.path.getmtime(p) for p in layout.out.rglob("*.json") if p.parent != layout.out}


@pytest.mark.parametrize("override, refused", [
    ("shared.k=4", "knn_targets (k 8 -> 4)"),
    ("index.index_type=auto", 'index (index_type "flat" -> "auto")'),
    ("shared.knn_temp=2", "knn_targets (knn_temp 4 -> 2)"),
    ("shared.lmbdas=[0.25]", "eval_joint_validation (lmbda [0, 0.5] -> [0.25])"),
])
def test_a_rerun_with_another_setting_is_refused_naming_it(complete, override, refused):
    recipe, layout = complete
    before = results_mtimes(layout)
    with pytest.raises(UsageError, match="holds complete runs made otherwise") as caught:
        pipeline.main([str(recipe), override])
    assert refused in str(caught.value) and "--rebuild" in str(caught.value)
    assert results_mtimes(layout) == before  # nothing was touched


def test_the_command_exits_2_with_one_line(complete):
    recipe, layout = complete
    result = subprocess.run(["bash", "scripts/pipeline.sh", str(recipe), "shared.k=4"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "SKIP_INSTALL": "1"})
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "knn_targets (k 8 -> 4)" in error[0]
    assert "already done" not in result.stdout


def test_rebuild_remakes_the_stage_and_what_reads_it(complete, capsys):
    recipe, layout = complete
    before = results_mtimes(layout)
    pipeline.main([str(recipe), "shared.knn_temp=2", "--rebuild", "knn_targets", "knnlm"])
    printed = capsys.readouterr().out
    assert read_json(layout.knn_targets / "meta.json")["knn_temp"] == 2.0
    assert read_json(layout.knnlm("test") / "knnlm_results.json")["knn_temp"] == 2.0
    after = results_mtimes(layout)
    assert after[layout.dstore / "meta.json"] == before[layout.dstore / "meta.json"]  # upstream kept
    assert after[layout.memory / "meta.json"] != before[layout.memory / "meta.json"]  # its targets were remade
    joint = layout.eval_joint("test") / "joint_results.json"
    assert after[joint] != before[joint]
    assert "== datastore: already done" in printed and "== memory\n" in printed
    pipeline.main([str(recipe), "shared.knn_temp=2"])  # and now it is complete with these settings
    assert all("already done" in line for line in capsys.readouterr().out.splitlines()
               if line.startswith("== ") and "summary" not in line and "took" not in line)
