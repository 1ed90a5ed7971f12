"""The log-likelihood scorer and the evaluations built on it: HaluEval, StrategyQA, TruthfulQA MC1/MC2.

References are computed here by a plain forward of the tiny model over one unpadded sequence (and, for
base + memory, `JointLM.log_probs` over it), with the context/continuation split written out by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from downstream import halueval, strategyqa, truthfulqa
from downstream.choice_eval import choice_outcome
from downstream.loglik import continuation_logliks, encode_pair
from models import load_memory
from models.joint import JointLM
from tests.conftest import saved_random_memory, tiny_model
from utils.cli import UsageError
from utils.embedded_corpus import train_tokenizer
from utils.modeling import load_tokenizer

TEXT = ["Question: Is it true that the river is long? Answer: Yes",
        "Question: Was the king born in the north? Answer: No",
        "#Question#: Who built the bridge? #Answer#: the old king #Your Judgement#: No",
        "Q: What is the square root of banana? A: I have no comment. The answer is yes or no."] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A byte-level BPE tokenizer, a tiny random Llama saved with it, and a random memory for it."""
    directory = tmp_path_factory.mktemp("judgments")
    tokenizer = train_tokenizer(TEXT, vocab_size=400)
    tokenizer.save_pretrained(directory / "model")
    model = tiny_model("llama", len(tokenizer), seed=1, max_position_embeddings=1024)
    model.save_pretrained(directory / "model")
    saved_random_memory(directory / "model", directory / "memory")
    return {"dir": directory, "model_dir": str(directory / "model"), "memory": str(directory / "memory"),
            "tokenizer": load_tokenizer(str(directory / "model")), "model": model}


def reference_loglik(setup, context: str, continuation: str, joint=None) -> float:
    """Sum of log p(continuation tokens) from one unpadded forward; the split by hand (trailing spaces move)."""
    tokenizer, model = setup["tokenizer"], setup["model"]
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ids = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(stripped, add_special_tokens=False)["input_ids"])
    batch = torch.tensor([ids])
    with torch.no_grad():
        log_probs = (joint.log_probs(batch)[0] if joint is not None
                     else torch.log_softmax(model(batch).logits[0].float(), -1))
    return sum(log_probs[i - 1, ids[i]].item() for i in range(n_context, len(ids)))


def joint_model(setup, lmbda=0.5):
    return JointLM(setup["model"], load_memory(setup["memory"]), lmbda=lmbda)


# ---- the scorer ------------------------------------------------------------------------------------

