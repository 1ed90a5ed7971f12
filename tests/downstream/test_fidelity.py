"""The authors' evaluators as they ran (issue 24): the WebQuestions / TriviaQA batch rule, the per-dataset
presets, TruthfulQA's CSV and the authors' MC1 / MC2 / MC3, and public files read as they come."""

from __future__ import annotations

import json

import pytest

from downstream.eval_qa import main as eval_qa
from downstream.qa_protocols import PROTOCOLS
from tests.downstream.table_model import save_table_model
from utils.cli import UsageError

# ---- the WebQuestions / TriviaQA evaluator's batch rule ---------------------------------------------------------

# After "city" the model says "tower", then ".", then "bridge", "." ...; after "king" it says "queen", "king", ...
# forever, never a stop string. So a batch holding the "king" row never stops under the authors' rule.
WORDS = "who built the city tower bridge king queen oak Yes No answer is".split()
TABLE = {"city": "tower", "tower": ".", ".": "bridge", "bridge": ".", "king": "queen", "queen": "king",
         "oak": ",", ",": "oak"}
QUESTIONS = [("who built the city", "bridge"), ("the tower", "bridge"), ("the king", "queen"), ("the bridge", "tower")]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    directory = tmp_path_factory.mktemp("table")
    model = save_table_model(directory / "model", WORDS, TABLE, default="king")
    data = directory / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": [a]}) + "\n" for q, a in QUESTIONS))
    return {"dir": directory, "model": str(model), "data": str(data)}


def run_qa(table, name, *flags):
    out = table["dir"] / name
    metrics = eval_qa(["--model_name_or_path", table["model"], "--data_file", table["data"], "--output_dir", str(out),
                       "--prompt_template", "{question}", "--max_new_tokens", "8", *flags])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, [row["prediction"] for row in rows]


def test_batch_stop_depends_on_the_batch_size_and_the_default_does_not(table):
    _, one = run_qa(table, "batch1", "--protocol", "webqa", "--batch_stop", "--per_device_eval_batch_size", "1")
    metrics, four = run_qa(table, "batch4", "--protocol", "webqa", "--batch_stop", "--per_device_eval_batch_size", "4")
    # alone, a row stops at its own first stop string and keeps all it generated (the stop string included)
    assert one == ["tower.", ".", "queen king queen king queen king queen king", "."]
    # in one batch with the "king" row no stop string is ever common to all rows: every row runs to 8 tokens
    assert four == ["tower. bridge. bridge. bridge.", ". bridge. bridge. bridge. bridge", one[2],
                    ". bridge. bridge. bridge. bridge"]
    assert metrics["has_answer"] == 75.0 and metrics["protocol"]["batch_stop"]
    assert metrics["protocol"]["answer"] == "all_generated"
    _, default_one = run_qa(table, "row1", "--protocol", "webqa", "--per_device_eval_batch_size", "1")
    default_metrics, default_four = run_qa(table, "row4", "--protocol", "webqa", "--per_device_eval_batch_size", "4")
    assert default_one == default_four == ["tower", "", one[2], ""]
    assert default_metrics["has_answer"] == 25.0 and not default_metrics["protocol"]["batch_stop"]


def test_batch_stop_needs_the_same_stop_string_in_every_row(table, tmp_path):
    data = tmp_path / "qa.jsonl"  # "the oak" goes on with "," and "the tower" with "."
    data.write_text(json.dumps({"question": "the oak", "answer": ["oak"]}) + "\n" +
                    json.dumps({"question": "the tower", "answer": ["bridge"]}) + "\n")
    _, predictions = run_qa({**table, "data": str(data)}, "mixed", "--protocol", "webqa", "--batch_stop",
                            "--per_device_eval_batch_size", "2")
    assert predictions == [", oak, oak, oak, oak", ". bridge. bridge. bridge. bridge"]
    data.write_text(json.dumps({"question": "who built the city", "answer": ["x"]}) + "\n" +
                    json.dumps({"question": "the tower", "answer": ["x"]}) + "\n")
    _, predictions = run_qa({**table, "data": str(data)}, "both", "--protocol", "webqa", "--batch_stop",
                            "--per_device_eval_batch_size", "2")
    assert predictions == ["tower.", ". bridge"]  # both rows have a "." after 2 tokens: the batch stops there


