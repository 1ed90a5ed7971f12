"""QA protocols (downstream.qa_protocols): each preset's prompt and scoring on hand-made items, stop strings,
few-shot prompts, chat templates, sharded runs merged, through the real CLI on a tiny GPT-2."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from downstream.eval_qa import main
from downstream.qa_data import load_qa, select
from downstream.qa_metrics import answer_tokens, has_answer, score
from downstream.qa_protocols import PROTOCOLS, build_prompt, choose_shots, extract_answer
from utils.cli import UsageError

RELEASED, WEBQA, DEFAULT = PROTOCOLS["released"], PROTOCOLS["webqa"], PROTOCOLS["default"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- prompts -------------------------------------------------------------------------------------

def test_released_prompt():
    expected = "Answer these questions:\nQuestion: who wrote Hamlet?\nAnswer:"
    assert build_prompt(RELEASED.template, "Who wrote Hamlet", RELEASED.question_style) == expected
    assert build_prompt(RELEASED.template, "Who wrote Hamlet?", RELEASED.question_style) == expected  # no second ?
    assert build_prompt(RELEASED.template, "Question: Who wrote Hamlet? Answer:", RELEASED.question_style) == expected
    # as the released code: only the first letter is lower-cased, whatever it is
    assert build_prompt(RELEASED.template, "NFL champions 1990", "released").endswith("Question: nFL champions 1990?\nAnswer:")
    assert (RELEASED.max_new_tokens, RELEASED.stop, RELEASED.answer, RELEASED.scoring, RELEASED.drop_golds) == \
        (15, ("\n",), "first_line_as_generated", "released", (")",))


def test_webqa_prompt():
    assert build_prompt(WEBQA.template, "who is the president of france", WEBQA.question_style) == \
        "Answer the questions:\n\nQuestion: who is the president of france? The answer is:"
    # the question as given: a question that ends with ? gets a second one, as in the authors' evaluator
    assert build_prompt(WEBQA.template, "Who is it?", WEBQA.question_style).endswith("Question: Who is it?? The answer is:")
    assert (WEBQA.max_new_tokens, WEBQA.stop, WEBQA.answer, WEBQA.scoring) == (100, ("\n", ".", ","), "until_stop", "webqa")


def test_default_is_todays_behaviour():
    assert DEFAULT.template is None and DEFAULT.question_style == "as_given"
    assert (DEFAULT.max_new_tokens, DEFAULT.stop, DEFAULT.stop_at_newline, DEFAULT.answer, DEFAULT.scoring) == \
        (16, (), True, "first_line", "squad")
    assert build_prompt("Q: {question} A:", "Who?") == "Q: Who? A:"


def test_answers_by_protocol():
    assert extract_answer(" Paris\nQuestion: x", RELEASED) == "Paris"
    assert extract_answer("\nParis\n", RELEASED) == ""  # the first line as generated is empty
    assert extract_answer("\nParis\n", DEFAULT) == "Paris"  # the first non-blank line
    assert extract_answer(" Paris, the capital. Yes", WEBQA) == "Paris"
    assert extract_answer(" Mount Everest.", WEBQA) == "Mount Everest"
    assert extract_answer(" no stop here", WEBQA) == "no stop here"


# ---- scoring -------------------------------------------------------------------------------------

def test_released_scoring_yes_no_rule():
    # a yes/no gold counts in F1 when it appears in the prediction; exact match stays exact
    assert score("yes, it was", ["Yes"], "released") == {"em": 0.0, "f1": 1.0, "contains": 1.0}
    assert score("yes, it was", ["Yes"], "squad")["f1"] == pytest.approx(0.5)  # p 1/3, r 1
    assert score("nothing at all", ["no"], "released")["f1"] == 1.0  # a substring, as the released code
    assert score("maybe", ["no"], "released")["f1"] == 0.0
    assert score("Barack Obama Jr.", ["Barack Obama"], "released")["f1"] == pytest.approx(0.8)  # other golds: F1


def test_webqa_has_answer():
    assert has_answer("The Beatles", "Beatles") == 1.0
    assert has_answer("Beatles", "The Beatles") == 0.0  # no article removal, unlike "contains"
    assert score("Beatles", ["The Beatles"], "webqa") == {"em": 1.0, "f1": 1.0, "contains": 1.0, "has_answer": 0.0}
    assert has_answer("USA", "US") == 0.0 and has_answer("that", "hat") == 0.0
    assert has_answer("the U.S. army", "U.S.") == 1.0
    assert answer_tokens("The U.S. army, 1990!") == ["the", "u", ".", "s", ".", "army", ",", "1990", "!"]
    assert has_answer("JOSÉ Mourinho", "José") == 1.0  # uncased
    assert has_answer("Jose Mourinho", "José") == 0.0  # NFD keeps the accent as a mark of the word
    assert has_answer("anything", "  ") == 0.0
    assert score("x", [], "webqa") == {"em": 0.0, "f1": 0.0, "contains": 0.0, "has_answer": 0.0}


# ---- data ----------------------------------------------------------------------------------------

def test_nq_close_paren_answers_are_dropped(tmp_path):
    data = write_jsonl(tmp_path / "nq.jsonl", [{"question": "q1", "answer": ["a"]},
                                               {"question": "what season does bart bass die", "answer": [")"]},
                                               {"question": "q3", "answer": ["b", ")"]},
                                               {"question": "q4", "answer": ["c"]}])
    examples, info = load_qa(data, drop_golds=(")",))
    assert [e["question"] for e in examples] == ["q1", "q4"]
    assert info["dropped_for_gold"] == {"golds": [")"], "count": 2}
    assert len(load_qa(data)[0]) == 4  # only when asked (the released protocol)


def test_triviaqa_answer_dict_gives_every_alias(tmp_path):
    record = {"question": "Which planet is the red planet?", "question_id": "tc_1", "answer": {
        "aliases": ["Mars", "Planet Mars"], "normalized_aliases": ["mars", "planet mars"],
        "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "", "normalized_value": "mars",
        "type": "WikipediaEntity", "value": "Mars"}}
    examples, info = load_qa(write_jsonl(tmp_path / "trivia.jsonl", [record]))
    assert examples[0]["golds"] == ["Mars", "Planet Mars", "mars", "planet mars"]
    assert info["answer_field"] == "answer"


def test_sentence_like_golds_warn(tmp_path, caplog):
    long = write_jsonl(tmp_path / "long.jsonl", [
        {"question": "q1", "answer": "The sun is a star that is very far away."},
        {"question": "q2", "answer": "Nothing happens if you swallow gum, it passes through you."},
        {"question": "q3", "answer": "Paris"}])
    with caplog.at_level(logging.WARNING, logger="downstream.qa_data"):
        _, info = load_qa(long)
    assert "look like sentences" in caplog.text and info["sentence_like_golds"] == pytest.approx(2 / 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="downstream.qa_data"):
        load_qa(write_jsonl(tmp_path / "short.jsonl", [{"question": "q", "answer": "Paris"}]))
    assert "sentences" not in caplog.text


def test_select_windows_and_shards():
    items = list(range(10))
    assert select(items, 2, 5) == ([2, 3, 4, 5, 6], {"start": 2, "end": 7, "num_shards": 1, "shard_index": 0})
    shards = [select(items, 1, None, 3, i) for i in range(3)]
    assert [x for shard, _ in shards for x in shard] == items[1:]
    assert [(w["start"], w["end"]) for _, w in shards] == [(1, 4), (4, 7), (7, 10)]
    with pytest.raises(UsageError, match="--start 12 is past the last of the 10 questions"):
        select(items, 12)


def test_fewshot_choice_and_prompt():
    pool = [{"question": f"Question {i}", "golds": [f"answer {i}", "other"]} for i in range(6)]
    shots = choose_shots(pool, "Question 3", 5, seed=0)
    assert sorted(shots) == [(f"Question {i}", f"answer {i}") for i in (0, 1, 2, 4, 5)]  # never the question itself
    assert choose_shots(pool, "question 3", 2, seed=7) == choose_shots(pool, "Question: question 3", 2, seed=7)
    assert choose_shots(pool, "elsewhere", 2, seed=7) == choose_shots(pool, "elsewhere", 2, seed=7)
    assert len({tuple(choose_shots(pool, "elsewhere", 2, seed=s)) for s in range(8)}) > 1  # the seed matters
    with pytest.raises(UsageError, match="--num_fewshot 6: --fewshot_file has only 5 examples"):
        choose_shots(pool, "Question 0", 6, seed=0)
    # the released layout: the instruction once, then "Question: ...\nAnswer: ...\n" per shot
    prompt = build_prompt(RELEASED.template, "Who wrote Hamlet", "released",
                          [("Which magazine was started first?", "Arthur's Magazine"), ("Is it", "no")])
    assert prompt == ("Answer these questions:\nQuestion: which magazine was started first?\nAnswer: Arthur's Magazine\n"
                      "Question: is it?\nAnswer: no\nQuestion: who wrote Hamlet?\nAnswer:")
    assert build_prompt(WEBQA.template, "q", "as_given", [("s", "a")]) == \
        "Answer the questions:\n\nQuestion: s? The answer is: a\nQuestion: q? The answer is:"


# ---- end to end on a tiny GPT-2 ------------------------------------------------------------------

QUESTIONS = ["the river of the city", "who built the old bridge", "the king was born near",
             "many people and", "its market festival", "the queen of the north tower", "a song"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gpt2_dir):
    directory = tmp_path_factory.mktemp("protocols")
    data = write_jsonl(directory / "qa.jsonl", [{"question": q, "answer": [q.split()[-1]]} for q in QUESTIONS])
    return {"dir": directory, "data": data, "model": str(tiny_gpt2_dir)}


def run(setup, name, *extra, data=None):
    out = setup["dir"] / name
    metrics = main(["--model_name_or_path", setup["model"], "--data_file", data or setup["data"],
                    "--output_dir", str(out), "--per_device_eval_batch_size", "3", *extra])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows


def test_released_run(setup):
    data = write_jsonl(setup["dir"] / "nq.jsonl", [{"question": "Who built the old bridge", "answer": ["king"]},
                                                   {"question": "What season", "answer": [")"]},
                                                   {"question": "the river of", "answer": ["city", "yes"]}])
    metrics, rows = run(setup, "released", "--protocol", "released", data=data)
    assert metrics["count"] == 2 and metrics["data"]["dropped_for_gold"]["count"] == 1
    assert [r["prompt"] for r in rows] == ["Answer these questions:\nQuestion: who built the old bridge?\nAnswer:",
                                           "Answer these questions:\nQuestion: the river of?\nAnswer:"]
    assert metrics["protocol"]["name"] == "released" and metrics["protocol"]["max_new_tokens"] == 15
    assert metrics["prompt_source"] == "--protocol released"
    for row in rows:  # each row scored by the released rules
        assert {k: row[k] for k in ("em", "f1", "contains")} == score(row["prediction"], row["golds"], "released")
    results = json.loads((setup["dir"] / "released" / "qa_results.json").read_text())
    assert results["protocol"]["stop"] == ["\n"] and results["protocol"]["overridden"] == []


def test_flags_override_the_preset(setup):
    metrics, rows = run(setup, "webqa", "--protocol", "webqa", "--max_new_tokens", "3", "--stop", "city", "\\n")
    assert metrics["protocol"]["max_new_tokens"] == 3 and metrics["protocol"]["stop"] == ["city", "\n"]
    assert metrics["protocol"]["overridden"] == ["max_new_tokens", "stop"]
    assert metrics["protocol"]["template"] == WEBQA.template and "has_answer" in metrics
    assert rows[0]["prompt"] == f"Answer the questions:\n\nQuestion: {QUESTIONS[0]}? The answer is:"
    assert all("city" not in r["prediction"] for r in rows)


def test_stop_strings_cut_the_continuation(setup):
    _, free = run(setup, "free", "--prompt_template", "the {question}", "--max_new_tokens", "8")
    row = next(r for r in free if len(r["continuation"].split()) >= 4)
    index = free.index(row)
    word = row["continuation"].split()[2]
    expected = row["continuation"][:row["continuation"].find(word)].strip()
    _, stopped = run(setup, "stopped", "--prompt_template", "the {question}", "--max_new_tokens", "8", "--stop", word)
    assert stopped[index]["prediction"] == expected
    assert stopped[index]["continuation"].rstrip().endswith(word)  # generation stopped there
    assert len(stopped[index]["continuation"].split()) < len(row["continuation"].split())


def test_fewshot_run_excludes_the_question(setup):
    metrics, rows = run(setup, "fewshot", "--prompt_template", "the {question}", "--max_new_tokens", "2",
                        "--num_fewshot", "2", "--fewshot_file", setup["data"])
    golds = {q: q.split()[-1] for q in QUESTIONS}
    for question, row in zip(QUESTIONS, rows):
        *shots, last = row["prompt"].split("\n")
        assert last == f"the {question}" and len(shots) == 2
        for shot in shots:
            shot_question, answer = shot[len("the "):].rsplit(" ", 1)
            assert shot_question in golds and shot_question != question and golds[shot_question] == answer
    assert metrics["settings"]["num_fewshot"] == 2
    with pytest.raises(UsageError, match="--num_fewshot needs --fewshot_file"):
        run(setup, "bad", "--num_fewshot", "2")


def test_chat_template(setup, tmp_path):
    from transformers import AutoTokenizer

    chat_model = tmp_path / "chat_model"
    shutil.copytree(setup["model"], chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} </user>{% endfor %}"
                               "{% if add_generation_prompt %} bot:{% endif %}")
    tokenizer.save_pretrained(chat_model)
    _, rows = run({**setup, "model": str(chat_model)}, "chat", "--prompt_template", "the {question}",
                  "--max_new_tokens", "2", "--chat_template")
    assert rows[0]["prompt"] == f"<user> the {QUESTIONS[0]} </user> bot:"
    with pytest.raises(UsageError, match="--chat_template: the tokenizer of --model_name_or_path has no chat template"):
        run(setup, "no_chat", "--chat_template")


def test_shards_merge_to_the_unsharded_run(setup):
    flags = ["--protocol", "webqa", "--max_new_tokens", "4", "--start", "1", "--max_samples", "5"]
    whole, whole_rows = run(setup, "whole", *flags)
    for i in range(3):
        run(setup, f"shard{i}", *flags, "--num_shards", "3", "--shard_index", str(i))
    shard_dirs = [str(setup["dir"] / f"shard{i}") for i in (2, 0, 1)]  # any order
    merged = main(["--merge", *shard_dirs, "--output_dir", str(setup["dir"] / "merged")])
    for key in ("count", "exact_match", "f1", "contains", "has_answer"):
        assert merged[key] == whole[key]
    merged_rows = [json.loads(line) for line in (setup["dir"] / "merged" / "predictions.jsonl").read_text().splitlines()]
    assert merged_rows == whole_rows and [r["question"] for r in whole_rows] == QUESTIONS[1:6]
    assert merged["questions"] == {"start": 1, "end": 6, "num_shards": 3, "shard_index": None}
    assert json.loads((setup["dir"] / "merged" / "qa_results.json").read_text())["count"] == 5

    with pytest.raises(UsageError, match=r"expected the shards 0\.\.2 of --num_shards 3 once each, got \[0, 2\]"):
        main(["--merge", shard_dirs[1], shard_dirs[0], "--output_dir", str(setup["dir"] / "m2")])
    run(setup, "other", "--protocol", "released", "--max_new_tokens", "4", "--start", "1", "--max_samples", "5",
        "--num_shards", "3", "--shard_index", "1")
    with pytest.raises(UsageError, match="not a shard of the same run .*protocol"):
        main(["--merge", shard_dirs[1], str(setup["dir"] / "other"), shard_dirs[0], "--output_dir",
              str(setup["dir"] / "m3")])
    with pytest.raises(UsageError, match="--shard_index must be below --num_shards"):
        run(setup, "bad", "--num_shards", "2", "--shard_index", "2")
