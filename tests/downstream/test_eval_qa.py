"""Closed-book QA evaluation: metrics, data formats, answer extraction, and a tiny end-to-end run."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from downstream.eval_qa import DEFAULT_PROMPT, first_line, main, make_prompt
from downstream.qa_data import gold_list, load_qa
from downstream.qa_metrics import aggregate, contains_answer, exact_match, normalize_answer, score, token_f1
from models import MemoryConfig, build_memory
from models.memory_directory import save_memory
from utils.cli import UsageError

# ---- metrics -------------------------------------------------------------------------------------

def test_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("  An apple, a Pear and THE plum. ") == "apple pear and plum"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("") == ""


def test_exact_match_and_f1():
    assert exact_match("the Beatles.", "Beatles") == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0
    # prediction "barack obama jr" vs gold "barack obama": p = 2/3, r = 1 -> F1 = 0.8
    assert token_f1("Barack Obama Jr.", "Barack Obama") == pytest.approx(0.8)
    # one common token of 2 and 3: p = 1/2, r = 1/3 -> F1 = 0.4
    assert token_f1("New York", "York City Hall") == pytest.approx(0.4)
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "Paris") == 0.0


def test_contains_and_multiple_golds():
    assert contains_answer("It was built in Paris, France", "paris") == 1.0
    assert contains_answer("Par", "Paris") == 0.0
    assert contains_answer("anything", "the") == 0.0  # an empty normalised gold never counts
    # whole words only, not substrings of words
    assert contains_answer("USA", "us") == 0.0 and contains_answer("that one", "hat") == 0.0
    assert contains_answer("He lived in New York City.", "new york") == 1.0
    assert contains_answer("Us, of course", "US") == 1.0
    s = score("Barack Obama Jr.", ["George Bush", "Barack Obama", "Obama"])
    assert s == {"em": 0.0, "f1": pytest.approx(0.8), "contains": 1.0}
    assert score("obama", ["George Bush", "Obama"])["em"] == 1.0
    assert score("x", []) == {"em": 0.0, "f1": 0.0, "contains": 0.0}
    summary = aggregate([{"em": 1.0, "f1": 1.0, "contains": 1.0}, {"em": 0.0, "f1": 0.5, "contains": 0.0}])
    assert summary == {"count": 2, "exact_match": 50.0, "f1": 75.0, "contains": 50.0}


def test_answer_is_the_first_line():
    assert first_line(" Paris\nQuestion: next one\nAnswer: x") == "Paris"
    assert first_line("\n  Paris  \nmore") == "Paris"
    assert first_line("   ") == ""
    assert make_prompt(DEFAULT_PROMPT, "Who?") == "Answer these questions:\nQuestion: Who?\nAnswer:"


# ---- data formats --------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_formats(tmp_path):
    nq = write_jsonl(tmp_path / "nq.jsonl", [{"question": "who?", "answer": ["A", "B"]}])
    assert load_qa(nq)[0] == [{"question": "who?", "golds": ["A", "B"]}]

    trivia = tmp_path / "trivia.json"
    trivia.write_text(json.dumps([{"question": "q1", "answer": {
        "aliases": ["Big Apple", "NYC"], "normalized_aliases": ["big apple", "nyc"], "value": "New York City"}}]))
    examples, info = load_qa(str(trivia))
    assert examples[0]["golds"] == ["New York City", "Big Apple", "NYC", "big apple", "nyc"]
    assert info["answer_field"] == "answer"

    webq = write_jsonl(tmp_path / "webq.jsonl", [{"url": "u", "question": "q", "answers": ["Jamaican English"]}])
    assert load_qa(webq)[0][0]["golds"] == ["Jamaican English"]

    popqa = write_jsonl(tmp_path / "popqa.jsonl",
                        [{"id": 1, "question": "q", "possible_answers": json.dumps(["Paris", "City of Light"])}])
    assert load_qa(popqa)[0][0]["golds"] == ["Paris", "City of Light"]

    halu = tmp_path / "halu.json"  # an object holding the records under "data"
    halu.write_text(json.dumps({"data": [{"knowledge": "k", "question": "q", "right_answer": "Yes",
                                          "hallucinated_answer": "No"}]}))
    assert load_qa(str(halu))[0][0]["golds"] == ["Yes"]

    halu_lines = tmp_path / "qa_data.json"  # HaluEval's release: JSON lines under a .json name
    halu_lines.write_text("".join(json.dumps({"question": f"q{i}", "right_answer": f"r{i}"}) + "\n" for i in range(3)))
    assert [e["golds"] for e in load_qa(str(halu_lines))[0]] == [["r0"], ["r1"], ["r2"]]

    bigbench = tmp_path / "task.json"  # BIG-bench: the records under "examples"
    bigbench.write_text(json.dumps({"name": "t", "examples": [{"input": "Is it?", "target": "Yes"}]}))
    assert load_qa(str(bigbench))[0] == [{"question": "Is it?", "golds": ["Yes"]}]

    text = tmp_path / "qa.txt"  # any suffix, JSON lines inside
    text.write_text(json.dumps({"question": "q", "answers": ["a"]}) + "\n")
    assert load_qa(str(text))[0] == [{"question": "q", "golds": ["a"]}]

    custom = write_jsonl(tmp_path / "custom.jsonl", [{"prompt": "p", "gold": "g"}] * 5)
    examples, _ = load_qa(custom, question_field="prompt", answer_field="gold", max_samples=3)
    assert examples == [{"question": "p", "golds": ["g"]}] * 3


def test_alias_fields_are_gold_answers_too(tmp_path):
    # TriviaQA's released subset: a plain answer with its aliases in a field of their own
    trivia = write_jsonl(tmp_path / "trivia.jsonl", [{"question": "q", "answer": "Sun", "aliases": ["Sol", "the Sun"]}])
    examples, info = load_qa(trivia)
    assert examples[0]["golds"] == ["Sun", "Sol", "the Sun"] and info["answer_field"] == ["answer", "aliases"]
    assert load_qa(trivia, answer_field="answer")[0][0]["golds"] == ["Sun"]  # named: only that field
    both = load_qa(trivia, answer_field=["answer", "aliases"])[0][0]["golds"]
    assert both == ["Sun", "Sol", "the Sun"]
    with pytest.raises(UsageError, match="record 0 has no field 'other' \\(--answer_field\\)"):
        load_qa(trivia, answer_field=["answer", "other"])


def test_a_question_that_carries_the_template_is_not_wrapped_again():
    template = "Answer these questions:\nQuestion: {question}\nAnswer:"
    plain = make_prompt(template, "Who wrote Hamlet?")
    assert plain == "Answer these questions:\nQuestion: Who wrote Hamlet?\nAnswer:"
    assert make_prompt(template, "Question: Who wrote Hamlet?\nAnswer:") == plain
    assert make_prompt(template, "Q: Who wrote Hamlet? A:") == plain
    assert make_prompt(template, "What is a question: or not?") == template.replace("{question}", "What is a question: or not?")


def test_gold_list_normalises():
    assert gold_list(["a", ["b", "a"], None, 3, ""]) == ["a", "b", "3"]
    assert gold_list('["x", "y"]') == ["x", "y"]
    assert gold_list("[not json") == ["[not json"]
    assert gold_list({"text": ["t1", "t2"], "answer_start": [0, 4]}) == ["t1", "t2"]


def test_data_errors(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query_text": "q", "label": "a"}])
    with pytest.raises(UsageError, match=r"bad\.jsonl.*question field.*--question_field"):
        load_qa(bad)
    with pytest.raises(UsageError, match=r"answer field.*--answer_field"):
        load_qa(bad, question_field="query_text")
    with pytest.raises(UsageError, match=r"--data_file .*missing\.jsonl: no such file"):
        load_qa(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UsageError, match="exactly one"):
        load_qa()
    with pytest.raises(UsageError, match="--prompt_template must contain"):
        main(["--model_name_or_path", "x", "--data_file", bad, "--output_dir", str(tmp_path / "o"),
              "--prompt_template", "Q: {q} A:"])
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UsageError, match="--use_neural_knn needs --memory"):
        main(["--model_name_or_path", "x", "--data_file", good, "--output_dir", str(tmp_path / "o"),
              "--use_neural_knn"])


# ---- end to end on a tiny GPT-2 ------------------------------------------------------------------

QUESTIONS = ["the river of the city", "who built the old bridge", "the king was born near",
             "many people and", "its market festival", "the queen of the north tower", "a song"]


@pytest.fixture(scope="module")
def qa_setup(tmp_path_factory, tiny_gpt2_dir):
    from transformers import AutoConfig

    directory = tmp_path_factory.mktemp("qa")
    data = write_jsonl(directory / "qa.jsonl",
                       [{"question": q, "answer": [q.split()[-1]]} for q in QUESTIONS])
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(AutoConfig.from_pretrained(tiny_gpt2_dir), num_layers=1,
                                                 intermediate_size=48, layer=1))
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.5)
    save_memory(directory / "memory", memory, results={}, record={})
    return {"dir": directory, "data": data, "model": str(tiny_gpt2_dir), "memory": str(directory / "memory")}


def run_qa(setup, name, *extra):
    out = setup["dir"] / name
    metrics = main(["--model_name_or_path", setup["model"], "--data_file", setup["data"], "--output_dir", str(out),
                    "--prompt_template", "the {question}", "--max_new_tokens", "4", *extra])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows, out


def test_end_to_end(qa_setup):
    base, base_rows, out = run_qa(qa_setup, "base", "--per_device_eval_batch_size", "3")
    assert len(base_rows) == len(QUESTIONS) and base["count"] == len(QUESTIONS)
    assert set(base_rows[0]) == {"question", "prompt", "golds", "prediction", "continuation", "em", "f1", "contains"}
    assert base_rows[0]["prompt"] == f"the {QUESTIONS[0]}"
    assert all(r["prediction"] for r in base_rows)
    results = json.loads((out / "qa_results.json").read_text())
    assert results["use_neural_knn"] is False and results["lmbda"] is None
    assert (results["prompt_template"], results["prompt_source"]) == ("the {question}", "--prompt_template")
    assert results["exact_match"] == pytest.approx(100 * sum(r["em"] for r in base_rows) / len(base_rows))
    assert results["questions_per_second"] > 0

    # batched (3, left padded) == one at a time
    _, single_rows, _ = run_qa(qa_setup, "single", "--per_device_eval_batch_size", "1")
    assert [r["continuation"] for r in single_rows] == [r["continuation"] for r in base_rows]

    # the memory with weight 0 changes nothing; with weight 0.9 it changes something
    zero, zero_rows, _ = run_qa(qa_setup, "lmbda0", "--per_device_eval_batch_size", "3", "--use_neural_knn",
                                "--knn_generator_path", qa_setup["memory"], "--lmbda", "0")
    assert [r["continuation"] for r in zero_rows] == [r["continuation"] for r in base_rows]
    assert zero["use_neural_knn"] is True and zero["lmbda"] == 0
    _, joint_rows, _ = run_qa(qa_setup, "lmbda09", "--per_device_eval_batch_size", "3", "--use_neural_knn", "true",
                              "--knn_generator_path", qa_setup["memory"], "--lmbda", "0.9")
    assert [r["continuation"] for r in joint_rows] != [r["continuation"] for r in base_rows]


def read_rows(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]


def test_base_and_memory_in_one_run_equal_separate_runs(qa_setup):
    """With a memory, one run answers under the base alone and under base + memory at each lmbda: each setting's
    answers and scores are those of a run of its own."""
    base, base_rows, _ = run_qa(qa_setup, "alone", "--per_device_eval_batch_size", "3")
    top, top_rows, out = run_qa(qa_setup, "together", "--per_device_eval_batch_size", "3", "--memory",
                                qa_setup["memory"], "--lmbda", "0.9", "0.3", "--memory_temp", "0.8")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["base", "lmbda_0.3", "lmbda_0.9"]
    assert read_rows(out / "base") == base_rows
    assert top_rows == read_rows(out / "lmbda_0.9") and top["lmbda"] == 0.9 and top["memory_temp"] == 0.8
    assert top["lmbda_source"] == "--lmbda" and top["memory_temp_source"] == "--memory_temp"
    assert set(top["by_setting"]) == {"base", "lmbda_0.9", "lmbda_0.3"}
    assert top["by_setting"]["base"]["exact_match"] == base["exact_match"]
    assert all(s["threads"] == torch.get_num_threads() and s["questions_per_second"] > 0
               for s in top["by_setting"].values())
    alone_base = json.loads((out / "base" / "qa_results.json").read_text())
    assert alone_base["use_neural_knn"] is False and alone_base["lmbda"] is None and alone_base["memory"] is None
    _, single_rows, single_out = run_qa(qa_setup, "only03", "--per_device_eval_batch_size", "3", "--memory",
                                        qa_setup["memory"], "--lmbda", "0.3", "--knn_temp", "0.8")
    assert read_rows(single_out / "lmbda_0.3") == read_rows(out / "lmbda_0.3") == single_rows
    assert [r["continuation"] for r in read_rows(out / "lmbda_0.9")] != [r["continuation"] for r in base_rows]


def test_the_released_flags_are_accepted(qa_setup):
    """The released eval_qa.sh's flags: --eval_subset names the split; --do_eval and --ignore_pad_token_for_loss have
    no effect here and say so in one line each; the released default lmbda is not used (0.5, the policy's)."""
    from downstream.eval_qa import QAArguments
    from utils.cli import parse_args

    (args,) = parse_args((QAArguments,), ["--output_dir", "o", "--dataset_name", "nq_open", "--eval_subset", "test",
                                          "--ignore_pad_token_for_loss", "--do_eval"])
    assert args.dataset_split == "test" and args.do_eval and args.ignore_pad_token_for_loss
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # main() resets the root logger's handlers (utils.cli.setup_logging)
    logging.getLogger("downstream.eval_qa").addHandler(handler)
    try:
        metrics, _, _ = run_qa(qa_setup, "released", "--per_device_eval_batch_size=3", "--use_neural_knn",
                               "--knn_generator_path", qa_setup["memory"], "--ignore_pad_token_for_loss", "--do_eval")
    finally:
        logging.getLogger("downstream.eval_qa").removeHandler(handler)
    assert metrics["lmbda"] == 0.5 and metrics["lmbda_source"] == "the default for downstream"
    assert sum("has no effect here" in r.getMessage() for r in records) == 2


def test_a_qa_set_that_brings_its_prompt_uses_it_by_default(tmp_path):
    from downstream.eval_qa import DEFAULT_PROMPT, QAArguments, resolve_prompt

    data = tmp_path / "qa_test.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    args = QAArguments(output_dir=str(tmp_path / "out"), data_file=str(data))
    assert resolve_prompt(args) == (DEFAULT_PROMPT, "the released default")
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "embedded_corpus", "qa_prompt": "Q: {question} A:"}))
    assert resolve_prompt(args) == ("Q: {question} A:", str(tmp_path / "meta.json"))
    explicit = QAArguments(output_dir=str(tmp_path / "out"), data_file=str(data), prompt_template="{question}?")
    assert resolve_prompt(explicit) == ("{question}?", "--prompt_template")
    (tmp_path / "meta.json").write_text(json.dumps({"qa_prompt": "no placeholder"}))
    assert resolve_prompt(args)[1] == "the released default"