def test_encode_pair_splits_as_lm_eval(setup):
    tokenizer = setup["tokenizer"]
    context, continuation = encode_pair(tokenizer, "Question: Is it? Answer: ", "Yes")
    assert context == tokenizer("Question: Is it? Answer:", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(continuation) == " Yes"  # the trailing space moved to the continuation
    assert context + continuation == tokenizer("Question: Is it? Answer: Yes", add_special_tokens=False)["input_ids"]
    empty_context, rest = encode_pair(tokenizer, "", "No")
    assert empty_context == [tokenizer.eos_token_id] and tokenizer.decode(rest) == "No"


REQUESTS = [("Question: Is it true that the river is long? Answer:", " Yes"),
            ("Question: Is it true that the river is long? Answer: ", "No"),
            ("Q: What", " is the square root of banana?"),
            ("#Question#: Who built the bridge?\n#Answer#: the old king\n#Your Judgement#:", " No")]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_logliks_match_a_plain_forward(setup, batch_size):
    scored = continuation_logliks(setup["model"], setup["tokenizer"], REQUESTS, batch_size=batch_size)
    for (context, continuation), result in zip(REQUESTS, scored):
        assert result.loglik == pytest.approx(reference_loglik(setup, context, continuation), abs=1e-4)
        assert result.tokens >= 1


@pytest.mark.parametrize("model_type", ["gpt2", "mistral"])
def test_logliks_of_other_architectures(setup, model_type):
    other = {**setup, "model": tiny_model(model_type, len(setup["tokenizer"]), seed=2)}
    scored = continuation_logliks(other["model"], setup["tokenizer"], REQUESTS, batch_size=4)
    for (context, continuation), result in zip(REQUESTS, scored):
        assert result.loglik == pytest.approx(reference_loglik(other, context, continuation), abs=1e-4)


def test_logliks_under_the_memory_match_the_joint_model(setup):
    joint = joint_model(setup, 0.5)
    scored = continuation_logliks(setup["model"], setup["tokenizer"], REQUESTS, batch_size=4, joint=joint)
    base = continuation_logliks(setup["model"], setup["tokenizer"], REQUESTS, batch_size=4)
    for (context, continuation), result, alone in zip(REQUESTS, scored, base):
        assert result.loglik == pytest.approx(reference_loglik(setup, context, continuation, joint), abs=1e-4)
        assert result.loglik != pytest.approx(alone.loglik, abs=1e-3)  # the memory changes something
    zero = continuation_logliks(setup["model"], setup["tokenizer"], REQUESTS, batch_size=4,
                                joint=joint_model(setup, 0.0))
    assert [s.loglik for s in zero] == pytest.approx([s.loglik for s in base], abs=1e-5)


def test_long_sequences_are_cut_on_the_left(setup):
    context = "Q: What is the square root of banana? A: I have no comment. " * 6 + "Answer:"
    cut = continuation_logliks(setup["model"], setup["tokenizer"], [(context, " Yes")], max_length=12)[0]
    ids = setup["tokenizer"](context + " Yes", add_special_tokens=False)["input_ids"][-13:]
    with torch.no_grad():
        log_probs = torch.log_softmax(setup["model"](torch.tensor([ids[:-1]])).logits[0, -1].float(), -1)
    assert cut.loglik == pytest.approx(log_probs[ids[-1]].item(), abs=1e-4)


def test_choice_outcome_mc1_and_mc2():
    outcome = choice_outcome([-1.0, -2.0, -3.0, -0.5], [1, 1, 0, 0])
    assert outcome["prediction"] == 3 and not outcome["correct"]
    mass = [math.exp(-1), math.exp(-2), math.exp(-3), math.exp(-0.5)]
    assert outcome["true_mass"] == pytest.approx((mass[0] + mass[1]) / sum(mass))
    assert choice_outcome([-1e4, -1e4 - 1], [0, 1])["true_mass"] == pytest.approx(1 / (1 + math.e))  # no underflow
    assert choice_outcome([-2.0, -2.0], [0, 1])["prediction"] == 0  # ties go to the first choice


# ---- TruthfulQA ----------------------------------------------------------------------------------

HF_RECORDS = [
    {"question": "Who built the bridge?",
     "mc1_targets": {"choices": ["the old king", "the queen", "many people"], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["the old king", "a king", "the queen"], "labels": [1, 1, 0]}},
    {"question": "Is the river long?",
     "mc1_targets": {"choices": ["Yes", "No"], "labels": [0, 1]},
     "mc2_targets": {"choices": ["No", "Yes", "It is long"], "labels": [1, 0, 0]}},
]


def as_mc_task(record: dict) -> dict:
    """The original repository's mc_task.json form of a record: targets as choice -> score."""
    return {"question": record["question"],
            **{task: dict(zip(record[task]["choices"], record[task]["labels"])) for task in ("mc1_targets", "mc2_targets")}}


def test_truthfulqa_formats_and_metrics(setup, tmp_path):
    hf_file = tmp_path / "tqa.jsonl"
    hf_file.write_text("".join(json.dumps(r) + "\n" for r in HF_RECORDS))
    mc_file = tmp_path / "mc_task.json"
    mc_file.write_text(json.dumps([as_mc_task(r) for r in HF_RECORDS]))
    results = {}
    for name, path in (("hf", hf_file), ("mc", mc_file)):
        results[name] = truthfulqa.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(path),
                                         "--output_dir", str(tmp_path / name), "--knn_generator_path", setup["memory"]])
    joint = joint_model(setup, 0.5)
    for setting, scorer in (("base", None), ("base_plus_memory", joint)):
        mc1, mc2 = [], []
        for record in HF_RECORDS:
            prompt = truthfulqa.QA_PRIMER + f"\n\nQ: {record['question']}\nA:"
            lls = [reference_loglik(setup, prompt, " " + c, scorer) for c in record["mc1_targets"]["choices"]]
            mc1.append(record["mc1_targets"]["labels"][lls.index(max(lls))] == 1)
            p = [math.exp(reference_loglik(setup, prompt, " " + c, scorer)) for c in record["mc2_targets"]["choices"]]
            mc2.append(sum(q for q, label in zip(p, record["mc2_targets"]["labels"]) if label) / sum(p))
        for name in ("hf", "mc"):
            assert results[name][setting]["mc1"] == pytest.approx(100 * sum(mc1) / 2)
            assert results[name][setting]["mc2"] == pytest.approx(100 * sum(mc2) / 2, abs=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "hf" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]["mc2"]) >= {"choices", "labels", "base", "base_plus_memory"}
    saved = json.loads((tmp_path / "hf" / "truthfulqa_results.json").read_text())
    assert saved["count"] == 2 and saved["lmbda"] == 0.5 and saved["base"]["questions_per_second"] > 0


