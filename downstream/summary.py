"""Gather the quickstart's results into ``summary.json`` and a printed Markdown table.

    python -m downstream.summary --output_dir outputs/quickstart

Each entry reads a file some stage wrote; entries whose stage has not run are left out. The paths are the run
layout's (`utils.run_layout`). The headline numbers are on the test split, at the choices the stages
recorded on validation; the summary reads each choice and never makes one:

* base + memory perplexity at the ``lmbda`` that ``eval_joint_validation`` recorded (``lmbda_choice``: the
  lowest validation perplexity), reported on test (``eval_joint_test``); with no validation sweep, at the
  one ``lmbda`` of the test run (fixed);
* the kNN-LM at the ``lmbda`` that ``eval_knnlm_validation`` recorded when it ran there with a sweep, else
  at its fixed ``lmbda`` (``eval_knnlm_test``);
* QA exact match and F1 of the base alone (``qa_test/base``) and of base + memory (``qa_test/lmbda_<l>``)
  at the ``lmbda`` recorded in ``qa_validation/lmbda_choice.json`` (`downstream.choose_lmbda --output_file`);
* one question whose answer the memory corrects (``correction.json``, `demo.generation_example`);
* accuracy on the corpus's yes/no questions and hallucination judgments about the test facts, with and without
  the memory (at the QA ``lmbda``), each read two ways: judged from the model's likelihoods of the answers
  (``yes_no_claims_test``, `downstream.strategyqa --judge claim`: "Yes" when the claimed answer is the likeliest
  of its relation's values; ``halueval_pairs_test``, `downstream.halueval --judge pair`: the less likely of a
  sample's two answers is the hallucinated one), and answered "Yes" or "No" in words after a fixed few-shot
  prompt of train-only facts (``yes_no_fewshot_test``, ``halueval_fewshot_test``). Per run: accuracy with its 95%
  Wilson interval, the share of "Yes" answers, the AUC of the judgment's margin against the right answer, the
  always-"No" and majority-answer baselines, and the paired difference (bootstrap interval, McNemar's exact
  test), from the runs' ``predictions.jsonl`` (`downstream.judgment_stats`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from downstream.choose_lmbda import read_choice, read_sweep
from downstream.judgment_stats import judgment_report
from models.memory_directory import TRAINING_RESULTS
from utils.cli import UsageError, run
from utils.environment import machine
from utils.io import read_json, write_json
from utils.run_layout import (EVAL_RESULTS, HALUEVAL_RESULTS, JOINT_RESULTS, KNNLM_RESULTS, META, QA_RESULTS,
                              YES_NO_RESULTS, RunLayout)

QA_METRICS = ("exact_match", "f1", "contains")


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def recorded_choice(validation: dict, path: Path) -> float:
    """The lmbda a validation sweep recorded as its choice (``lmbda_choice``); an error when it recorded none."""
    choice = validation.get("lmbda_choice")
    if not choice:
        raise UsageError(f"{path} records no lmbda_choice (a sweep written before choices were recorded, or a single "
                         "lmbda): rerun that evaluation on validation with several --lmbda")
    return choice["lmbda"]


def chosen_on_validation(validation: dict, test: dict, path: Path) -> tuple[float, float]:
    """The lmbda recorded on validation and the test perplexity at that lmbda; the test sweep must hold it."""
    chosen = recorded_choice(validation, path)
    on_test = {entry["lmbda"]: entry["perplexity"] for entry in test["lmbda_sweep"]}
    if chosen not in on_test:
        raise UsageError(f"lmbda {chosen:g}, chosen on validation ({path}), is not in the test sweep "
                         f"({sorted(on_test)}): run both sweeps with the same lmbdas")
    return chosen, on_test[chosen]


def _sweep(joint_results: dict) -> dict:
    return {f"{entry['lmbda']:g}": entry["perplexity"] for entry in joint_results["lmbda_sweep"]}


def _qa(results: dict) -> dict:
    return {key: results[key] for key in QA_METRICS}


def _sweeps(validation: dict | None, test: dict | None) -> bool:
    """Whether a validation run swept lmbda (so a choice was made there) for a test run to report."""
    return bool(validation and test and len(validation.get("lmbda_sweep", [])) > 1 and "lmbda_sweep" in test)


def _perplexity(layout: RunLayout, summary: dict) -> None:
    """Test perplexities (base, kNN-LM, memory alone, base + memory at the lmbda recorded on validation), tokens/s."""
    perplexity, speed, lmbda = {}, {}, {}
    if base := _read(layout.eval_base("test") / EVAL_RESULTS):
        perplexity["base"] = base["perplexity"]
        speed["base"] = base["eval_tokens_per_second"]
        summary["test_tokens"] = base["eval_tokens"]
    if knnlm := _read(layout.knnlm("test") / KNNLM_RESULTS):
        perplexity["knn_lm"], lmbda["knn_lm"], chosen_on = knnlm["perplexity"], knnlm["lmbda"], "fixed"
        knn_validation = _read(layout.knnlm("validation") / KNNLM_RESULTS)
        if _sweeps(knn_validation, knnlm):
            lmbda["knn_lm"], perplexity["knn_lm"] = chosen_on_validation(
                knn_validation, knnlm, layout.knnlm("validation") / KNNLM_RESULTS)
            chosen_on = "validation perplexity"
        speed["knn_lm"] = knnlm["eval_tokens_per_second"]
        summary["knn_lm_settings"] = {"k": knnlm["k"], "lmbda": lmbda["knn_lm"], "knn_temp": knnlm["knn_temp"],
                                      "index": knnlm["index_type"], "lmbda_chosen_on": chosen_on}
    validation = _read(layout.eval_joint("validation") / JOINT_RESULTS)
    test = _read(layout.eval_joint("test") / JOINT_RESULTS)
    if test:
        perplexity["memory_alone"] = test["memory_perplexity"]
        speed["base_plus_memory"] = test["joint_tokens_per_second"]
        speed["base_in_the_same_run"] = test["base_tokens_per_second"]
        summary["test_perplexity_by_lmbda"] = _sweep(test)
    if validation:
        summary["validation_perplexity"] = {"base": validation["base_perplexity"], **_sweep(validation)}
    if _sweeps(validation, test):
        lmbda["base_plus_memory"], perplexity["base_plus_memory"] = chosen_on_validation(
            validation, test, layout.eval_joint("validation") / JOINT_RESULTS)
        lmbda["base_plus_memory_chosen_on"] = "validation perplexity"
    elif test and len(test["lmbda_sweep"]) == 1:  # one lmbda given (the released evaluation's 0.25): nothing chosen
        lmbda["base_plus_memory"], perplexity["base_plus_memory"] = test["lmbda"], test["perplexity"]
        lmbda["base_plus_memory_chosen_on"] = "fixed"
    if perplexity:
        summary["test_perplexity"] = perplexity
    if speed:
        summary["tokens_per_second"] = speed
    if lmbda:
        summary["lmbda"] = lmbda


def _memory_runs(directory: Path) -> list[dict]:
    """The eval_qa runs with the memory under ``directory/lmbda_*``, sorted by lmbda."""
    found = sorted(path for path in glob.glob(str(directory / "lmbda_*")) if os.path.isdir(path))
    return read_sweep(found) if found else []


def _question_answering(layout: RunLayout, summary: dict) -> None:
    """QA on the test questions with and without the memory; the lmbda sweep on the validation questions.

    The test run with the memory is the one (of ``qa_test/lmbda_*``) at the lmbda recorded in
    ``qa_validation/lmbda_choice.json``; without a validation sweep, the only test run there is, at a fixed lmbda.
    """
    sweep = _memory_runs(layout.qa_dir("validation"))
    if sweep:
        validation = {"questions": sweep[0]["count"],
                      "base_plus_memory_by_lmbda": {f"{r['lmbda']:g}": _qa(r) for r in sweep}}
        if base := _read(layout.qa("validation", None) / QA_RESULTS):
            validation["base"] = _qa(base)
        summary["qa_validation"] = validation
    qa_test = {}
    if base := _read(layout.qa("test", None) / QA_RESULTS):
        qa_test.update(questions=base["count"], base=_qa(base))
    if test_runs := _memory_runs(layout.qa_dir("test")):
        if sweep:
            chosen = read_choice(layout.qa_choice)["lmbda"]
            joint = next((r for r in test_runs if r["lmbda"] == chosen), None)
            if joint is None:
                raise UsageError(f"{layout.qa_dir('test')} has no run at lmbda {chosen:g}, the one chosen on the "
                                 f"validation questions (runs: {[r['lmbda'] for r in test_runs]}): run "
                                 "downstream.eval_qa there")
            chosen_on = "validation questions (exact match)"
        elif len(test_runs) == 1:
            joint, chosen_on = test_runs[0], "fixed"
        else:
            raise UsageError(f"{layout.qa_dir('test')} has runs at several lmbdas and {layout.qa_dir('validation')} has "
                             "no "
                             "sweep to choose one: run the sweep on the validation questions")
        qa_test.update(questions=joint["count"], base_plus_memory=_qa(joint), lmbda=joint["lmbda"],
                       lmbda_chosen_on=chosen_on)
    if qa_test:
        summary["qa_test"] = qa_test


def judgment_runs(layout: RunLayout) -> tuple:
    """Summary key, run directory, its results file, the corpus meta entry counting its shots, per judgment."""
    return (("yes_no_claims_test", layout.yes_no_claims, YES_NO_RESULTS, None),
            ("yes_no_test", layout.yes_no, YES_NO_RESULTS, ("yes_no_test", "shots")),
            ("hallucination_pairs_test", layout.halueval_pairs, HALUEVAL_RESULTS, None),
            ("hallucination_test", layout.halueval, HALUEVAL_RESULTS, ("halueval_fewshot", "shots")))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _judgments(layout: RunLayout, summary: dict) -> None:
    """The yes/no questions and the hallucination judgments, base and base + memory (`judgment_report`)."""
    corpus = _read(layout.corpus_file(META)) or {}
    for key, directory, results_file, shots in judgment_runs(layout):
        if (found := _read(directory / results_file)) is None:
            continue
        rows = _read_jsonl(directory / "predictions.jsonl")
        summary[key] = {"shots": corpus.get(shots[0], {}).get(shots[1]) if shots else None, "judge": found.get("judge"),
                        "lmbda": found["lmbda"], **judgment_report(rows)}


def _correction(layout: RunLayout, summary: dict) -> None:
    """The first test question whose answer the memory corrects, from `demo.generation_example`'s JSON."""
    if (found := _read(layout.correction)) is None:
        return
    if not found["examples"]:
        summary["correction"] = None
        return
    example = found["examples"][0]
    summary["correction"] = {"prompt": example["prompt"], "gold": example["gold"],
                             "base": example["base"], "base_plus_memory": example["joint"],
                             "lmbda": found["summary"]["lmbda"]}