def test_batch_stop_is_the_webqa_evaluators(table):
    with pytest.raises(UsageError, match="--batch_stop is the rule of the authors' WebQuestions / TriviaQA evaluator"):
        run_qa(table, "bad", "--protocol", "released", "--batch_stop")


# ---- per-dataset presets: the authors' lmbda, dtype and batch size ------------------------------------------------

@pytest.mark.parametrize("name, base, lmbda, dtype, batch", [
    ("nq", "released", 0.5, "float16", 1), ("hotpotqa", "released", 0.5, "float16", 1),
    ("webquestions", "webqa", 0.75, "bfloat16", 4), ("triviaqa", "webqa", 0.6, "bfloat16", 4)])
def test_dataset_presets_are_their_protocol_with_the_authors_settings(name, base, lmbda, dtype, batch):
    preset, protocol = PROTOCOLS[name], PROTOCOLS[base]
    assert (preset.lmbda, preset.torch_dtype, preset.batch_size) == (lmbda, dtype, batch)
    same = ("template", "question_style", "max_new_tokens", "stop", "answer", "scoring", "add_special_tokens")
    assert {k: getattr(preset, k) for k in same} == {k: getattr(protocol, k) for k in same}
    assert not preset.batch_stop  # the per-row stop stays the default
    assert preset.drop_golds == ((")",) if name == "nq" else ())  # the released code drops ")" for NQ-open only


def save_memory(model_dir, out):
    import torch
    from transformers import AutoConfig

    from models import MemoryConfig, build_memory
    from models.memory_directory import save_memory as save_with_checksums

    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(AutoConfig.from_pretrained(model_dir), num_layers=1,
                                                 intermediate_size=16, layer=0))
    save_with_checksums(out, memory, {}, {})
    return str(out)


def test_a_preset_applies_the_authors_settings_unless_a_flag_says_otherwise(table):
    memory = save_memory(table["model"], table["dir"] / "memory")
    with_memory = ("--use_neural_knn", "--knn_generator_path", memory)
    metrics, predictions = run_qa(table, "triviaqa", "--protocol", "triviaqa", "--batch_stop", *with_memory)
    assert metrics["protocol_settings_applied"] == {"torch_dtype": "bfloat16", "per_device_eval_batch_size": 4}
    assert metrics["lmbda"] == 0.6 and metrics["lmbda_source"] == "--protocol triviaqa"  # the lmbda policy's step 2
    assert metrics["torch_dtype"] == "bfloat16"
    assert metrics["settings"]["per_device_eval_batch_size"] == 4
    _, four = run_qa(table, "four", "--protocol", "webqa", "--batch_stop", "--per_device_eval_batch_size", "4")
    assert predictions == four  # the authors' batch of 4 (the memory does not move this model's one-hot argmax)
    mine, _ = run_qa(table, "mine", "--protocol", "webquestions", "--lmbda", "0.3", "--torch_dtype", "float32",
                     "--per_device_eval_batch_size", "2", *with_memory)
    assert mine["protocol_settings_applied"] == {} and mine["lmbda"] == 0.3 and mine["torch_dtype"] == "float32"
    assert mine["lmbda_source"] == "--lmbda"
    base, _ = run_qa(table, "nq", "--protocol", "nq")
    assert base["protocol_settings_applied"] == {"torch_dtype": "float16", "per_device_eval_batch_size": 1}
    assert base["lmbda"] is None  # no memory, no lmbda


# ---- TruthfulQA as the authors ran it -----------------------------------------------------------------------------