def test_truthfulqa_bad_records(tmp_path):
    assert truthfulqa.targets(as_mc_task(HF_RECORDS[0]), "mc1", 0, "f") == (["the old king", "the queen", "many people"],
                                                                              [1, 0, 0])
    with pytest.raises(UsageError, match="exactly one true"):
        truthfulqa.targets({"mc1_targets": {"a": 1, "b": 1}}, "mc1", 3, "f")
    with pytest.raises(UsageError, match="record 2 needs 'mc2_targets'"):
        truthfulqa.targets({"question": "q"}, "mc2", 2, "f")


# ---- StrategyQA ----------------------------------------------------------------------------------

def test_strategyqa_gold_comes_from_target_scores_not_the_explanation():
    prompt = strategyqa.prompt_settings({}, strategyqa.StrategyQAArguments())
    record = {"input": "Is the river long?", "target_scores": {"Yes": 0, "No": 1},
              "target": "Yes. The river is long, yes."}  # an explanation that says "Yes" although the answer is No
    item = strategyqa.record_item(record, 0, prompt, "f")
    assert item.choices == ["Yes", "No"] and item.labels == [0, 1]
    assert item.prompt == "Q: Is the river long?\nA: "  # BIG-bench's StrategyQA task: no choices appended
    original = strategyqa.record_item({"question": "Is the river long?", "answer": True, "facts": ["no"]}, 1, prompt, "f")
    assert original.labels == [1, 0] and original.prompt == item.prompt
    hub = strategyqa.record_item({"inputs": "Q: x?\nA:", "multiple_choice_targets": ["Yes", "No"],
                                  "multiple_choice_scores": [0, 1]}, 2, prompt, "f")
    assert hub.prompt == "Q: x?\nA:" and hub.labels == [0, 1]
    with pytest.raises(UsageError, match="record 3 is neither"):
        strategyqa.record_item({"question": "q", "answer": "yes"}, 3, prompt, "f")


def test_strategyqa_cli(setup, tmp_path):
    examples = [{"input": "Is the river long?", "target_scores": {"Yes": 1, "No": 0}},
                {"input": "Was the king born in the north?", "target_scores": {"Yes": 0, "No": 1}},
                {"input": "Is the bridge old?", "target_scores": {"Yes": 0, "No": 1}}]
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"example_input_prefix": "Question: ", "example_output_prefix": " Answer: ",
                                "append_choices_to_input": False, "examples": examples}))
    metrics = strategyqa.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(task),
                               "--output_dir", str(tmp_path / "out"), "--knn_generator_path", setup["memory"],
                               "--lmbda", "0.3", "--per_device_eval_batch_size", "2"])
    assert metrics["always_no_accuracy"] == pytest.approx(200 / 3)
    for setting, scorer in (("base", None), ("base_plus_memory", joint_model(setup, 0.3))):
        right = 0
        for example in examples:
            prompt = f"Question: {example['input']} Answer: "
            lls = [reference_loglik(setup, prompt, choice, scorer) for choice in ("Yes", "No")]
            right += example["target_scores"][("Yes", "No")[lls.index(max(lls))]]
        assert metrics[setting]["accuracy"] == pytest.approx(100 * right / 3)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "Question: Is the river long? Answer: " and len(rows[0]["base"]["logliks"]) == 2


