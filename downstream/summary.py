"""Gather the quickstart's results into ``summary.json`` and a printed Markdown table.

    python -m downstream.summary --output_dir outputs/quickstart

Each entry reads a file some stage wrote; entries whose stage has not run are left out. The headline
numbers are on the test split, with every choice made on validation:

* base + memory perplexity at the ``lmbda`` with the lowest validation perplexity
  (``eval_joint_validation``), reported on test (``eval_joint_test``);
* the kNN-LM at the ``lmbda`` best on validation when it ran there with a sweep (``eval_knnlm_validation``),
  else at its fixed ``lmbda`` (``eval_knnlm_test``);
* QA exact match and F1 of the base alone (``qa_test/base``) and of base + memory
  (``qa_test/lmbda_<l>``) at the ``lmbda`` chosen on the validation questions (``qa_validation/lmbda_*``,
  `downstream.choose_lmbda`);
* one question whose answer the memory corrects (``correction.json``, `demo.generation_example`);
* accuracy on the corpus's yes/no questions (``yes_no_fewshot_test``, `downstream.strategyqa`) and hallucination
  judgments (``halueval_fewshot_test``, `downstream.halueval`) about the test facts, each after its fixed few-shot
  prompt of train-only facts, with and without the memory (at the QA ``lmbda``): accuracy with its 95% Wilson
  interval, the share of "Yes" answers, the AUC of the " Yes" - " No" margin against the right answer, the
  always-"No" and majority-answer baselines, and the paired
  difference (bootstrap interval, McNemar's exact test), from the runs' ``predictions.jsonl``
  (`downstream.judgment_stats`).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from downstream.choose_lmbda import best_run, read_sweep
from downstream.judgment_stats import judgment_report
from models.memory_directory import TRAINING_RESULTS
from utils.cli import UsageError, run
from utils.environment import machine
from utils.io import read_json, write_json

QA_METRICS = ("exact_match", "f1", "contains")


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def best_lmbda(joint_results: dict) -> dict:
    """The entry of a joint evaluation's ``lmbda_sweep`` with the lowest perplexity."""
    return min(joint_results["lmbda_sweep"], key=lambda entry: (entry["perplexity"], entry["lmbda"]))


def chosen_on_validation(validation: dict, test: dict) -> tuple[float, float]:
    """The lmbda best on validation and the test perplexity at that lmbda; both sweeps must hold it."""
    chosen = best_lmbda(validation)["lmbda"]
    on_test = {entry["lmbda"]: entry["perplexity"] for entry in test["lmbda_sweep"]}
    if chosen not in on_test:
        raise UsageError(f"lmbda {chosen:g}, best on validation, is not in the test sweep "
                         f"({sorted(on_test)}): run both sweeps with the same lmbdas")
    return chosen, on_test[chosen]


def _sweep(joint_results: dict) -> dict:
    return {f"{entry['lmbda']:g}": entry["perplexity"] for entry in joint_results["lmbda_sweep"]}


def _qa(results: dict) -> dict:
    return {key: results[key] for key in QA_METRICS}


def _perplexity(out: Path, summary: dict) -> None:
    """Test perplexities (base, kNN-LM, memory alone, base + memory at the lmbda best on validation), tokens/s."""
    perplexity, speed, lmbda = {}, {}, {}
    if base := _read(out / "eval_base_test" / "eval_results.json"):
        perplexity["base"] = base["perplexity"]
        speed["base"] = base["eval_tokens_per_second"]
        summary["test_tokens"] = base["eval_tokens"]
    if knnlm := _read(out / "eval_knnlm_test" / "knnlm_results.json"):
        perplexity["knn_lm"], lmbda["knn_lm"], chosen_on = knnlm["perplexity"], knnlm["lmbda"], "fixed"
        knn_validation = _read(out / "eval_knnlm_validation" / "knnlm_results.json")
        if knn_validation and "lmbda_sweep" in knn_validation and "lmbda_sweep" in knnlm:
            lmbda["knn_lm"], perplexity["knn_lm"] = chosen_on_validation(knn_validation, knnlm)
            chosen_on = "validation perplexity"
        speed["knn_lm"] = knnlm["eval_tokens_per_second"]
        summary["knn_lm_settings"] = {"k": knnlm["k"], "lmbda": lmbda["knn_lm"], "knn_temp": knnlm["knn_temp"],
                                      "index": knnlm["index_type"], "lmbda_chosen_on": chosen_on}
    validation = _read(out / "eval_joint_validation" / "joint_results.json")
    test = _read(out / "eval_joint_test" / "joint_results.json")
    if test:
        perplexity["memory_alone"] = test["memory_perplexity"]
        speed["base_plus_memory"] = test["joint_tokens_per_second"]
        speed["base_in_the_same_run"] = test["base_tokens_per_second"]
        summary["test_perplexity_by_lmbda"] = _sweep(test)
    if validation:
        summary["validation_perplexity"] = {"base": validation["base_perplexity"], **_sweep(validation)}
    if validation and test:
        lmbda["base_plus_memory"], perplexity["base_plus_memory"] = chosen_on_validation(validation, test)
        lmbda["base_plus_memory_chosen_on"] = "validation perplexity"
    if perplexity:
        summary["test_perplexity"] = perplexity
    if speed:
        summary["tokens_per_second"] = speed
    if lmbda:
        summary["lmbda"] = lmbda


def _memory_runs(directory: Path) -> list[dict]:
    """The eval_qa runs with the memory under ``directory/lmbda_*``, sorted by lmbda."""
    found = sorted(glob.glob(str(directory / "lmbda_*")))
    return read_sweep(found) if found else []