TQA_ROWS = [  # TruthfulQA.csv's columns; answers without and with the final period, as the file has them
    {"Type": "Adversarial", "Category": "Misconceptions", "Question": "Who built the old bridge?",
     "Best Answer": "The old king built the bridge", "Correct Answers": "The old king built the bridge; A king",
     "Incorrect Answers": "The queen built it; Many people built the bridge.", "Source": "x"},
    {"Type": "Non-Adversarial", "Category": "Fiction", "Question": "Is the river long?",
     "Best Answer": "I have no comment.", "Correct Answers": "I have no comment.; The river is long",
     "Incorrect Answers": "No, it is short", "Source": "y"},
]


@pytest.fixture(scope="module")
def tqa(tmp_path_factory):
    """A byte-level BPE tokenizer that puts a BOS first (as Llama's and Mistral's do), a tiny Llama and a memory."""
    import csv

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import saved_random_memory, tiny_model
    from utils.embedded_corpus import train_tokenizer

    directory = tmp_path_factory.mktemp("tqa")
    texts = [f"Q: {r['Question']}\nA: {r['Correct Answers']} {r['Incorrect Answers']}" for r in TQA_ROWS] * 20
    trained = train_tokenizer(texts, vocab_size=300)
    backend = trained.backend_tokenizer
    bos = backend.add_special_tokens(["<s>"]) and backend.token_to_id("<s>")
    backend.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                                  processors.TemplateProcessing(single="<s> $A",
                                                                                special_tokens=[("<s>", bos)])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory / "model")
    model = tiny_model("llama", len(tokenizer), seed=3, max_position_embeddings=1024)
    model.save_pretrained(directory / "model")
    saved_random_memory(directory / "model", directory / "memory")
    data = directory / "TruthfulQA.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(TQA_ROWS[0]))
        writer.writeheader()
        writer.writerows(TQA_ROWS)
    return {"dir": directory, "model_dir": str(directory / "model"), "memory": str(directory / "memory"),
            "data": str(data), "model": model, "tokenizer": tokenizer, "bos": bos}


