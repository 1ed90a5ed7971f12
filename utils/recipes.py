"""Recipes: one YAML file per experiment, naming only what differs from the code's defaults.

A recipe is a mapping with these top-level keys (all optional):

``description``
    One line saying what the experiment is.
``out``
    The run's output directory (default ``outputs/<recipe file name>``).
``stages``
    The stages to run, a subset of the runner's stages (default: its standard pipeline).
``shared``
    Values several stages take, written once (the model, ``k``, the kNN temperature, ...); each flows to
    every stage that needs it, unless that stage's own section sets the flag.
``plan``
    Facts the dry run needs and cannot read offline (token counts, the base model's size); never used to run.
``<stage>``
    One section per stage: its keys are the flags of that stage's entry point (its argument dataclasses),
    plus a few runner keys (``splits``, ``lmbdas``, ``nproc``).

String values may hold ``{out}`` (the run's output directory) and ``{repo}`` (the repository root).
Command-line overrides go on top: ``section.key=value`` (``out=DIR`` for the top level), the value read as
YAML (``k=8``, ``eval_joint.splits=[test]``, ``shared.gguf_file=null``). This module knows nothing of the
stages: the runner (`scripts.stages`) passes the `RecipeSchema` the keys are checked against.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from utils.cli import UsageError

logger = logging.getLogger(__name__)

TOP_LEVEL = ("description", "out", "stages", "shared", "plan")
PLACEHOLDERS = ("out", "repo")


@dataclass
class RecipeSchema:
    """What a recipe may name: the stages in running order, each stage's keys, the shared keys, the plan keys."""

    stage_keys: dict[str, frozenset[str]]
    shared_keys: frozenset[str]
    plan_keys: frozenset[str]
    default_stages: tuple[str, ...]


@dataclass
class Recipe:
    """A recipe as read, with the overrides applied: still unresolved (no defaults filled in, placeholders kept)."""

    path: str
    text: str
    data: dict
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def out(self) -> str:
        return str(self.data.get("out") or os.path.join("outputs", self.name))

    @property
    def description(self) -> str:
        return str(self.data.get("description") or "")

    def stages(self, schema: RecipeSchema) -> list[str]:
        """The stages to run, in the runner's order."""
        chosen = self.data.get("stages") or list(schema.default_stages)
        return [stage for stage in schema.stage_keys if stage in chosen]

    def section(self, name: str) -> dict:
        return dict(self.data.get(name) or {})


def _closest(name: str, known) -> str:
    """`` (did you mean X?)`` for the closest of ``known`` to a mistyped ``name``, or nothing."""
    endings = sorted(k for k in known if k.endswith("_" + name))
    found = endings[:3] or difflib.get_close_matches(name, sorted(known), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def read_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file and apply ``section.key=value`` overrides; a one-line `UsageError` for any mistake."""
    path = str(path)
    if not os.path.isfile(path):
        raise UsageError(f"recipe {path}: no such file (the shipped recipes are in scripts/recipes/)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping of sections, got a {type(data).__name__}")
    recipe = Recipe(path=path, text=text, data=data)
    for override in overrides:
        apply_override(recipe, override)
    return recipe


def apply_override(recipe: Recipe, override: str) -> None:
    """Set ``section.key=value`` (or a top-level ``key=value``) in ``recipe``; the value is read as YAML."""
    if "=" not in override:
        raise UsageError(f"override {override!r}: expected section.key=value (e.g. knn_targets.k=8 or out=DIR)")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a path with a colon): the text as it is
    parts = key.strip().split(".")
    if len(parts) == 1:
        recipe.data[parts[0]] = value
    elif len(parts) == 2:
        section = recipe.data.get(parts[0])
        if section is None:
            section = recipe.data[parts[0]] = {}
        if not isinstance(section, dict):
            raise UsageError(f"override {override!r}: {parts[0]} is not a section of the recipe")
        section[parts[1]] = value
    else:
        raise UsageError(f"override {override!r}: expected section.key=value with one dot")
    recipe.overrides.append(override)


def check_recipe(recipe: Recipe, schema: RecipeSchema) -> None:
    """Every key of ``recipe`` must be one the schema knows: an unknown key is a one-line error naming it, its
    section and the closest valid keys."""
    where = f"recipe {recipe.path}"
    for key, value in recipe.data.items():
        if key not in TOP_LEVEL and key not in schema.stage_keys:
            raise UsageError(f"{where}: unknown section {key!r}{_closest(key, [*TOP_LEVEL, *schema.stage_keys])}; "
                             f"sections are {', '.join(TOP_LEVEL)} and the stages {', '.join(schema.stage_keys)}")
        if key in ("shared", "plan", *schema.stage_keys) and value is not None and not isinstance(value, dict):
            raise UsageError(f"{where}: {key} must be a mapping of keys to values, got {value!r}")
    stages = recipe.data.get("stages")
    if stages is not None:
        if not isinstance(stages, list):
            raise UsageError(f"{where}: stages must be a list of stage names, got {stages!r}")
        for stage in stages:
            if stage not in schema.stage_keys:
                raise UsageError(f"{where}: stages: unknown stage {stage!r}{_closest(str(stage), schema.stage_keys)}; "
                                 f"the stages are {', '.join(schema.stage_keys)}")
    chosen = recipe.stages(schema)
    for stage in schema.stage_keys:
        if stage in recipe.data and stage not in chosen:
            logger.warning("%s: section %r is given but %r is not one of the stages run (%s): it is not used",
                           where, stage, stage, ", ".join(chosen))
    _check_keys(where, "shared", recipe.section("shared"), schema.shared_keys)
    _check_keys(where, "plan", recipe.section("plan"), schema.plan_keys)
    for stage in schema.stage_keys:
        _check_keys(where, f"stage {stage}", recipe.section(stage), schema.stage_keys[stage])


def _check_keys(where: str, section: str, values: dict, known: frozenset[str]) -> None:
    for key in values:
        if key not in known:
            raise UsageError(f"{where}: {section} has no key {key!r}{_closest(str(key), known)}; "
                             f"valid keys: {', '.join(sorted(known))}")


def expand(value, variables: dict[str, str]):
    """``value`` with ``{out}`` / ``{repo}`` replaced in every string (lists and mappings recursively); other
    braces (a prompt's ``{question}``) are left as they are."""
    if isinstance(value, str):
        for name, replacement in variables.items():
            value = value.replace("{" + name + "}", replacement)
        return value
    if isinstance(value, list):
        return [expand(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, variables) for k, v in value.items()}
    return value
