"""The quickstart's summary (downstream/summary.py) and the QA lmbda choice (downstream/choose_lmbda.py).

The end-to-end test writes the artifacts with the real entry points on the tiny dataset (base
evaluation, base + memory sweeps on validation and test, QA runs with and without a memory); the other
tests build the result files by hand to pin down the choices (lmbda chosen on validation, not on test).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import evaluate_joint
import train_base
from downstream import choose_lmbda, eval_qa
from downstream import summary as summary_module
from models import MemoryConfig, build_memory
from models.memory_directory import save_memory
from utils.artifacts.dataset import load_split
from utils.cli import UsageError

QUESTIONS = ["the river of the city", "who built the old bridge", "the king was born near", "many people and"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def joint_results(split: str, base: float, sweep: dict[float, float]) -> dict:
    """The fields of evaluate_joint's joint_results.json that the summary reads."""
    return {"eval_subset": split, "base_perplexity": base, "memory_perplexity": 150.0,
            "lmbda_sweep": [{"lmbda": lmbda, "perplexity": ppl} for lmbda, ppl in sweep.items()],
            "base_tokens_per_second": 900.0, "joint_tokens_per_second": 600.0, "eval_tokens": 100}


def qa_results(exact_match: float, f1: float, lmbda: float | None, count: int = 10) -> dict:
    """The fields of eval_qa's qa_results.json that the summary and choose_lmbda read."""
    return {"count": count, "exact_match": exact_match, "f1": f1, "contains": exact_match,
            "use_neural_knn": lmbda is not None, "lmbda": lmbda}


CORRECTION = {"summary": {"lmbda": 0.5, "knn_temp": 1.0, "num_prompts": 10, "base_right": 1, "joint_right": 3,
                          "corrected": 2, "broken": 0},
              "examples": [{"prompt": "Question: Who taught Jordor Zantov? Answer:", "gold": ["Sellan Galquist"],
                            "base": " Perannel Rinzek\nQuestion", "joint": " Sellan Galquist\n",
                            "base_right": False, "joint_right": True, "corrected": True}]}


@pytest.fixture
def constructed(tmp_path) -> Path:
    """A quickstart output directory whose result files are written by hand.

    Validation prefers lmbda 0.5 for perplexity, test would prefer 0.75; the validation questions
    prefer 0.75 for QA (0.5 and 0.75 tie on exact match, 0.75 wins on F1).
    """
    out = tmp_path / "qs"
    write_json(out / "eval_base_test" / "eval_results.json",
               {"perplexity": 80.0, "eval_tokens": 100, "eval_tokens_per_second": 1000.0})
    write_json(out / "eval_knnlm_test" / "knnlm_results.json",
               {"perplexity": 75.0, "eval_tokens_per_second": 300.0, "lmbda": 0.25, "k": 64, "knn_temp": 10.0,
                "index_type": "flat"})
    write_json(out / "eval_joint_validation" / "joint_results.json",
               joint_results("validation", 90.0, {0.25: 85.0, 0.5: 84.0, 0.75: 86.0}))
    write_json(out / "eval_joint_test" / "joint_results.json",
               joint_results("test", 80.0, {0.25: 74.0, 0.5: 73.0, 0.75: 72.0}))
    for lmbda, em, f1 in ((0.25, 10.0, 12.0), (0.5, 20.0, 21.0), (0.75, 20.0, 23.0)):
        write_json(out / "qa_validation" / f"lmbda_{lmbda}" / "qa_results.json", qa_results(em, f1, lmbda))
    write_json(out / "qa_validation" / "base" / "qa_results.json", qa_results(5.0, 6.0, None))
    write_json(out / "qa_test" / "base" / "qa_results.json", qa_results(4.0, 5.0, None))
    write_json(out / "qa_test" / "lmbda_0.75" / "qa_results.json", qa_results(15.0, 17.0, 0.75))
    write_json(out / "qa_test" / "lmbda_0.25" / "qa_results.json", qa_results(12.0, 13.0, 0.25))
    write_json(out / "correction.json", CORRECTION)
    return out