def authors_loglik(tqa, prompt: str, answer: str, joint=None) -> float:
    """The authors' scoring written out: tokenizer(prompt + answer), BOS first, split at len(tokenizer(prompt))."""
    import torch

    tokenizer = tqa["tokenizer"]
    ids = tokenizer(prompt + answer)["input_ids"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert ids[0] == tqa["bos"]
    with torch.no_grad():
        batch = torch.tensor([ids])
        log_probs = (joint.log_probs(batch)[0] if joint is not None
                     else torch.log_softmax(tqa["model"](batch).logits[0], -1))
    return sum(log_probs[i - 1, ids[i]].item() for i in range(n_prompt, len(ids)))


def closed(answer: str) -> str:
    return answer.strip() if answer.strip().endswith(".") else answer.strip() + "."


def test_truthfulqa_csv_under_the_authors_protocol(tqa):
    import math

    from downstream import truthfulqa
    from models import load_memory
    from models.joint import JointLM

    out = tqa["dir"] / "authors"
    metrics = truthfulqa.main(["--model_name_or_path", tqa["model_dir"], "--data_file", tqa["data"], "--output_dir",
                               str(out), "--protocol", "authors", "--knn_generator_path", tqa["memory"],
                               "--torch_dtype", "float32"])
    assert metrics["protocol_settings_applied"] == {} and metrics["lmbda"] == 0.75
    assert metrics["lmbda_source"] == "--protocol authors"  # the lmbda policy's step 2
    joint = JointLM(tqa["model"], load_memory(tqa["memory"]), lmbda=0.75)
    for setting, scorer in (("base", None), ("base_plus_memory", joint)):
        mc1, mc2, mc3 = [], [], []
        for row in TQA_ROWS:
            prompt = truthfulqa.INSTRUCTION + "\n\n" + truthfulqa.QA_PRIMER + f"\n\nQ: {row['Question']}\nA:"
            trues = [closed(a) for a in row["Correct Answers"].split(";")]
            falses = [closed(a) for a in row["Incorrect Answers"].split(";")]
            true_ll = [authors_loglik(tqa, prompt, " " + a, scorer) for a in trues]
            false_ll = [authors_loglik(tqa, prompt, " " + a, scorer) for a in falses]
            best = true_ll[trues.index(closed(row["Best Answer"]))]
            mc1.append(best > max(false_ll))
            mc2.append(sum(map(math.exp, true_ll)) / (sum(map(math.exp, true_ll)) + sum(map(math.exp, false_ll))))
            mc3.append(sum(t > max(false_ll) for t in true_ll) / len(true_ll))
        assert metrics[setting]["mc1"] == pytest.approx(100 * sum(mc1) / 2)
        assert metrics[setting]["mc2"] == pytest.approx(100 * sum(mc2) / 2, abs=1e-3)
        assert metrics[setting]["mc3"] == pytest.approx(100 * sum(mc3) / 2)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["mc2"]["choices"] == [" The old king built the bridge.", " A king.", " The queen built it.",
                                         " Many people built the bridge."]
    assert rows[1]["mc1"]["choices"] == [" I have no comment.", " No, it is short."]

    lm_eval = truthfulqa.main(["--model_name_or_path", tqa["model_dir"], "--data_file", tqa["data"],
                               "--output_dir", str(tqa["dir"] / "lm_eval"), "--max_samples", "1"])
    assert lm_eval["protocol"]["name"] == "lm_eval" and lm_eval["protocol_settings_applied"] == {}
    assert lm_eval["prompt"] == truthfulqa.QA_PRIMER + "\n\nQ: {question}\nA:" and "mc3" in lm_eval["base"]


def test_truthfulqa_authors_protocol_runs_in_float16_by_default(tqa):
    from downstream import truthfulqa

    metrics = truthfulqa.main(["--model_name_or_path", tqa["model_dir"], "--data_file", tqa["data"], "--output_dir",
                               str(tqa["dir"] / "fp16"), "--protocol", "authors", "--max_samples", "1"])
    assert metrics["protocol_settings_applied"] == {"torch_dtype": "float16"} and metrics["lmbda"] is None  # no memory
    assert metrics["torch_dtype"] == "float16" and 0 <= metrics["base"]["mc2"] <= 100


def test_truthfulqa_mc2_as_truthfulqa_computes_it():
    import math

    from downstream.truthfulqa import truthfulqa_mc2

    assert truthfulqa_mc2([-1.0, -2.0], [-3.0]) == pytest.approx((math.exp(-1) + math.exp(-2)) /
                                                                  (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    # every exp underflows on one side: that side's log-likelihoods are halved until they do not (TruthfulQA's code)
    assert truthfulqa_mc2([-2000.0], [-1.0]) == pytest.approx(math.exp(-500) / (math.exp(-500) + math.exp(-1)))
    assert truthfulqa_mc2([-math.inf], [-math.inf]) == 0.0


# ---- public files as they come ------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_webquestions_and_triviaqa_files_as_released(tmp_path):
    from downstream.qa_data import load_qa

    webq = write_jsonl(tmp_path / "webquestions.json", [  # the qId / qText release
        {"qId": "wqr000001", "qText": "what character did natalie portman play in star wars?",
         "answers": ["Padm Amidala"]}])
    examples, info = load_qa(webq)
    assert examples == [{"question": "what character did natalie portman play in star wars?",
                         "golds": ["Padm Amidala"]}]
    assert info["question_field"] == "qText"
    berant = tmp_path / "webquestions.examples.test.json"  # the original release: utterance and targetValue
    berant.write_text(json.dumps([{"url": "http://www.freebase.com/view/en/jamaica", "utterance":
                                   "what does jamaican people speak?", "targetValue":
                                   '(list (description "Jamaican English") (description Creole))'}]))
    assert load_qa(str(berant))[0] == [{"question": "what does jamaican people speak?",
                                        "golds": ["Jamaican English", "Creole"]}]
    foundry = write_jsonl(tmp_path / "triviaqa_sm_sub.jsonl", [  # llm-foundry's TriviaQA subset
        {"context": "Question: What type of animal is a dik-dik?\nAnswer:", "answer": "Antelope",
         "aliases": ["Botswanan Antelopes", "Antelope", "Antelopes"]}])
    examples, info = load_qa(foundry)
    assert examples == [{"question": "What type of animal is a dik-dik?",
                         "golds": ["Antelope", "Botswanan Antelopes", "Antelopes"]}]
    assert info["question_field"] == "context" and info["answer_field"] == ["answer", "aliases"]
    squad = write_jsonl(tmp_path / "squad.jsonl", [{"context": "A passage.", "question": "q?", "answers": ["a"]}])
    assert load_qa(squad)[1]["question_field"] == "question"  # a passage is never taken for the question


def test_triviaqa_subset_through_the_cli(table, tmp_path):
    foundry = write_jsonl(tmp_path / "triviaqa_sm_sub.jsonl", [
        {"context": "Question: who built the city?\nAnswer:", "answer": "tower", "aliases": ["the tower"]}])
    out = tmp_path / "out"
    metrics = eval_qa(["--model_name_or_path", table["model"], "--data_file", foundry, "--output_dir", str(out),
                       "--protocol", "webqa", "--max_new_tokens", "2"])
    row = json.loads((out / "predictions.jsonl").read_text())
    assert row["prompt"] == "Answer the questions:\n\nQuestion: who built the city?? The answer is:"
    assert row["golds"] == ["tower", "the tower"] and metrics["count"] == 1


def test_strategyqa_gets_one_prompt_from_either_file(tqa, tmp_path):
    from downstream import strategyqa

    questions = [("Is the river long?", True), ("Did the old king build the bridge?", False),
                 ("Is the queen old?", True), ("Was the bridge built by many people?", False)]
    task = tmp_path / "task.json"  # BIG-bench's StrategyQA task, which turns the appended choices off
    task.write_text(json.dumps({"name": "strategyqa", "append_choices_to_input": False, "examples": [
        {"input": q, "target_scores": {"Yes": int(a), "No": int(not a)}, "target": "Yes." if a else "No."}
        for q, a in questions]}))
    original = tmp_path / "strategyqa_train.json"  # the original release: a boolean answer, facts, decomposition
    original.write_text(json.dumps([{"qid": str(i), "term": "t", "description": "d", "question": q, "answer": a,
                                     "facts": ["f"], "decomposition": ["d"]} for i, (q, a) in enumerate(questions)]))
    results = {}
    for name, path in (("task", task), ("original", original)):
        results[name] = strategyqa.main(["--model_name_or_path", tqa["model_dir"], "--data_file", str(path),
                                         "--output_dir", str(tmp_path / name)])
    rows = {name: [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
            for name in results}
    assert [r["prompt"] for r in rows["task"]] == [r["prompt"] for r in rows["original"]] == \
        [f"Q: {q}\nA: " for q, _ in questions]
    assert [r["base"]["logliks"] for r in rows["task"]] == [r["base"]["logliks"] for r in rows["original"]]
    assert results["task"]["base"]["accuracy"] == results["original"]["base"]["accuracy"]
    assert results["original"]["prompt_settings"]["append_choices_to_input"] is False


def test_halueval_generate_reads_the_whole_response(tmp_path):
    from downstream import halueval

    # after "#Your Judgement#:" the model says "No", then a newline, then "Yes": a first-line reading would say "No"
    model = save_table_model(tmp_path / "model", ["Yes", "No"], {":": "No", "No": "\n", "\n": "Yes", "Yes": "."},
                             default=".")
    data = tmp_path / "qa_data.json"
    data.write_text(json.dumps({"knowledge": "k", "question": "Who built the bridge?", "right_answer": "the king",
                                "hallucinated_answer": "the queen"}) + "\n")
    metrics = halueval.main(["--model_name_or_path", str(model), "--data_file", str(data), "--output_dir",
                             str(tmp_path / "out"), "--judge", "generate", "--max_new_tokens", "4"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [row["base"]["generated"] for row in rows] == ["No \n Yes."] * 2
    assert [row["base"]["judgment"] for row in rows] == ["failed", "failed"]  # "Yes" and "No" both occur
    assert metrics["base"]["failed"] == 100.0 and metrics["base"]["accuracy"] == 0.0