def collect(out: Path) -> dict:
    """The run's numbers, keyed by what they measure."""
    layout = RunLayout(out)
    summary: dict = {}
    if dataset := _read(layout.dataset / META):
        summary["tokens"] = {split: s["tokens"] for split, s in dataset["splits"].items()}
        summary["block_size"], summary["stride"] = dataset["block_size"], dataset["stride"]
    if config := _read(layout.base / "config.json"):
        summary["base_model"] = {"model_type": config["model_type"],
                                 "layers": config.get("num_hidden_layers", config.get("n_layer")),
                                 "hidden_size": config.get("hidden_size", config.get("n_embd"))}
    if train := _read(layout.base / "train_results.json"):
        summary["base_training"] = {"seconds": train.get("train_runtime"), "loss": train.get("train_loss"),
                                    "epochs": train.get("train_epoch", train.get("epoch"))}
    _perplexity(layout, summary)
    if dstore := _read(layout.dstore / META):
        summary["datastore"] = {"rows": dstore["rows"], "dim": dstore["dim"], "seconds": dstore["seconds"],
                                "rows_per_second": round(dstore["rows"] / max(dstore["seconds"], 1e-9), 1)}
    if targets := _read(layout.knn_targets / META):
        summary["knn_targets"] = {"rows": targets["rows"], "k": targets["k"], "knn_temp": targets["knn_temp"],
                                  "entries_per_row": round(targets["nnz"] / max(targets["rows"], 1), 2)}
    if memory := _read(layout.memory / TRAINING_RESULTS):
        summary["memory_training"] = {"seconds": memory["train_seconds"], "steps": memory["train_steps"],
                                      "validation_kl_to_knn": memory["val_kl"],
                                      "validation_top1_agreement_with_knn": memory["val_top1_agreement"]}
    _question_answering(layout, summary)
    _judgments(layout, summary)
    _correction(layout, summary)
    summary["environment"] = machine()  # the digits above depend on these versions (and on the CPU)
    return summary


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headline_table(summary: dict) -> str:
    """Base, kNN-LM and base + memory side by side on test: perplexity, tokens/s, QA."""
    perplexity = summary.get("test_perplexity", {})
    speed = summary.get("tokens_per_second", {})
    lmbda = summary.get("lmbda", {})
    qa = summary.get("qa_test", {})
    knn_fixed = summary.get("knn_lm_settings", {}).get("lmbda_chosen_on") == "fixed"
    knn_chosen = "fixed" if knn_fixed else "best on validation"
    knn_note = f" (lmbda {lmbda['knn_lm']:g}, {knn_chosen})" if "knn_lm" in lmbda else ""
    joint_note = f" (lmbda {lmbda['base_plus_memory']:g}, best on validation)" if "base_plus_memory" in lmbda else ""
    lines = ["| test split | base | kNN-LM | base + memory |", "|---|---|---|---|",
             f"| perplexity | {_number(perplexity.get('base'))} | {_number(perplexity.get('knn_lm'))}{knn_note} "
             f"| {_number(perplexity.get('base_plus_memory'))}{joint_note} |",
             f"| tokens/s | {_number(speed.get('base'), 0)} | {_number(speed.get('knn_lm'), 0)} "
             f"| {_number(speed.get('base_plus_memory'), 0)} |"]
    if qa:
        qa_note = f" (lmbda {qa['lmbda']:g}, {qa['lmbda_chosen_on']})" if "lmbda" in qa else ""
        for key, name in (("exact_match", "exact match"), ("f1", "F1")):
            base, joint = qa.get("base", {}).get(key), qa.get("base_plus_memory", {}).get(key)
            lines.append(f"| QA {name}, {qa['questions']} questions | {_number(base)} | - "
                         f"| {_number(joint)}{qa_note if key == 'exact_match' else ''} |")
    lines += _judgment_rows(summary)
    return "\n".join(lines)


