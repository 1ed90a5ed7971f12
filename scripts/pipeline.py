"""Run a recipe: every stage of the pipeline, each from its entry point's ``main(argv)``, with a ledger.

    python -m scripts.pipeline scripts/recipes/quickstart.yaml                  # bash scripts/pipeline.sh RECIPE
    python -m scripts.pipeline RECIPE knn_targets.k=128 shared.knn_temp=8     # overrides: section.key=value
    python -m scripts.pipeline RECIPE --dry_run        # stages, which are complete, rows, disk and hours
    python -m scripts.pipeline RECIPE --rebuild        # remake the stages whose settings differ (and what reads them)
    python -m scripts.pipeline RECIPE --rebuild knn_targets knnlm
    python -m scripts.pipeline compare RUN_A RUN_B     # what differs between two runs: settings, versions, results

Each stage writes the artifact the run's layout names (`utils.run_layout`) and, when it succeeds, a record
of the settings it was made with (``OUT/stages/<run>.json``). A rerun skips a run only when its artifact is
complete, was made with the settings asked for, and its inputs are the ones it was made from; when the
settings differ it refuses before any work, naming each setting, unless ``--rebuild`` says to remake it.
``OUT/ledger.json`` (`utils.ledger`) is rewritten after every stage. Several processes (a stage's
``nproc``) run through ``accelerate launch``; everything else runs in this process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the FAISS stages set it, before torch loads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import importlib
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from scripts.runs import CHOSEN, Run
from scripts.stages import Context, build_runs, schema
from utils.cli import UsageError, run, setup_logging
from utils.environment import machine
from utils.io import partial_path, read_json, write_json
from utils.ledger import (Ledger, compare, fingerprint, flat_metrics, format_comparison, has_checksums, measured, now,
                          read_ledger)
from utils.locking import artifact_lock
from utils.recipes import check_recipe, read_recipe

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
# Flags that never change what a stage makes: how it logs, reports and checkpoints.
NOT_RESULT_FLAGS = frozenset({"disable_tqdm", "logging_steps", "report_to", "save_strategy", "num_proc",
                              "dataloader_num_workers", "overwrite_output_dir", "checkpointing_steps",
                              "save_total_limit", "eval_steps", "logging_dir"})
# Parts of results files that describe the run rather than measure it (left out of the ledger's metrics).
NOT_METRICS = frozenset({"settings", "protocol", "model", "data", "questions", "environment", "checksums", "source",
                         "base_check", "training", "memory", "tokenizer", "dataset", "retriever", "converted_from",
                         "seconds", "examples", "datastore", "knn_targets", "base_model"})


@dataclass
class Status:
    """Where a run stands: ``missing``, ``done``, ``adopted`` (complete, made before records were kept),
    ``differs`` (made with other settings) or ``changed`` (its inputs or its artifact changed since)."""

    kind: str
    reasons: list[str] = field(default_factory=list)


def normalized(value, out: Path):
    """``value`` with the run's own directory written ``{out}``, so that two runs' settings compare."""
    if isinstance(value, list):
        return [normalized(v, out) for v in value]
    if isinstance(value, str):
        for prefix in (str(out.absolute()), str(out)):
            if value == prefix or value.startswith(prefix + os.sep):
                return "{out}" + value[len(prefix):]
    return value


def resolved(path) -> Path:
    return Path(path).absolute()


def reads(run: Run, paths: set[Path]) -> bool:
    """Whether ``run`` reads one of ``paths`` (or something inside one)."""
    return any(resolved(path) == p or p in resolved(path).parents for path in run.inputs.values() if str(path)
               for p in paths)


def artifacts(paths: dict, out: Path) -> dict:
    return {name: {"path": normalized(str(path), out), "fingerprint": fingerprint(path) if str(path) else None,
                   "checksummed": bool(str(path)) and has_checksums(path)} for name, path in paths.items()}


def metrics_of(run: Run) -> dict:
    if run.results is None or not run.results.is_file():
        return {}
    results = read_json(run.results)
    return flat_metrics({k: v for k, v in results.items() if k not in NOT_METRICS}) if isinstance(results, dict) else {}


def call(run: Run) -> None:
    """Run one stage: ``main(argv)`` of its entry point in this process, or ``accelerate launch`` for several."""
    if run.nproc > 1:
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(run.nproc), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", run.module, *run.argv()]
        if subprocess.run(command, cwd=REPO).returncode != 0:
            raise UsageError(f"stage {run.name} failed ({' '.join(command[:8])} ...); its log is above")
        return
    import torch
    from accelerate.state import AcceleratorState

    module = importlib.import_module(run.module)
    main = getattr(module, "main", None) or importlib.import_module(run.module + ".__main__").main
    threads = torch.get_num_threads()
    try:
        main(run.argv())
    except UsageError as err:
        raise type(err)(f"stage {run.name}: {err}") from None
    finally:  # what a stage changed for itself does not carry into the next one
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        setup_logging()


class Runner:
    """The stages of a recipe, run in order: skipped when complete with the same settings, refused or rebuilt
    when they differ; the ledger and each run's record written as they finish."""

    def __init__(self, ctx: Context, rebuild: list[str] | None):
        self.ctx, self.layout = ctx, ctx.layout
        self.rebuild = None if rebuild is None else set(rebuild)
        for stage in self.rebuild or ():
            if stage not in ctx.stages:
                raise UsageError(f"--rebuild {stage}: not a stage of this run ({', '.join(ctx.stages)})")
        self.built: set[Path] = set()  # artifacts (re)made by this invocation

    def record_of(self, run: Run) -> dict | None:
        path = self.layout.stage_record(run.name)
        return read_json(path) if path.is_file() else None

    def status(self, run: Run) -> Status:
        if run.always or not run.done.exists():
            return Status("missing")
        record = self.record_of(run)
        if record is None:
            return Status("adopted")
        out = self.layout.out
        asked = {k: normalized(v, out) for k, v in run.settings.items() if k not in NOT_RESULT_FLAGS}
        made = {k: v for k, v in record["settings"].items() if k not in NOT_RESULT_FLAGS}
        differ = [f"{flag} {json.dumps(made.get(flag))} -> {json.dumps(asked.get(flag))}"
                  for flag in sorted(set(asked) | set(made)) if asked.get(flag) != made.get(flag)]
        if differ:
            return Status("differs", differ)
        now_inputs = artifacts(run.inputs, out)
        changed = [f"its input {name} changed" for name, artifact in record.get("inputs", {}).items()
                   if now_inputs.get(name, {}).get("fingerprint") != artifact["fingerprint"]]
        changed += [f"{name} changed since it was made" for name, artifact in record.get("outputs", {}).items()
                    if name in run.outputs and fingerprint(run.outputs[name]) != artifact["fingerprint"]]
        return Status("changed", changed) if changed else Status("done")

    def may_rebuild(self, run: Run, built: set[Path]) -> bool:
        if reads(run, built):
            return True  # an input is (re)made by this invocation: what was made from the old one is stale
        return self.rebuild is not None and (not self.rebuild or run.stage in self.rebuild)

    def decide(self, run: Run, built: set[Path]) -> tuple[str, Status, list[str]]:
        """What to do with ``run`` when ``built`` are (re)made before it: ``done`` (skip it), ``run``, ``remake``
        (delete its artifact and make it again) or ``refused`` (made otherwise, and no --rebuild says to remake it)."""
        status, cascade = self.status(run), reads(run, built)
        explicit = bool(self.rebuild) and run.stage in self.rebuild
        if status.kind in ("done", "adopted") and not cascade and not explicit:
            return "done", status, []
        if status.kind in ("differs", "changed") and not self.may_rebuild(run, built):
            return "refused", status, status.reasons
        if status.kind == "missing":
            return "run", status, []
        return "remake", status, status.reasons or (["an input is remade"] if cascade else ["--rebuild"])

    def decisions(self) -> Iterator[tuple[Run, str, list[str]]]:
        """`decide` for every run of the recipe, before any work (``pending``: a setting waits for a choice an
        earlier run records), as if the runs before each were made."""
        to_build: set[Path] = set()
        for stage in self.ctx.stages:
            for run in build_runs(self.ctx, stage):
                if run.pending:
                    yield run, "pending", []
                    continue
                action, _, reasons = self.decide(run, to_build)
                if action in ("run", "remake"):
                    to_build.update(resolved(path) for path in run.outputs.values())
                yield run, action, reasons

    def check(self) -> None:
        """Refuse, before any work, the runs whose complete artifacts were made with other settings."""
        refused = [f"{run.name} ({'; '.join(reasons)})" for run, action, reasons in self.decisions()
                   if action == "refused"]
        if refused:
            raise UsageError(f"{self.layout.out} holds complete runs made otherwise: {', '.join(refused)}. Pass "
                             "--rebuild to remake them and what reads them (or --rebuild STAGE ...), or give another "
                             "out=")

    def execute(self, ledger: Ledger) -> None:
        for stage in self.ctx.skipped:
            print(f"== {stage}: not run (shared.{'dataset' if stage == 'preprocess' else 'knn_targets'} is given)")
        for stage in self.ctx.stages:
            finished: set[str] = set()
            while True:  # a run's settings may come from a choice the run before it records: build them anew
                run = next((r for r in build_runs(self.ctx, stage) if r.name not in finished), None)
                if run is None:
                    break
                if run.pending:
                    raise UsageError(f"stage {run.name}: {CHOSEN} was not recorded by the run before it")
                self.one(run, ledger)
                finished.add(run.name)

    def one(self, run: Run, ledger: Ledger) -> None:
        action, status, reasons = self.decide(run, self.built)
        if action == "done":
            note = "" if status.kind == "done" else " (made before settings were recorded: adopted as it is)"
            print(f"== {run.name}: already done ({run.done}){note}")
            if status.kind == "adopted" or run.name not in ledger.runs:
                self.finish(run, ledger, {}, "adopted" if status.kind == "adopted" else "reused")
            else:  # the numbers as the results file holds them now (the ledger's entry may predate a format)
                ledger.record(run.name, {**ledger.runs[run.name], "metrics": metrics_of(run)})
            return
        if action == "refused":
            raise UsageError(f"stage {run.name}: {'; '.join(reasons)}; pass --rebuild {run.stage} to remake it")
        if action == "remake":
            for path in run.outputs.values():
                logger.info("Removing %s to remake it (%s)", path, "; ".join(reasons))
                for doomed in (path, partial_path(path)):
                    shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink(missing_ok=True)
        print(f"== {run.name}\n   {run.command()}", flush=True)
        with measured() as resources:
            call(run)
        print(f"== {run.name} took {resources['wall_seconds']:.0f} s", flush=True)
        self.built.update(resolved(path) for path in run.outputs.values())
        self.finish(run, ledger, resources, "ran")

    def finish(self, run: Run, ledger: Ledger, resources: dict, how: str) -> None:
        out = self.layout.out
        entry = {"stage": run.stage, "module": run.module, "command": normalized(run.command(), out),
                 "settings": {k: normalized(v, out) for k, v in run.settings.items()},
                 "inputs": artifacts(run.inputs, out), "outputs": artifacts(run.outputs, out)}
        if not run.always:
            self.layout.stage_records.mkdir(parents=True, exist_ok=True)
            write_json(self.layout.stage_record(run.name), {**entry, "recorded": now(), "how": how})
        ledger.record(run.name, {**entry, "metrics": metrics_of(run), "status": how, **resources})