def test_choices_are_made_on_validation(constructed, capsys):
    summary = summary_module.main(["--output_dir", str(constructed)])
    assert json.loads((constructed / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["test_perplexity"] == {"base": 80.0, "knn_lm": 75.0, "memory_alone": 150.0,
                                          "base_plus_memory": 73.0}  # lmbda 0.5 (best on validation), not 72.0
    assert summary["lmbda"] == {"knn_lm": 0.25, "base_plus_memory": 0.5,
                                "base_plus_memory_chosen_on": "validation perplexity"}
    assert summary["test_perplexity_by_lmbda"] == {"0.25": 74.0, "0.5": 73.0, "0.75": 72.0}
    assert summary["tokens_per_second"]["base"] == 1000.0
    assert summary["tokens_per_second"]["knn_lm"] == 300.0 and summary["tokens_per_second"]["base_plus_memory"] == 600.0
    assert summary["qa_test"] == {"questions": 10, "base": {"exact_match": 4.0, "f1": 5.0, "contains": 4.0},
                                  "base_plus_memory": {"exact_match": 15.0, "f1": 17.0, "contains": 15.0},
                                  "lmbda": 0.75, "lmbda_chosen_on": "validation questions (exact match)"}
    assert summary["qa_validation"]["base"]["exact_match"] == 5.0
    # the versions the digits depend on are recorded with them
    assert summary["environment"]["torch"] == torch.__version__ and summary["environment"]["cores"] >= 1
    assert set(summary["qa_validation"]["base_plus_memory_by_lmbda"]) == {"0.25", "0.5", "0.75"}
    assert summary["correction"] == {"prompt": CORRECTION["examples"][0]["prompt"], "gold": ["Sellan Galquist"],
                                     "base": " Perannel Rinzek\nQuestion", "base_plus_memory": " Sellan Galquist\n",
                                     "lmbda": 0.5}
    printed = capsys.readouterr().out
    assert "| perplexity | 80.0 | 75.0 (lmbda 0.25, fixed) | 73.0 (lmbda 0.5, best on validation) |" in printed
    qa_row = "| QA exact match, 10 questions | 4.0 | - | 15.0 (lmbda 0.75, validation questions (exact match)) |"
    assert qa_row in printed
    assert "base          : Perannel Rinzek" in printed and "base + memory : Sellan Galquist" in printed


def test_mismatched_choices_are_errors(constructed):
    shutil.rmtree(constructed / "qa_test" / "lmbda_0.75")
    with pytest.raises(UsageError, match=r"no run at lmbda 0.75, the best on the validation questions"):
        summary_module.collect(constructed)
    shutil.rmtree(constructed / "qa_validation")
    write_json(constructed / "qa_test" / "lmbda_0.5" / "qa_results.json", qa_results(15.0, 17.0, 0.5))
    with pytest.raises(UsageError, match=r"runs at several lmbdas .* no sweep to choose one"):
        summary_module.collect(constructed)
    shutil.rmtree(constructed / "qa_test" / "lmbda_0.5")
    assert summary_module.collect(constructed)["qa_test"]["lmbda_chosen_on"] == "fixed"  # one run: a fixed lmbda
    write_json(constructed / "eval_joint_test" / "joint_results.json", joint_results("test", 80.0, {0.25: 74.0}))
    with pytest.raises(UsageError, match=r"lmbda 0.5, best on validation, is not in the test sweep"):
        summary_module.collect(constructed)


def knnlm_results(sweep: dict[float, float]) -> dict:
    """The fields of knn_utils.knnlm's knnlm_results.json that the summary reads; the first lmbda is the headline."""
    first = next(iter(sweep))
    return {"perplexity": sweep[first], "eval_tokens_per_second": 300.0, "lmbda": first, "k": 64, "knn_temp": 10.0,
            "index_type": "flat", "lmbda_sweep": [{"lmbda": l, "perplexity": p} for l, p in sweep.items()]}


def test_knn_lm_lmbda_is_chosen_on_validation_when_it_ran_there(constructed, capsys):
    write_json(constructed / "eval_knnlm_validation" / "knnlm_results.json", knnlm_results({0.25: 86.0, 0.5: 85.0}))
    write_json(constructed / "eval_knnlm_test" / "knnlm_results.json", knnlm_results({0.25: 75.0, 0.5: 76.0}))
    summary = summary_module.main(["--output_dir", str(constructed)])
    assert summary["test_perplexity"]["knn_lm"] == 76.0 and summary["lmbda"]["knn_lm"] == 0.5  # not 75.0 at 0.25
    assert summary["knn_lm_settings"]["lmbda_chosen_on"] == "validation perplexity"
    assert "| 80.0 | 76.0 (lmbda 0.5, best on validation) |" in capsys.readouterr().out
    write_json(constructed / "eval_knnlm_test" / "knnlm_results.json", knnlm_results({0.25: 75.0}))
    with pytest.raises(UsageError, match=r"lmbda 0.5, best on validation, is not in the test sweep"):
        summary_module.collect(constructed)


def test_stages_not_run_are_left_out(constructed, capsys):
    for name in ("eval_knnlm_test", "eval_joint_validation", "qa_validation", "qa_test"):
        shutil.rmtree(constructed / name)
    (constructed / "correction.json").unlink()
    summary = summary_module.main(["--output_dir", str(constructed)])
    assert summary["test_perplexity"] == {"base": 80.0, "memory_alone": 150.0}
    assert "lmbda" not in summary and "qa_test" not in summary and "correction" not in summary
    printed = capsys.readouterr().out
    assert "| perplexity | 80.0 | - | - |" in printed and "QA exact match" not in printed
    with pytest.raises(UsageError, match="is not a directory"):
        summary_module.main(["--output_dir", str(constructed / "missing")])


def test_no_correction_found(constructed, capsys):
    write_json(constructed / "correction.json", {**CORRECTION, "examples": []})
    assert summary_module.main(["--output_dir", str(constructed)])["correction"] is None
    assert "No test question found whose answer the memory corrects." in capsys.readouterr().out


def test_choose_lmbda(constructed, capsys):
    sweep = sorted(str(p) for p in (constructed / "qa_validation").glob("lmbda_*"))
    assert choose_lmbda.main(sweep) == 0.75  # EM ties with 0.5, F1 decides
    assert capsys.readouterr().out == "0.75\n"
    write_json(constructed / "qa_validation" / "lmbda_0.75" / "qa_results.json", qa_results(20.0, 21.0, 0.75))
    assert choose_lmbda.main(sweep) == 0.5  # a full tie goes to the smaller lmbda
    with pytest.raises(UsageError, match="base model alone"):
        choose_lmbda.main([*sweep, str(constructed / "qa_validation" / "base")])
    with pytest.raises(UsageError, match="two runs share a lmbda"):
        choose_lmbda.main([*sweep, sweep[0]])
    with pytest.raises(UsageError, match="has no qa_results.json"):
        choose_lmbda.main([str(constructed / "nowhere")])


# ---- end to end, on artifacts written by the real entry points -----------------------------------

def test_summary_of_real_artifacts(tmp_path, tiny_dataset, tiny_gpt2_dir, capsys):
    out = tmp_path / "qs"
    model = str(tiny_gpt2_dir)
    train_base.main(["--model_name_or_path", model, "--dataset_name", str(tiny_dataset), "--do_eval",
                     "--eval_subset", "test", "--per_device_eval_batch_size", "4", "--report_to", "none",
                     "--output_dir", str(out / "eval_base_test")])
    fingerprint = load_split(str(tiny_dataset), "test").meta["tokenizer"]["fingerprint"]
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(AutoConfig.from_pretrained(model), num_layers=1,
                                                 intermediate_size=48, layer=1, tokenizer_fingerprint=fingerprint))
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.3)
    save_memory(out / "memory", memory, results={}, record={})
    for split in ("validation", "test"):
        evaluate_joint.main(["--model_name_or_path", model, "--dataset_name", str(tiny_dataset),
                             "--dataset_split_name", split, "--per_device_eval_batch_size", "4", "--knn_temp", "1",
                             "--knn_generator_path", str(out / "memory"), "--report_to", "none",
                             "--output_dir", str(out / f"eval_joint_{split}"), "--lmbda", "0.1", "0.5", "0.9"])
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": [q.split()[-1]]}) + "\n" for q in QUESTIONS))
    qa = ["--model_name_or_path", model, "--data_file", str(data), "--prompt_template", "the {question}",
          "--max_new_tokens", "3"]
    memory_flags = ["--use_neural_knn", "--knn_generator_path", str(out / "memory")]
    sweep = [str(out / "qa_validation" / f"lmbda_{lmbda}") for lmbda in ("0", "0.9")]
    for directory, lmbda in zip(sweep, ("0", "0.9")):
        eval_qa.main([*qa, "--output_dir", directory, *memory_flags, "--lmbda", lmbda])
    chosen = choose_lmbda.main(sweep)
    base = eval_qa.main([*qa, "--output_dir", str(out / "qa_test" / "base")])
    joint = eval_qa.main([*qa, "--output_dir", str(out / "qa_test" / f"lmbda_{chosen:g}"), *memory_flags,
                          "--lmbda", str(chosen)])
    capsys.readouterr()

    summary = summary_module.main(["--output_dir", str(out)])
    validation = json.loads((out / "eval_joint_validation" / "joint_results.json").read_text())
    test = json.loads((out / "eval_joint_test" / "joint_results.json").read_text())
    best = min(validation["lmbda_sweep"], key=lambda entry: entry["perplexity"])["lmbda"]
    assert summary["lmbda"]["base_plus_memory"] == best
    assert summary["test_perplexity"]["base_plus_memory"] == next(
        e["perplexity"] for e in test["lmbda_sweep"] if e["lmbda"] == best)
    assert summary["test_perplexity"]["base"] == pytest.approx(test["base_perplexity"])
    assert summary["qa_test"]["questions"] == len(QUESTIONS) and summary["qa_test"]["lmbda"] == chosen
    assert summary["qa_test"]["base"]["exact_match"] == base["exact_match"]
    assert summary["qa_test"]["base_plus_memory"]["f1"] == joint["f1"]
    printed = capsys.readouterr().out
    assert printed.startswith("| test split | base | kNN-LM | base + memory |")
    assert f"(lmbda {best:g}, best on validation)" in printed