CLAIMS = [{"input": "Is it true that the river is long?", "target_scores": {"Yes": 1, "No": 0},
           "claim": {"question": "How long is the river?", "answer": "long", "alternatives": ["short", "long", "wide"]}},
          {"input": "Is it true that the king was born in the north?", "target_scores": {"Yes": 0, "No": 1},
           "claim": {"question": "Where was the king born?", "answer": "the north",
                     "alternatives": ["the south", "the old king"]}},
          {"input": "Is it true that the queen built the bridge?", "target_scores": {"Yes": 0, "No": 1},
           "claim": {"question": "Who built the bridge?", "answer": "the queen",
                     "alternatives": ["the old king", "the river"]}}]


def test_strategyqa_claim_judge(setup, tmp_path):
    """--judge claim: "Yes" exactly when the claimed answer is at least as likely as every alternative after the claim
    prompt (the file's claim_prompt; the flag overrides it), under the base and under base + memory."""
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"example_input_prefix": "Question: ", "example_output_prefix": " Answer: ",
                                "claim_prompt": "Q: {question} A:", "examples": CLAIMS}))
    metrics = strategyqa.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(task), "--judge", "claim",
                               "--output_dir", str(tmp_path / "out"), "--memory", setup["memory"], "--lmbda", "0.3"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["judge"] == "claim" and metrics["claim_prompt"] == "Q: {question} A:"
    for setting, scorer in (("base", None), ("base_plus_memory", joint_model(setup, 0.3))):
        right = 0
        for example, row in zip(CLAIMS, rows):
            claim = example["claim"]
            prompt = f"Q: {claim['question']} A:"
            claimed = reference_loglik(setup, prompt, " " + claim["answer"], scorer)
            others = [reference_loglik(setup, prompt, " " + a, scorer) for a in claim["alternatives"]
                      if a != claim["answer"]]  # an alternative equal to the claimed answer is dropped
            says_yes = claimed >= max(others)
            assert row["choices"][row[setting]["prediction"]] == ("Yes" if says_yes else "No")
            assert row[setting]["margin"] == pytest.approx(claimed - max(others), abs=1e-4)
            assert row["prompt"] == prompt and row["claim"] == claim["answer"]
            right += example["target_scores"]["Yes" if says_yes else "No"]
        assert metrics[setting]["accuracy"] == pytest.approx(100 * right / 3)
    flag = strategyqa.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(task), "--judge", "claim",
                            "--claim_prompt", "Question: {question}\\nAnswer:", "--output_dir", str(tmp_path / "flag"),
                            "--max_samples", "1"])
    row = json.loads((tmp_path / "flag" / "predictions.jsonl").read_text().splitlines()[0])
    assert flag["claim_prompt"] == "Question: {question}\nAnswer:"
    assert row["prompt"] == "Question: How long is the river?\nAnswer:"


def test_strategyqa_claim_judge_refuses_what_it_cannot_judge(setup, tmp_path):
    def run(examples, *flags):
        task = tmp_path / "task.json"
        task.write_text(json.dumps({"examples": examples}))
        return strategyqa.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(task), "--judge",
                                "claim", "--output_dir", str(tmp_path / "out"), *flags])
    with pytest.raises(UsageError, match="record 0: --judge claim needs a 'claim' object"):
        run([{"input": "Is it?", "target_scores": {"Yes": 1, "No": 0}}])
    with pytest.raises(UsageError, match="record 0: a claim needs .* at least one alternative"):
        run([{**CLAIMS[0], "claim": {"question": "q?", "answer": "a", "alternatives": ["a", " a "]}}])
    with pytest.raises(UsageError, match="record 0: --judge claim needs yes/no examples"):
        run([{**CLAIMS[0], "target_scores": {"long": 1, "short": 0}}])
    with pytest.raises(UsageError, match="--claim_prompt must contain \\{question\\}"):
        run(CLAIMS, "--claim_prompt", "Answer:")