JUDGMENT_NAMES = {"yes_no_claims_test": "yes/no accuracy, {items} questions, judged by the claim's likelihood",
                  "yes_no_test": "yes/no accuracy, {items} questions, answered Yes/No",
                  "hallucination_pairs_test": "hallucination judgment accuracy, {items} answers, judged by the two "
                                              "answers' likelihoods",
                  "hallucination_test": "hallucination judgment accuracy, {items} answers, answered Yes/No"}


def _accuracy(found: dict | None) -> str:
    """``60.0 [53.8, 65.9]``: an accuracy and its 95% interval."""
    if not found:
        return "-"
    low, high = found["interval"]
    return f"{found['accuracy']:.1f} [{low:.1f}, {high:.1f}]"


def _judgment_rows(summary: dict) -> list[str]:
    """Headline rows of the yes/no and hallucination-judgment accuracies, with their 95% intervals (memory at the
    QA lmbda)."""
    rows = []
    for key, name in JUDGMENT_NAMES.items():
        if not (found := summary.get(key)):
            continue
        shots = f", {found['shots']}-shot" if found.get("shots") else ""
        note = f" (lmbda {found['lmbda']:g})" if found.get("lmbda") is not None else ""
        rows.append(f"| {name.format(items=found['items'])}{shots} (majority answer: {_number(found['majority'])}) "
                    f"| {_accuracy(found.get('base'))} | - | {_accuracy(found.get('base_plus_memory'))}{note} |")
    return rows


