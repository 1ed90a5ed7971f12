"""The quickstart's summary (downstream/summary.py) and the QA lmbda choice (downstream/choose_lmbda.py).

The end-to-end test writes the artifacts with the real entry points on the tiny dataset (base
evaluation, base + memory sweeps on validation and test, QA runs with and without a memory); the other
tests write the result files at the run layout's paths (utils/run_layout.py) to pin down the choices: each is
made on validation by the stage that ran there, recorded in its results, and only read by the summary.
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
from models.joint.interpolation import lmbda_choice
from models.memory_directory import save_memory
from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.run_layout import RunLayout

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
    """The fields of evaluate_joint's joint_results.json that the summary reads, with the choice it records."""
    entries = [{"lmbda": lmbda, "perplexity": ppl} for lmbda, ppl in sweep.items()]
    return {"eval_subset": split, "base_perplexity": base, "memory_perplexity": 150.0, "lmbda_sweep": entries,
            "lmbda": entries[0]["lmbda"], "perplexity": entries[0]["perplexity"],
            "lmbda_choice": lmbda_choice(entries, split),
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
    layout = RunLayout(tmp_path / "qs")
    write_json(layout.eval_base("test") / "eval_results.json",
               {"perplexity": 80.0, "eval_tokens": 100, "eval_tokens_per_second": 1000.0})
    write_json(layout.knnlm("test") / "knnlm_results.json",
               {"perplexity": 75.0, "eval_tokens_per_second": 300.0, "lmbda": 0.25, "k": 64, "knn_temp": 10.0,
                "index_type": "flat"})
    write_json(layout.eval_joint("validation") / "joint_results.json",
               joint_results("validation", 90.0, {0.25: 85.0, 0.5: 84.0, 0.75: 86.0}))
    write_json(layout.eval_joint("test") / "joint_results.json",
               joint_results("test", 80.0, {0.25: 74.0, 0.5: 73.0, 0.75: 72.0}))
    for lmbda, em, f1 in ((0.25, 10.0, 12.0), (0.5, 20.0, 21.0), (0.75, 20.0, 23.0)):
        write_json(layout.qa("validation", lmbda) / "qa_results.json", qa_results(em, f1, lmbda))
    choose_lmbda.main([str(layout.qa("validation", lmbda)) for lmbda in (0.25, 0.5, 0.75)] +
                      ["--output_file", str(layout.qa_choice)])  # the choice, recorded as the QA stage records it
    write_json(layout.qa("validation", None) / "qa_results.json", qa_results(5.0, 6.0, None))
    write_json(layout.qa("test", None) / "qa_results.json", qa_results(4.0, 5.0, None))
    write_json(layout.qa("test", 0.75) / "qa_results.json", qa_results(15.0, 17.0, 0.75))
    write_json(layout.qa("test", 0.25) / "qa_results.json", qa_results(12.0, 13.0, 0.25))
    write_json(layout.correction, CORRECTION)
    return layout.out


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
    assert summary["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # digits depend on it
    assert set(summary["qa_validation"]["base_plus_memory_by_lmbda"]) == {"0.25", "0.5", "0.75"}
    assert summary["correction"] == {"prompt": CORRECTION["examples"][0]["prompt"], "gold": ["Sellan Galquist"],
                                     "base": " Perannel Rinzek\nQuestion", "base_plus_memory": " Sellan Galquist\n",
                                     "lmbda": 0.5}
    printed = capsys.readouterr().out
    assert "| perplexity | 80.0 | 75.0 (lmbda 0.25, fixed) | 73.0 (lmbda 0.5, best on validation) |" in printed
    qa_row = "| QA exact match, 10 questions | 4.0 | - | 15.0 (lmbda 0.75, validation questions (exact match)) |"
    assert qa_row in printed
    assert "base          : Perannel Rinzek" in printed and "base + memory : Sellan Galquist" in printed


def test_the_summary_reads_recorded_choices_and_never_makes_one(constructed):
    """The recorded choice wins over what the table would give now, and a missing record is an error."""
    layout = RunLayout(constructed)
    choice = json.loads(layout.qa_choice.read_text())
    assert choice["lmbda"] == 0.75 and [row["lmbda"] for row in choice["table"]] == [0.25, 0.5, 0.75]
    write_json(layout.qa_choice, {**choice, "lmbda": 0.25})  # e.g. chosen by another rule, recorded
    assert summary_module.collect(constructed)["qa_test"]["lmbda"] == 0.25
    layout.qa_choice.unlink()
    with pytest.raises(UsageError, match=r"lmbda_choice.json is missing: the QA lmbda is chosen once"):
        summary_module.collect(constructed)
    write_json(layout.qa_choice, choice)
    validation = json.loads((layout.eval_joint("validation") / "joint_results.json").read_text())
    write_json(layout.eval_joint("validation") / "joint_results.json", {**validation, "lmbda_choice": None})
    with pytest.raises(UsageError, match=r"eval_joint_validation/joint_results.json records no lmbda_choice"):
        summary_module.collect(constructed)


def test_mismatched_choices_are_errors(constructed):
    layout = RunLayout(constructed)
    shutil.rmtree(layout.qa("test", 0.75))
    with pytest.raises(UsageError, match=r"no run at lmbda 0.75, the one chosen on the validation questions"):
        summary_module.collect(constructed)
    shutil.rmtree(layout.qa_dir("validation"))
    write_json(layout.qa("test", 0.5) / "qa_results.json", qa_results(15.0, 17.0, 0.5))
    with pytest.raises(UsageError, match=r"runs at several lmbdas .* no sweep to choose one"):
        summary_module.collect(constructed)
    shutil.rmtree(layout.qa("test", 0.5))
    assert summary_module.collect(constructed)["qa_test"]["lmbda_chosen_on"] == "fixed"  # one run: a fixed lmbda
    write_json(layout.eval_joint("test") / "joint_results.json", joint_results("test", 80.0, {0.25: 74.0}))
    with pytest.raises(UsageError, match=r"lmbda 0.5, chosen on validation .*, is not in the test sweep"):
        summary_module.collect(constructed)
    shutil.rmtree(layout.eval_joint("validation"))  # one lmbda on test and nothing to choose from: fixed
    summary = summary_module.collect(constructed)
    assert summary["lmbda"]["base_plus_memory"] == 0.25 and summary["lmbda"]["base_plus_memory_chosen_on"] == "fixed"


def knnlm_results(sweep: dict[float, float], split: str) -> dict:
    """The fields of knn_utils.knnlm's knnlm_results.json that the summary reads; the first lmbda is the headline."""
    first = next(iter(sweep))
    entries = [{"lmbda": l, "perplexity": p} for l, p in sweep.items()]
    return {"perplexity": sweep[first], "eval_tokens_per_second": 300.0, "lmbda": first, "k": 64, "knn_temp": 10.0,
            "index_type": "flat", "lmbda_sweep": entries, "lmbda_choice": lmbda_choice(entries, split)}


def test_knn_lm_lmbda_is_chosen_on_validation_when_it_ran_there(constructed, capsys):
    write_json(constructed / "eval_knnlm_validation" / "knnlm_results.json", knnlm_results({0.25: 86.0, 0.5: 85.0}, "validation"))
    write_json(constructed / "eval_knnlm_test" / "knnlm_results.json", knnlm_results({0.25: 75.0, 0.5: 76.0}, "test"))
    summary = summary_module.main(["--output_dir", str(constructed)])
    assert summary["test_perplexity"]["knn_lm"] == 76.0 and summary["lmbda"]["knn_lm"] == 0.5  # not 75.0 at 0.25
    assert summary["knn_lm_settings"]["lmbda_chosen_on"] == "validation perplexity"
    assert "| 80.0 | 76.0 (lmbda 0.5, best on validation) |" in capsys.readouterr().out
    write_json(constructed / "eval_knnlm_test" / "knnlm_results.json", knnlm_results({0.25: 75.0}, "test"))
    with pytest.raises(UsageError, match=r"lmbda 0.5, chosen on validation .*, is not in the test sweep"):
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
    sweep = sorted(str(p) for p in (constructed / "qa_validation").glob("lmbda_*") if p.is_dir())
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
                             "--dataset_split_name", split, "--per_device_eval_batch_size", "4", "--memory_temp", "1",
                             "--memory", str(out / "memory"), "--report_to", "none",
                             "--output_dir", str(out / f"eval_joint_{split}"), "--lmbda", "0.1", "0.5", "0.9"])
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": [q.split()[-1]]}) + "\n" for q in QUESTIONS))
    qa = ["--model_name_or_path", model, "--data_file", str(data), "--prompt_template", "the {question}",
          "--max_new_tokens", "3"]
    layout = RunLayout(out)  # eval_qa: base alone and base + memory at each lmbda in one run (downstream.qa_results)
    eval_qa.main([*qa, "--output_dir", str(layout.qa_dir("validation")), "--memory", str(layout.memory),
                  "--lmbda", "0", "0.9"])
    chosen = choose_lmbda.main([str(layout.qa("validation", lmbda)) for lmbda in (0, 0.9)] +
                               ["--output_file", str(layout.qa_choice)])
    joint = eval_qa.main([*qa, "--output_dir", str(layout.qa_dir("test")), "--memory", str(layout.memory),
                          "--lmbda", str(chosen)])
    base = json.loads((layout.qa("test", None) / "qa_results.json").read_text())
    capsys.readouterr()

    summary = summary_module.main(["--output_dir", str(out)])
    validation = json.loads((out / "eval_joint_validation" / "joint_results.json").read_text())
    test = json.loads((out / "eval_joint_test" / "joint_results.json").read_text())
    best = min(validation["lmbda_sweep"], key=lambda entry: entry["perplexity"])["lmbda"]
    assert validation["lmbda_choice"]["lmbda"] == best and test["lmbda_choice"] is None  # recorded where it was made
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
    write_json(RunLayout(constructed).corpus_file("meta.json"), {"yes_no_test": {"shots": 8}, "halueval_fewshot": {"shots": 4}})
    yes_no = [{"choices": ["Yes", "No"], "labels": [int(i < 6), int(i >= 6)],
               "base": {"prediction": int(i % 2), "correct": (i % 2 == 0) == (i < 6)},
               "base_plus_memory": {"prediction": int(i >= 6), "correct": True}} for i in range(10)]
    layout = RunLayout(constructed)
    write_jsonl(layout.yes_no / "predictions.jsonl", yes_no)
    write_json(layout.yes_no / "strategyqa_results.json", {"count": 10, "lmbda": 0.75})
    judged = [{"gold": "Yes" if i % 2 else "No", "base": {"prediction": 0, "correct": bool(i % 2)},
               "base_plus_memory": {"prediction": 0, "correct": bool(i % 2)}} for i in range(8)]
    write_jsonl(layout.halueval / "predictions.jsonl", judged)
    write_json(layout.halueval / "halueval_results.json", {"count": 8, "lmbda": 0.75})
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
    assert (f'| yes/no accuracy, 10 questions, answered Yes/No, 8-shot (majority answer: 60.0) '
            f'| 50.0 [{low:.1f}, {high:.1f}] | - | 100.0 [') in printed
    assert "| hallucination judgment accuracy, 8 answers, answered Yes/No, 4-shot (majority answer: 50.0) | 50.0 [" in printed
    assert "| yes/no accuracy, 10 questions, answered Yes/No | 40.0 | 60.0 | 50.0 / 60.0 | - / - | +50.0 [" in printed
    assert "| 0 / 5 (p 0.06) |" in printed
    assert "judged by" not in printed  # the likelihood-judged runs did not run here