# ---- HaluEval ------------------------------------------------------------------------------------

QA_SAMPLES = [{"knowledge": "The old king built the bridge.", "question": "Who built the bridge?",
               "right_answer": "the old king", "hallucinated_answer": "the queen"},
              {"knowledge": "", "question": "Is the river long?", "right_answer": "Yes",
               "hallucinated_answer": "No, it is short"}]


def test_halueval_items_of_each_task():
    items = halueval.record_items(QA_SAMPLES[0], 0, "qa", "Judge.", False, "f")
    assert [item.labels for item in items] == [[0, 1], [1, 0]]  # right answer: "No"; hallucinated: "Yes"
    assert items[1].prompt == "Judge.\n\n#Question#: Who built the bridge?\n#Answer#: the queen\n#Your Judgement#:"
    shown = halueval.record_items(QA_SAMPLES[0], 0, "qa", "", True, "f")[0].prompt
    assert shown == ("#Knowledge#: The old king built the bridge.\n#Question#: Who built the bridge?\n"
                     "#Answer#: the old king\n#Your Judgement#:")
    dialogue = {"knowledge": "k", "dialogue_history": "[Human]: hi", "right_response": "a", "hallucinated_response": "b"}
    assert halueval.detect_task(dialogue, "f") == "dialogue"
    assert "#Dialogue History#: [Human]: hi\n#Response#: b\n" in halueval.record_items(dialogue, 0, "dialogue", "", False,
                                                                                       "f")[1].prompt
    summary = {"document": "d", "right_summary": "s", "hallucinated_summary": "t"}
    assert halueval.record_items(summary, 0, "summarization", "", False, "f")[0].prompt.startswith("#Document#: d\n")
    general = {"ID": "1", "user_query": "q", "chatgpt_response": "r", "hallucination": "yes"}
    (only,) = halueval.record_items(general, 0, halueval.detect_task(general, "f"), "", False, "f")
    assert only.labels == [1, 0] and only.prompt == "#Query#: q\n#Response#: r\n#Your Judgement#:"
    with pytest.raises(UsageError, match="no \\['hallucinated_answer'\\]"):
        halueval.record_items({"question": "q", "right_answer": "a"}, 4, "qa", "", False, "f")
    assert halueval.INSTRUCTIONS["qa"].startswith("I want you act as an answer judge.")


def test_halueval_parses_generated_judgments_as_the_benchmark():
    assert halueval.parse_judgment("Yes.") == "Yes"
    assert halueval.parse_judgment(" No, the answer is right") == "No"
    assert halueval.parse_judgment("Yes or No") == "failed"
    assert halueval.parse_judgment("maybe") == "failed"


def test_halueval_cli(setup, tmp_path):
    data = tmp_path / "qa_data.json"  # JSON lines named .json, as HaluEval releases it
    data.write_text("".join(json.dumps(s) + "\n" for s in QA_SAMPLES))
    metrics = halueval.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(data),
                             "--output_dir", str(tmp_path / "out"), "--knn_generator_path", setup["memory"],
                             "--instruction", "none"])
    assert metrics["task"] == "qa" and metrics["samples"] == 2 and metrics["count"] == 4
    for setting, scorer in (("base", None), ("base_plus_memory", joint_model(setup, 0.5))):
        right, on_hallucinated = [], []
        for sample in QA_SAMPLES:
            for answer, hallucinated in ((sample["right_answer"], False), (sample["hallucinated_answer"], True)):
                prompt = f"#Question#: {sample['question']}\n#Answer#: {answer}\n#Your Judgement#:"
                says_yes = reference_loglik(setup, prompt, " Yes", scorer) > reference_loglik(setup, prompt, " No", scorer)
                right.append(says_yes == hallucinated)
                if hallucinated:
                    on_hallucinated.append(says_yes)
        assert metrics[setting]["accuracy"] == pytest.approx(100 * sum(right) / 4)
        assert metrics[setting]["accuracy_on_hallucinated_answers"] == pytest.approx(100 * sum(on_hallucinated) / 2)
    generated = halueval.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(data),
                               "--output_dir", str(tmp_path / "gen"), "--judge", "generate", "--max_new_tokens", "3",
                               "--instruction", "none", "--max_samples", "1"])
    rows = [json.loads(line) for line in (tmp_path / "gen" / "predictions.jsonl").read_text().splitlines()]
    assert generated["count"] == 2 and len(rows) == 2
    for row in rows:
        assert row["base"]["judgment"] == halueval.parse_judgment(row["base"]["generated"])  # the whole response
        assert row["base"]["correct"] == (row["base"]["judgment"] == row["gold"])
    assert 0 <= generated["base"]["failed"] <= 100