def write_model_card(ctx: Context, ledger: Ledger) -> None:
    """The memory's README.md with the run's metrics (the summary's) and how it was made."""
    from models.model_card import card_metrics, write_memory_card

    if not (ctx.layout.memory / "meta.json").is_file():
        return
    summary = read_json(ctx.layout.summary) if ctx.layout.summary.is_file() else {}
    made_by = f"bash scripts/pipeline.sh {ctx.recipe.path} {' '.join(ctx.recipe.overrides)}".strip()
    preprocess = ctx.expanded("preprocess") if "preprocess" in ctx.stages else {}
    hub_dataset = preprocess.get("dataset_name")
    dataset = " ".join(filter(None, (hub_dataset, preprocess.get("dataset_config_name")))) or f"{ctx.recipe.name} text"
    downloaded = ctx.expanded("download").get("base_model") if "download" in ctx.stages else None
    on_hub = downloaded if downloaded and ctx.shared["model"] == str(ctx.layout.download(downloaded)) else None
    write_memory_card(ctx.layout.memory, card_metrics(summary, dataset, hub_dataset or "local"), made_by=made_by,
                      ledger=str(ctx.layout.ledger), datasets=[hub_dataset] if hub_dataset else [], base_model=on_hub)


def run_recipe(recipe_path: str, overrides: list[str], dry_run: bool = False, rebuild: list[str] | None = None) -> dict:
    recipe = read_recipe(recipe_path, overrides)
    check_recipe(recipe, schema())
    ctx = Context(recipe, REPO)
    if dry_run:
        from scripts.plan import dry_run as plan

        text = plan(ctx, Runner(ctx, rebuild).decisions())
        print(text)
        return {"dry_run": text}
    runner = Runner(ctx, rebuild)
    logger.info("Recipe %s into %s: stages %s; shared %s", recipe.path, ctx.layout.out, ", ".join(ctx.stages),
                {k: v for k, v in ctx.shared.items() if v is not None})
    runner.check()
    ctx.layout.out.mkdir(parents=True, exist_ok=True)
    with artifact_lock(ctx.layout.ledger, "out"):
        info = {"path": recipe.path, "name": recipe.name, "text": recipe.text, "overrides": recipe.overrides,
                "shared": {k: normalized(v, ctx.layout.out) for k, v in ctx.shared.items()},
                "stages": ctx.stages, "not_run": ctx.skipped}
        ledger = Ledger(ctx.layout.ledger, info, machine())
        ledger.save()
        with measured() as total:
            runner.execute(ledger)
        write_model_card(ctx, ledger)
    print(f"Pipeline {recipe.name} finished in {total['wall_seconds']:.0f} s; everything is under {ctx.layout.out} "
          f"(ledger: {ctx.layout.ledger})")
    return ledger.data


def compare_runs(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m scripts.pipeline compare",
                                     description="What differs between two runs: settings, versions, artifacts, "
                                                 "results.")
    parser.add_argument("run_a", help="A run directory (or its ledger.json).")
    parser.add_argument("run_b", help="Another run directory (or its ledger.json).")
    args = parser.parse_args(argv)
    diff = compare(read_ledger(args.run_a), read_ledger(args.run_b))
    print(format_comparison(diff, args.run_a, args.run_b))
    return diff


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if argv[:1] == ["compare"]:
        return compare_runs(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m scripts.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="A recipe file (scripts/recipes/*.yaml).")
    parser.add_argument("overrides", nargs="*", help="section.key=value (out=DIR for the output directory).")
    parser.add_argument("--dry_run", action="store_true", help="Print the plan; run nothing, load no model.")
    parser.add_argument("--rebuild", nargs="*", metavar="STAGE", help="Remake these stages (none named: every stage "
                        "whose settings differ), and the stages that read what they make.")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="An override.")
    args = parser.parse_args(argv)
    return run_recipe(args.recipe, [*args.overrides, *args.set], args.dry_run, args.rebuild)


if __name__ == "__main__":
    run(main)