def test_judgments_read_from_the_answers_likelihoods(constructed, capsys):
    """The rows of strategyqa --judge claim and halueval --judge pair: no shots, the recorded margins give the AUC."""
    layout = RunLayout(constructed)
    gold = [i < 4 for i in range(10)]  # 4 true claims, 6 swapped ones
    claims = [{"choices": ["Yes", "No"], "labels": [int(g), int(not g)], "claim": f"v{i}",
               "base": {"prediction": 1, "correct": not g, "margin": -1.0, "likeliest": "w"},
               "base_plus_memory": {"prediction": 0 if g else 1, "correct": True, "margin": (1.0 if g else -1.0) * (i + 1),
                                    "likeliest": f"v{i}"}} for i, g in enumerate(gold)]
    write_jsonl(layout.yes_no_claims / "predictions.jsonl", claims)
    write_json(layout.yes_no_claims / "strategyqa_results.json", {"count": 10, "lmbda": 0.75, "judge": "claim"})
    pairs = [{"gold": "Yes" if i % 2 else "No", "base": {"judgment": "No", "correct": not i % 2, "margin": 0.0},
              "base_plus_memory": {"judgment": "Yes" if i % 2 else "No", "correct": True,
                                   "margin": 1.0 if i % 2 else -1.0}} for i in range(8)]
    write_jsonl(layout.halueval_pairs / "predictions.jsonl", pairs)
    write_json(layout.halueval_pairs / "halueval_results.json", {"count": 8, "lmbda": 0.75, "judge": "pair"})
    summary = summary_module.main(["--output_dir", str(constructed)])
    found = summary["yes_no_claims_test"]
    assert (found["items"], found["shots"], found["judge"], found["always_no"]) == (10, None, "claim", 60.0)
    assert found["base"]["accuracy"] == 60.0 and found["base"]["yes_rate"] == 0.0
    assert found["base"]["margin_auc"] == 50.0  # one margin for every item: no leaning either way
    assert found["base_plus_memory"]["margin_auc"] == 100.0 and found["memory_minus_base"]["points"] == 40.0
    pairs_found = summary["hallucination_pairs_test"]
    assert pairs_found["base"]["margin_auc"] == 50.0 and pairs_found["base_plus_memory"]["margin_auc"] == 100.0
    printed = capsys.readouterr().out
    assert "| yes/no accuracy, 10 questions, judged by the claim's likelihood (majority answer: 60.0) | 60.0 [" in printed
    assert ("| hallucination judgment accuracy, 8 answers, judged by the two answers' likelihoods (majority answer: "
            "50.0) | 50.0 [") in printed
    assert "answered Yes/No" not in printed  # the few-shot runs did not run here
    assert "| 0 / 4 (p 0.12) |" in printed and summary_module._p_value(3.03e-06) == "3e-06"