def test_halueval_pair_judge(setup, tmp_path):
    """--judge pair: of a sample's two answers, scored after the question, the less likely is judged hallucinated;
    the right answer's item and the hallucinated one's are read from that one comparison."""
    data = tmp_path / "qa_data.json"
    data.write_text("".join(json.dumps(s) + "\n" for s in QA_SAMPLES))
    metrics = halueval.main(["--model_name_or_path", setup["model_dir"], "--data_file", str(data), "--judge", "pair",
                             "--output_dir", str(tmp_path / "out"), "--memory", setup["memory"], "--lmbda", "0.5"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["judge"] == "pair" and metrics["instruction"] == "none" and len(rows) == 4
    assert metrics["pair_prompt"] == "Question: {question} Answer:"
    for setting, scorer in (("base", None), ("base_plus_memory", joint_model(setup, 0.5))):
        right = 0
        for i, sample in enumerate(QA_SAMPLES):
            prompt = f"Question: {sample['question']} Answer:"
            ll_right = reference_loglik(setup, prompt, " " + sample["right_answer"], scorer)
            ll_wrong = reference_loglik(setup, prompt, " " + sample["hallucinated_answer"], scorer)
            of_right, of_wrong = rows[2 * i][setting], rows[2 * i + 1][setting]
            assert rows[2 * i]["gold"] == "No" and rows[2 * i + 1]["gold"] == "Yes"
            assert of_right["judgment"] == ("Yes" if ll_right < ll_wrong else "No")
            assert of_wrong["judgment"] == ("Yes" if ll_wrong < ll_right else "No")
            assert of_right["margin"] == pytest.approx(ll_wrong - ll_right, abs=1e-4)
            assert of_wrong["margin"] == pytest.approx(-of_right["margin"])
            right += 2 * (ll_right > ll_wrong)
        assert metrics[setting]["accuracy"] == pytest.approx(100 * right / 4)
        assert metrics[setting]["yes_rate"] == 50.0  # one of each pair, whichever way the comparison goes
    shown = halueval.pair_item(QA_SAMPLES[0], 0, "qa", halueval.PAIR_PROMPTS["qa"], True, "f")
    assert shown.prompt == "Knowledge: The old king built the bridge.\nQuestion: Who built the bridge? Answer:"
    assert shown.choices == [" the old king", " the queen"] and shown.labels == [1, 0]
    summary = halueval.pair_item({"document": "d", "right_summary": "s", "hallucinated_summary": "t"}, 0,
                                 "summarization", halueval.PAIR_PROMPTS["summarization"], False, "f")
    assert summary.prompt == "Document: d\nSummary:" and summary.choices == [" s", " t"]


def test_halueval_pair_judge_refuses_what_it_cannot_judge(setup, tmp_path):
    data = tmp_path / "general.json"
    data.write_text(json.dumps({"ID": "1", "user_query": "q", "chatgpt_response": "r", "hallucination": "no"}) + "\n")
    base = ["--model_name_or_path", setup["model_dir"], "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UsageError, match="general samples have one response each"):
        halueval.main([*base, "--data_file", str(data), "--judge", "pair"])
    with pytest.raises(UsageError, match="--judge pair shows no instruction"):
        halueval.main([*base, "--data_file", str(data), "--judge", "pair", "--instruction", "none"])
    with pytest.raises(UsageError, match="--pair_prompt is only read with --judge pair"):
        halueval.main([*base, "--data_file", str(data), "--pair_prompt", "{question}"])
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(QA_SAMPLES[0]) + "\n")
    with pytest.raises(UsageError, match="--pair_prompt '\\{query\\}': record 0 cannot fill it"):
        halueval.main([*base, "--data_file", str(qa), "--judge", "pair", "--pair_prompt", "{query}"])


def test_bad_flags(setup, tmp_path):
    with pytest.raises(UsageError, match="exactly one of --data_file"):
        halueval.main(["--model_name_or_path", setup["model_dir"], "--output_dir", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="--instruction"):
        halueval.main(["--model_name_or_path", setup["model_dir"], "--data_file", "x.json",
                       "--output_dir", str(tmp_path / "x"), "--instruction", "missing.txt"])
    with pytest.raises(UsageError, match="lmbda"):
        strategyqa.main(["--model_name_or_path", setup["model_dir"], "--data_file", "x.json",
                         "--output_dir", str(tmp_path / "x"), "--lmbda", "2"])


# ---- one door: a joint directory, several lmbdas ----------------------------------------------------

def test_a_joint_directory_gives_the_numbers_of_base_and_memory(setup, tmp_path):
    """HaluEval, StrategyQA and TruthfulQA take a joint directory (python -m models.convert --joint) as the model, with
    its lmbda, and score what the base and memory directories give; several --lmbda are scored in one run."""
    from models.convert import main as convert_main

    joint_dir = tmp_path / "joint"
    assert convert_main(["--joint", "--base_model", setup["model_dir"], "--memory", setup["memory"],
                         "--output", str(joint_dir), "--lmbda", "0.3"]) == 0
    halu = tmp_path / "halu.json"
    halu.write_text("".join(json.dumps(s) + "\n" for s in QA_SAMPLES))
    yes_no = tmp_path / "task.json"
    yes_no.write_text(json.dumps({"examples": [{"input": "Is the river long?", "target_scores": {"Yes": 1, "No": 0}},
                                               {"input": "Is the bridge old?", "target_scores": {"Yes": 0, "No": 1}}]}))
    tqa = tmp_path / "tqa.jsonl"
    tqa.write_text("".join(json.dumps(r) + "\n" for r in HF_RECORDS))
    runs = [(halueval, halu, ["--instruction", "none"]), (strategyqa, yes_no, []), (truthfulqa, tqa, [])]
    for module, data, extra in runs:
        common = ["--data_file", str(data), *extra]
        flags = module.main(["--model_name_or_path", setup["model_dir"], "--knn_generator_path", setup["memory"],
                             "--lmbda", "0.3", "--output_dir", str(tmp_path / module.__name__ / "flags"), *common])
        joint = module.main(["--model_name_or_path", str(joint_dir), "--output_dir",
                             str(tmp_path / module.__name__ / "joint"), *common])
        assert joint["lmbda"] == 0.3 and joint["lmbda_source"] == f"the joint directory {joint_dir}"
        assert joint["joint_dir"] == str(joint_dir) and flags["lmbda_source"] == "--lmbda"
        for setting in ("base", "base_plus_memory"):
            scores = {k: v for k, v in joint[setting].items() if k not in ("seconds", "items_per_second",
                                                                             "questions_per_second")}
            assert scores == {k: flags[setting][k] for k in scores}
        assert joint["base_plus_memory"]["threads"] == torch.get_num_threads()
        rows = [(tmp_path / module.__name__ / name / "predictions.jsonl").read_text() for name in ("flags", "joint")]
        assert rows[0] == rows[1]
    sweep = strategyqa.main(["--model_name_or_path", setup["model_dir"], "--memory", setup["memory"], "--lmbda", "0.3",
                             "0.5", "--data_file", str(yes_no), "--output_dir", str(tmp_path / "sweep")])
    assert {"base", "base_plus_memory@0.3", "base_plus_memory@0.5"} <= set(sweep) and sweep["lmbdas"] == [0.3, 0.5]
    assert sweep["base_plus_memory@0.3"]["accuracy"] == strategyqa.main(
        ["--model_name_or_path", str(joint_dir), "--data_file", str(yes_no),
         "--output_dir", str(tmp_path / "sweep_joint")])["base_plus_memory"]["accuracy"]
