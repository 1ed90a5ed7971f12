"""Recipes (utils/recipes.py, scripts/stages.py): parsing, one-line errors, overrides, shared values, the stage
table against the entry points' own flags, and the dry run of every shipped recipe (offline, no model loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scripts import pipeline
from scripts.stages import STAGES, Context, build_runs, schema
from tests.conftest import REPO
from utils.cli import UsageError
from utils.recipes import check_recipe, read_recipe

RECIPES = sorted((REPO / "scripts" / "recipes").glob("*.yaml"))


def write_recipe(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def load(path: Path, *overrides: str) -> Context:
    recipe = read_recipe(path, list(overrides))
    check_recipe(recipe, schema())
    return Context(recipe, REPO)


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(UsageError) as caught:
        load(path, *overrides)
    message = str(caught.value)
    assert "\n" not in message  # one line
    return message


TINY = {"shared": {"model": "some/model", "k": 8, "knn_temp": 4}, "index": {"index_type": "flat"}}


def test_unknown_keys_are_one_line_errors_naming_key_section_and_closest(tmp_path):
    message = error_of(write_recipe(tmp_path, {**TINY, "knn_targets": {"kk": 8}}))
    assert "stage knn_targets has no key 'kk'" in message and "did you mean k" in message
    message = error_of(write_recipe(tmp_path, {**TINY, "memory": {"learning_rte": 1e-3}}))
    assert "stage memory has no key 'learning_rte' (did you mean learning_rate?)" in message
    assert "unknown section 'knn_target' (did you mean knn_targets?)" in error_of(
        write_recipe(tmp_path, {**TINY, "knn_target": {"k": 8}}))
    assert "shared has no key 'kk'" in error_of(write_recipe(tmp_path, {**TINY, "shared": {"kk": 1}}))
    assert "unknown stage 'memroy' (did you mean memory" in error_of(
        write_recipe(tmp_path, {**TINY, "stages": ["preprocess", "memroy"]}))
    assert "stage qa has no key 'batch_size'" in error_of(  # checked even where the stage is not run
        write_recipe(tmp_path, {**TINY, "qa": {"batch_size": 8}}))
    assert "override 'knn_targets.kk=3'" not in error_of(write_recipe(tmp_path, TINY), "knn_targets.kk=3")
    assert "stage knn_targets has no key 'kk'" in error_of(write_recipe(tmp_path, TINY), "knn_targets.kk=3")


def test_bad_files_and_runner_owned_flags(tmp_path):
    assert "not valid YAML at line 2" in error_of(write_recipe(tmp_path, "out: a\n  k: 8\n"))
    assert "no such file" in error_of(tmp_path / "absent.yaml")
    assert "must be a mapping" in error_of(write_recipe(tmp_path, "- a\n- b\n"))
    ctx = load(write_recipe(tmp_path, {**TINY, "knn_targets": {"output_path": "elsewhere"}}))
    with pytest.raises(UsageError, match="stage knn_targets: output_path is set by the runner"):
        build_runs(ctx, "knn_targets")
    assert "expected section.key=value" in error_of(write_recipe(tmp_path, TINY), "k")


def test_shared_values_flow_to_every_stage_and_sections_win(tmp_path):
    ctx = load(write_recipe(tmp_path, {**TINY, "out": str(tmp_path / "run"), "knnlm": {"knn_temp": 2}}),
               "shared.lmbdas=[0.1, 0.9]", "eval_joint.splits=[test]")
    targets, = build_runs(ctx, "knn_targets")
    assert (targets.settings["k"], targets.settings["knn_temp"]) == (8, 4)
    knnlm = build_runs(ctx, "knnlm")
    assert [run.settings["eval_subset"] for run in knnlm] == ["validation", "test"]
    assert all((run.settings["k"], run.settings["knn_temp"], run.settings["lmbda"]) == (8, 2, [0.1, 0.9])
               for run in knnlm)  # the section's knn_temp wins over the shared one
    joint, = build_runs(ctx, "eval_joint")
    assert joint.settings["lmbda"] == [0.1, 0.9] and joint.settings["model_name_or_path"] == "some/model"
    assert joint.settings["output_dir"] == str(tmp_path / "run" / "eval_joint_test")
    assert "k" not in joint.settings and "knn_temp" not in joint.settings  # the kNN temperature is not the memory's
    # The code's defaults, read from the dataclasses (one place each): k 1024, knn_temp 16, for targets and kNN-LM.
    ctx = load(write_recipe(tmp_path, {"shared": {"model": "m"}}))
    assert {(run.settings["k"], run.settings["knn_temp"]) for s in ("knn_targets", "knnlm")
            for run in build_runs(ctx, s)} == {(1024, 16.0)}
    assert ctx.layout.out == Path("outputs") / "r"


class Captured(Exception):
    """Raised by the patched parser: the entry point's own parser, caught before it parses anything."""


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_keys_are_the_entry_points_flags(stage, monkeypatch):
    """A recipe section takes exactly the flags of the parser the stage's entry point builds (minus the ones the
    runner owns), so the table cannot drift from the entry points."""
    import argparse
    import importlib

    def capture(parser, *args, **kwargs):
        raise Captured(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    module = importlib.import_module(STAGES[stage].module)
    main = getattr(module, "main", None) or importlib.import_module(STAGES[stage].module + ".__main__").main
    with pytest.raises(Captured) as caught:
        main(["--output_dir", "x"])
    parser = caught.value.args[0]
    flags = {option[2:] for action in parser._actions for option in action.option_strings
             if option.startswith("--") and "-" not in option[2:] and option != "--help"}
    assert STAGES[stage].flags() == {flag for flag in flags if not (flag.startswith("no_") and flag[3:] in flags)}
    assert STAGES[stage].owned <= flags  # every flag the runner sets exists


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_are_valid_and_every_command_line_parses(path):
    """Each run's argv is read by its entry point's own parser with nothing left over (e.g. a boolean written the
    way that parser takes it: --disable_tqdm true for TrainingArguments' bool | None, --find_correction alone)."""
    ctx = load(path)
    assert ctx.recipe.description and ctx.stages
    runs = [run for stage in ctx.stages for run in build_runs(ctx, stage)]
    assert runs and len({run.name for run in runs}) == len(runs)
    for run in runs:
        if run.pending or run.stage == "qa" and run.positional:  # choose_lmbda: positional directories
            continue
        parser = STAGES[run.stage].parser()
        parser.error = lambda message: pytest.fail(f"{run.name}: {message}")
        parsed, left = parser.parse_known_args(run.argv())
        assert not left, (run.name, left)


@pytest.mark.parametrize("name", ["gpt2_wikitext103_paper", "gpt2large_released_wikitext103_eval"])
def test_dry_run_of_the_wikitext103_recipes_is_offline(name, tmp_path, capsys, monkeypatch):
    """The capacity plan prints from the recipe alone: nothing downloaded, nothing written, no GPU."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    pipeline.main([str(REPO / "scripts" / "recipes" / f"{name}.yaml"), f"out={out}", "--dry_run"])
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "116,988,150" in printed and "774,030,080 parameters" in printed
    assert "| total still to run |" in printed
    if name == "gpt2_wikitext103_paper":
        assert "| datastore | to run | 116,988,150 rows | 300.0 GB |" in printed  # rows x (2 x 1280 + 4) bytes
        assert "IVFPQ 4096 lists x 64 B" in printed and "8 H100" in printed and "k 1024" in printed
    else:
        assert "download_Rubin-Wei--MLPMemory-gpt2-large" in printed and "eval_joint_test" in printed


def test_an_older_corpus_gets_its_few_shot_prompt_written(tmp_path, capsys):
    """The corpus stage is done when its newest file is there: a corpus written before HaluEval's few-shot prompt
    (its meta.json without the entry, the file absent) is handed to utils.embedded_corpus again, which adds it."""
    sizes = {"num_countries": 3, "num_cities": 12, "num_rivers": 4, "num_organisations": 10, "num_people": 40}
    recipe = write_recipe(tmp_path, {"out": str(tmp_path / "run"), "stages": ["corpus"], "corpus": sizes})
    pipeline.main([str(recipe)])
    layout = Context(read_recipe(recipe), REPO).layout
    prompt = layout.halueval_fewshot.read_text()
    meta = json.loads(layout.corpus_file("meta.json").read_text())
    del meta["halueval_fewshot"]
    layout.corpus_file("meta.json").write_text(json.dumps(meta))
    layout.halueval_fewshot.unlink()
    capsys.readouterr()
    pipeline.main([str(recipe)])
    assert "already done" not in capsys.readouterr().out
    assert layout.halueval_fewshot.read_text() == prompt
    pipeline.main([str(recipe)])
    assert "== corpus: already done" in capsys.readouterr().out