def _p_value(p: float) -> str:
    """``0.06``, or ``2e-06`` below 0.01 (two decimals would print 0.00)."""
    return f"{p:.2f}" if p >= 0.01 else f"{p:.0e}"


def judgment_table(summary: dict) -> str:
    """What the memory does to each judgment: baselines, "Yes" rates and the paired difference on the same items."""
    lines = ["| test judgments | always \"No\" | majority answer | \"Yes\" rate, base / base + memory "
             "| margin AUC, base / base + memory | base + memory - base (paired 95% CI) "
             "| items right under one only: base / memory (McNemar p) |", "|---|---|---|---|---|---|---|"]
    for key, name in JUDGMENT_NAMES.items():
        if not (found := summary.get(key)):
            continue
        yes, auc = (" / ".join(_number(found.get(setting, {}).get(measure)) for setting in ("base", "base_plus_memory"))
                    for measure in ("yes_rate", "margin_auc"))
        paired = found.get("memory_minus_base")
        difference = (f"{paired['points']:+.1f} [{paired['interval'][0]:+.1f}, {paired['interval'][1]:+.1f}]"
                      if paired else "-")
        split = f"{paired['base_only']} / {paired['memory_only']} (p {_p_value(paired['mcnemar_p'])})" if paired else "-"
        lines.append(f"| {name.format(items=found['items'])} | {_number(found['always_no'])} "
                     f"| {_number(found['majority'])} | {yes} | {auc} | {difference} | {split} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def correction_text(correction: dict | None) -> str:
    """The corrected question as four lines."""
    if correction is None:
        return "No test question found whose answer the memory corrects."
    first = lambda text: text.strip().split("\n", 1)[0].strip()  # noqa: E731
    return "\n".join([f"A fact the memory corrects (lmbda {correction['lmbda']:g}, greedy):",
                      f"    prompt        : {correction['prompt']}",
                      f"    base          : {first(correction['base'])}",
                      f"    base + memory : {first(correction['base_plus_memory'])}",
                      f"    gold          : {' | '.join(correction['gold'])}"])


def details_table(summary: dict) -> str:
    """Every number of the summary as a two-column Markdown table."""
    lines = ["| what | value |", "|---|---|"]

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, v in value.items():
                add(f"{key} / {sub}", v)
        elif isinstance(value, list):
            lines.append(f"| {key} | {' / '.join(map(str, value))} |")
        else:
            lines.append(f"| {key} | {round(value, 3) if isinstance(value, float) else value} |")

    for key, value in summary.items():
        if key != "correction":
            add(key, value)
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """The headline table, the corrected fact (when the QA stages ran) and the details."""
    parts = [headline_table(summary)]
    if table := judgment_table(summary):
        parts.append(table)
    if "correction" in summary:
        parts.append(correction_text(summary["correction"]))
    parts.append(details_table(summary))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m downstream.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="A run's output directory (the quickstart's, or a recipe's).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    if not out.is_dir():
        raise UsageError(f"--output_dir {out} is not a directory: run scripts/quickstart.sh first")
    summary = collect(out)
    write_json(RunLayout(out).summary, summary)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    run(main)