def test_yes_no_and_hallucination_accuracy(constructed, capsys):
    """The rows of the corpus's few-shot yes/no questions and hallucination judgments, from the files their stages
    write: accuracy with its Wilson interval, baselines, "Yes" rates and the paired comparison."""
    write_json(constructed / "corpus" / "meta.json", {"yes_no_test": {"shots": 8}, "halueval_fewshot": {"shots": 4}})
    yes_no = [{"choices": ["Yes", "No"], "labels": [int(i < 6), int(i >= 6)],
               "base": {"prediction": int(i % 2), "correct": (i % 2 == 0) == (i < 6)},
               "base_plus_memory": {"prediction": int(i >= 6), "correct": True}} for i in range(10)]
    write_jsonl(constructed / "yes_no_fewshot_test" / "predictions.jsonl", yes_no)
    write_json(constructed / "yes_no_fewshot_test" / "strategyqa_results.json", {"count": 10, "lmbda": 0.75})
    judged = [{"gold": "Yes" if i % 2 else "No", "base": {"prediction": 0, "correct": bool(i % 2)},
               "base_plus_memory": {"prediction": 0, "correct": bool(i % 2)}} for i in range(8)]
    write_jsonl(constructed / "halueval_fewshot_test" / "predictions.jsonl", judged)
    write_json(constructed / "halueval_fewshot_test" / "halueval_results.json", {"count": 8, "lmbda": 0.75})
    summary = summary_module.main(["--output_dir", str(constructed)])
    found = summary["yes_no_test"]
    assert (found["items"], found["shots"], found["lmbda"], found["majority"]) == (10, 8, 0.75, 60.0)
    assert found["base"]["accuracy"] == 50.0 and found["base"]["yes_rate"] == 50.0
    assert found["base_plus_memory"] == {"accuracy": 100.0, "interval": found["base_plus_memory"]["interval"],
                                         "yes_rate": 60.0, "margin_auc": None}  # no log-likelihoods in these lines
    assert found["memory_minus_base"]["points"] == 50.0 and found["memory_minus_base"]["memory_only"] == 5
    judged_summary = summary["hallucination_test"]
    assert judged_summary["base"]["yes_rate"] == 100.0 and judged_summary["memory_minus_base"]["points"] == 0.0
    printed = capsys.readouterr().out
    low, high = found["base"]["interval"]
    assert (f'| yes/no accuracy, 10 questions, 8-shot (majority answer: 60.0) | 50.0 [{low:.1f}, {high:.1f}] | - '
            f'| 100.0 [') in printed
    assert "| hallucination judgment accuracy, 8 answers, 4-shot (majority answer: 50.0) | 50.0 [" in printed
    assert "| yes/no accuracy, 10 questions | 40.0 | 60.0 | 50.0 / 60.0 | - / - | +50.0 [" in printed
    assert "| 0 / 5 (p 0.06) |" in printed