def _question_answering(out: Path, summary: dict) -> None:
    """QA on the test questions with and without the memory; the lmbda sweep on the validation questions.

    The test run with the memory is the one (of ``qa_test/lmbda_*``) at the lmbda best on the validation
    questions; without a validation sweep, the only test run there is, at a fixed lmbda.
    """
    sweep = _memory_runs(out / "qa_validation")
    if sweep:
        validation = {"questions": sweep[0]["count"],
                      "base_plus_memory_by_lmbda": {f"{r['lmbda']:g}": _qa(r) for r in sweep}}
        if base := _read(out / "qa_validation" / "base" / "qa_results.json"):
            validation["base"] = _qa(base)
        summary["qa_validation"] = validation
    qa_test = {}
    if base := _read(out / "qa_test" / "base" / "qa_results.json"):
        qa_test.update(questions=base["count"], base=_qa(base))
    if test_runs := _memory_runs(out / "qa_test"):
        if sweep:
            chosen = best_run(sweep)["lmbda"]
            joint = next((r for r in test_runs if r["lmbda"] == chosen), None)
            if joint is None:
                raise UsageError(f"{out / 'qa_test'} has no run at lmbda {chosen:g}, the best on the validation "
                                 f"questions (runs: {[r['lmbda'] for r in test_runs]}): run downstream.eval_qa there")
            chosen_on = "validation questions (exact match)"
        elif len(test_runs) == 1:
            joint, chosen_on = test_runs[0], "fixed"
        else:
            raise UsageError(f"{out / 'qa_test'} has runs at several lmbdas and {out / 'qa_validation'} has no "
                             "sweep to choose one: run the sweep on the validation questions")
        qa_test.update(questions=joint["count"], base_plus_memory=_qa(joint), lmbda=joint["lmbda"],
                       lmbda_chosen_on=chosen_on)
    if qa_test:
        summary["qa_test"] = qa_test


JUDGMENTS = (  # summary key, run directory, its results file, the corpus meta entry counting its shots
    ("yes_no_test", "yes_no_fewshot_test", "strategyqa_results.json", ("yes_no_test", "shots")),
    ("hallucination_test", "halueval_fewshot_test", "halueval_results.json", ("halueval_fewshot", "shots")),
)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _judgments(out: Path, summary: dict) -> None:
    """The yes/no questions and the hallucination judgments, base and base + memory (`judgment_report`)."""
    corpus = _read(out / "corpus" / "meta.json") or {}
    for key, directory, results_file, (entry, field) in JUDGMENTS:
        if (found := _read(out / directory / results_file)) is None:
            continue
        rows = _read_jsonl(out / directory / "predictions.jsonl")
        summary[key] = {"shots": corpus.get(entry, {}).get(field), "lmbda": found["lmbda"], **judgment_report(rows)}


def _correction(out: Path, summary: dict) -> None:
    """The first test question whose answer the memory corrects, from `demo.generation_example`'s JSON."""
    if (found := _read(out / "correction.json")) is None:
        return
    if not found["examples"]:
        summary["correction"] = None
        return
    example = found["examples"][0]
    summary["correction"] = {"prompt": example["prompt"], "gold": example["gold"],
                             "base": example["base"], "base_plus_memory": example["joint"],
                             "lmbda": found["summary"]["lmbda"]}


def collect(out: Path) -> dict:
    """The quickstart's numbers, keyed by what they measure."""
    summary: dict = {}
    if dataset := _read(out / "dataset" / "meta.json"):
        summary["tokens"] = {split: s["tokens"] for split, s in dataset["splits"].items()}
        summary["block_size"], summary["stride"] = dataset["block_size"], dataset["stride"]
    if config := _read(out / "base" / "config.json"):
        summary["base_model"] = {"model_type": config["model_type"],
                                 "layers": config.get("num_hidden_layers", config.get("n_layer")),
                                 "hidden_size": config.get("hidden_size", config.get("n_embd"))}
    if train := _read(out / "base" / "train_results.json"):
        summary["base_training"] = {"seconds": train.get("train_runtime"), "loss": train.get("train_loss"),
                                    "epochs": train.get("train_epoch", train.get("epoch"))}
    _perplexity(out, summary)
    if dstore := _read(out / "dstore" / "meta.json"):
        summary["datastore"] = {"rows": dstore["rows"], "dim": dstore["dim"], "seconds": dstore["seconds"],
                                "rows_per_second": round(dstore["rows"] / max(dstore["seconds"], 1e-9), 1)}
    if targets := _read(out / "knn_targets" / "meta.json"):
        summary["knn_targets"] = {"rows": targets["rows"], "k": targets["k"], "knn_temp": targets["knn_temp"],
                                  "entries_per_row": round(targets["nnz"] / max(targets["rows"], 1), 2)}
    if memory := _read(out / "memory" / TRAINING_RESULTS):
        summary["memory_training"] = {"seconds": memory["train_seconds"], "steps": memory["train_steps"],
                                      "validation_kl_to_knn": memory["val_kl"],
                                      "validation_top1_agreement_with_knn": memory["val_top1_agreement"]}
    _question_answering(out, summary)
    _judgments(out, summary)
    _correction(out, summary)
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


JUDGMENT_NAMES = {"yes_no_test": "yes/no accuracy, {items} questions", "hallucination_test":
                  "hallucination judgment accuracy, {items} answers"}


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
        split = f"{paired['base_only']} / {paired['memory_only']} (p {paired['mcnemar_p']:.2f})" if paired else "-"
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m downstream.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="The quickstart's output directory.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    if not out.is_dir():
        raise UsageError(f"--output_dir {out} is not a directory: run scripts/quickstart.sh first")
    summary = collect(out)
    write_json(out / "summary.json", summary)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    run(main)
