"""The embedded corpus's yes/no questions and hallucination-judgment items: deterministic, held out like its QA,
true against swapped facts, and in the formats downstream.strategyqa and downstream.halueval read."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from downstream import halueval, strategyqa
from downstream.qa_data import read_local
from utils.embedded_corpus import RELATIONS, generate_corpus, judgments, write_corpus

SMALL = {"num_countries": 3, "num_cities": 12, "num_rivers": 4, "num_organisations": 10, "num_people": 40}
EVAL = ("validation", "test")


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(seed=0, **SMALL)


def mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<![\w,]){re.escape(value)}(?![\w,])", text) is not None


def test_same_seed_same_items_other_seed_other_items(corpus):
    assert generate_corpus(seed=0, **SMALL).judgments == corpus.judgments
    assert generate_corpus(seed=1, **SMALL).judgments != corpus.judgments


def test_items_ask_about_the_held_out_facts(corpus):
    subjects = {split: {f.subject for f in corpus.facts[split]} for split in EVAL}
    values = {}
    for group in corpus.entities.values():
        for entity in group:
            for relation, value in entity.attributes.items():
                values.setdefault(relation, set()).add(value)
    for split in EVAL:
        facts, yes_no, samples = (corpus.facts[split], corpus.judgments["yes_no"][split],
                                  corpus.judgments["hallucination"][split])
        assert len(yes_no) == len(samples) == len(facts) == len(corpus.qa[split])
        for fact, example, sample, pair in zip(facts, yes_no, samples, corpus.qa[split]):
            # About the split's own entity (held out like the QA set: never the other split's); not a sentence of train.
            assert fact.subject in example["input"] and fact.subject in sample["question"]
            other = next(s for s in EVAL if s != split)
            assert fact.subject in subjects[split] and fact.subject not in subjects[other]
            assert example["input"] not in corpus.train
            # A true fact, or the same relation with another entity's value.
            true = example["target_scores"]["Yes"] == 1
            assert example["target_scores"]["No"] == int(not true) and example["target"] == ("Yes" if true else "No")
            assert mentions(example["input"], fact.value) == true
            # The hallucination sample: the QA set's question, its answer, and a swapped value of the same relation.
            assert sample["question"] == pair["question"] and sample["right_answer"] == pair["answer"][0]
            assert sample["hallucinated_answer"] != sample["right_answer"] and sample["knowledge"] == ""
            template = RELATIONS[fact.relation].answers[0]
            swapped_value = re.fullmatch(re.escape(template).replace(r"\{v\}", "(.+)"), sample["hallucinated_answer"])
            assert swapped_value and swapped_value.group(1) in values[fact.relation]
        share_yes = sum(e["target_scores"]["Yes"] for e in yes_no) / len(yes_no)
        assert 0.3 < share_yes < 0.7


def test_each_yes_no_example_carries_its_claim(corpus):
    """The claim: the QA set's question of the same fact, the value the example states as the answer (the right one
    exactly when the answer is "Yes"), and every other value of the relation in the world as the alternatives."""
    values = judgments.relation_values(corpus.entities)
    for split in EVAL:
        for fact, example, pair in zip(corpus.facts[split], corpus.judgments["yes_no"][split], corpus.qa[split]):
            claim, form = example["claim"], RELATIONS[fact.relation].answers[0]
            assert claim["question"] == pair["question"]
            assert (claim["answer"] == pair["answer"][0]) == (example["target"] == "Yes")
            assert sorted([claim["answer"], *claim["alternatives"]]) == sorted(form.format(v=v) for v in values[fact.relation])
            assert claim["answer"] not in claim["alternatives"]
            stated = re.fullmatch(re.escape(form).replace(r"\{v\}", "(.+)"), claim["answer"]).group(1)
            assert mentions(example["input"], stated)  # the claim is the value the question states


def test_written_files_read_by_the_evaluations(tmp_path):
    out = tmp_path / "small"
    meta = write_corpus(out, seed=0, **SMALL)
    for split in EVAL:
        task_file = out / meta[f"yes_no_{split}"]["file"]
        examples = read_local(str(task_file))
        prompt = strategyqa.prompt_settings(json.loads(task_file.read_text()), strategyqa.StrategyQAArguments())
        items = [strategyqa.record_item(record, i, prompt, "f") for i, record in enumerate(examples)]
        assert len(items) == meta[f"yes_no_{split}"]["count"]
        assert sum(item.labels[0] for item in items) == meta[f"yes_no_{split}"]["yes"]
        prefix = json.loads(task_file.read_text())["task_prefix"]  # the few-shot examples, then the question
        assert items[0].prompt.startswith(prefix)
        assert re.fullmatch(r"Question: Is it true that .+\? Answer: ", items[0].prompt.removeprefix(prefix))
        task = json.loads(task_file.read_text())
        claims = [strategyqa.claim_item(record, i, strategyqa.claim_template(task, strategyqa.StrategyQAArguments()),
                                        "f") for i, record in enumerate(examples)]
        assert meta[f"yes_no_{split}"]["claims"] == len(claims) == len(items)
        assert claims[0].prompt == f"Question: {examples[0]['claim']['question']} Answer:"  # as train's QA lines
        assert claims[0].choices[0] == " " + examples[0]["claim"]["answer"] and claims[0].labels[0] == 1
        samples_file = out / meta[f"halueval_{split}"]["file"]
        assert samples_file.suffix == ".json" and len(samples_file.read_text().splitlines()) > 1  # JSON lines
        samples = read_local(str(samples_file))
        assert halueval.detect_task(samples[0], "f") == "qa"
        judged = halueval.record_items(samples[0], 0, "qa", "", False, "f")
        assert [item.labels for item in judged] == [[0, 1], [1, 0]]
        for key in (f"yes_no_{split}", f"halueval_{split}"):
            text = (out / meta[key]["file"]).read_bytes()
            assert hashlib.sha256(text).hexdigest() == meta[key]["sha256"]


def test_a_corpus_written_before_the_claims_gets_them(tmp_path):
    out = tmp_path / "small"
    meta = write_corpus(out, seed=0, **SMALL)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for split in EVAL:  # the yes/no files as they were written before claims existed
        task_file = out / meta[f"yes_no_{split}"]["file"]
        task = json.loads(task_file.read_text())
        task.pop("claim_prompt")
        task["examples"] = [{k: v for k, v in e.items() if k != "claim"} for e in task["examples"]]
        task_file.write_text(json.dumps(task))
    old = {k: ({key: v for key, v in entry.items() if key != "claims"} if k.startswith("yes_no_") else entry)
           for k, entry in meta.items()}
    (out / "meta.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    assert write_corpus(out, seed=0, **SMALL) == meta
    assert {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()} == before


def test_a_corpus_written_before_the_items_gets_them_added(tmp_path):
    out = tmp_path / "small"
    meta = write_corpus(out, seed=0, **SMALL)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    old = {key: value for key, value in meta.items() if not key.startswith(("yes_no_", "halueval_"))}
    for key in set(meta) - set(old):
        (out / meta[key]["file"]).unlink()
    (out / "meta.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    assert write_corpus(out, seed=0, **SMALL) == meta
    assert {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()} == before


def test_fewshot_examples_are_train_only_facts_half_true(corpus):
    shots = corpus.judgments["fewshot"]
    asked = {fact.subject for split in EVAL for fact in corpus.facts[split]}
    values = {}
    for group in corpus.entities.values():
        for entity in group:
            for relation, value in entity.attributes.items():
                values.setdefault(relation, set()).add(value)
    yes_no, judged = shots["yes_no"], shots["hallucination"]
    assert len(yes_no) == judgments.YES_NO_SHOTS and len(judged) == judgments.HALUEVAL_SHOTS
    assert [s["target"] for s in yes_no].count("Yes") == judgments.YES_NO_SHOTS // 2
    assert [s["judgement"] for s in judged].count("No") == judgments.HALUEVAL_SHOTS // 2
    for shot in yes_no:
        fact = shot["fact"]
        assert fact.subject not in asked and fact.subject in shot["input"]  # no eval item asks about it
        assert mentions(shot["input"], fact.value) == (shot["target"] == "Yes")
    for shot in judged:
        fact, template = shot["fact"], RELATIONS[shot["fact"].relation].answers[0]
        assert fact.subject not in asked and fact.subject in shot["question"]
        value = re.fullmatch(re.escape(template).replace(r"\{v\}", "(.+)"), shot["answer"]).group(1)
        assert value in values[fact.relation] and (value == fact.value) == (shot["judgement"] == "No")
    assert generate_corpus(seed=0, **SMALL).judgments["fewshot"] == shots


def test_fewshot_prompts_in_the_files_fit_the_base_model(tmp_path):
    """The default corpus's prompts, few-shot prefix included, fit the quickstart base model's 256 positions."""
    out = tmp_path / "full"
    meta = write_corpus(out, seed=0)
    from utils.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(out / "tokenizer"))
    task = json.loads((out / "yes_no_test.json").read_text())
    lines = task["task_prefix"].splitlines()
    assert meta["yes_no_test"]["shots"] == len(lines) == judgments.YES_NO_SHOTS
    assert all(re.fullmatch(r"Question: Is it true that .+\? Answer: (Yes|No)", line) for line in lines)
    prompt = strategyqa.prompt_settings(task, strategyqa.StrategyQAArguments())
    items = [strategyqa.record_item(r, i, prompt, "f") for i, r in enumerate(task["examples"])]
    assert all(item.prompt.startswith(task["task_prefix"] + "Question: Is it true that ") for item in items)
    instruction = (out / "halueval_fewshot.txt").read_text()
    assert meta["halueval_fewshot"]["shots"] == instruction.count("#Your Judgement#:") == judgments.HALUEVAL_SHOTS
    samples = read_local(str(out / "halueval_test.json"))
    judged = [item for i, s in enumerate(samples) for item in halueval.record_items(s, i, "qa", instruction, False, "f")]
    assert judged[0].prompt == (f"{instruction}\n\n#Question#: {samples[0]['question']}\n"  # a blank line, as between shots
                                f"#Answer#: {samples[0]['right_answer']}\n#Your Judgement#:")
    longest = max(len(tokenizer(item.prompt + " Yes")["input_ids"]) for item in items + judged)
    assert longest <= 256, longest


def test_a_corpus_written_before_the_fewshot_prompts_gets_them(tmp_path):
    out = tmp_path / "small"
    meta = write_corpus(out, seed=0, **SMALL)
    expected = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    old = {key: value for key, value in meta.items() if key != "halueval_fewshot"}
    (out / "halueval_fewshot.txt").unlink()
    for split in EVAL:  # the yes/no files as they were written before: no task_prefix
        task = json.loads((out / f"yes_no_{split}.json").read_text())
        del task["task_prefix"]
        (out / f"yes_no_{split}.json").write_text(json.dumps(task, indent=1) + "\n")
        old[f"yes_no_{split}"] = {k: v for k, v in old[f"yes_no_{split}"].items() if k != "shots"}
    (out / "meta.json").write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    assert write_corpus(out, seed=0, **SMALL) == meta
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == expected


YES_NO_LINE = re.compile(r"^Question: Is it true that (.+)\? Answer: (Yes|No)$", re.M)
JUDGED = re.compile(r"^#Question#: (.+)\n#Answer#: (.+)\n#Your Judgement#: (Yes|No)$", re.M)


@pytest.fixture(scope="module")
def drilled():
    """The corpus with one drill of each format per train-only fact (the default has none)."""
    return generate_corpus(seed=0, judgment_drills_per_fact=1, **SMALL)


def eval_names(corpus) -> set[str]:
    return {fact.subject for split in EVAL for fact in corpus.facts[split]}


def test_train_drills_state_train_only_facts_in_both_formats_half_yes(drilled):
    from utils.embedded_corpus.prose import _phrasings, _subject

    corpus = drilled
    yes_no, judged = YES_NO_LINE.findall(corpus.train), JUDGED.findall(corpus.train)
    drilled, _ = judgments.drill_facts(corpus.entities, {split: corpus.facts[split] for split in EVAL})
    assert drilled and len(yes_no) == len(judged) == len(drilled)  # one of each per fact
    for answers in ([a for _, a in yes_no], [j for _, _, j in judged]):
        assert abs(answers.count("Yes") - answers.count("No")) <= 1
    # A yes/no line says "Yes" exactly when its statement is true: a phrasing of a fact of the world.
    true_statements = {f"{_subject(e)} {p.text}" for group in corpus.entities.values() for e in group
                       for fact in e.facts() for p in _phrasings(e, fact) if p.is_predicate}
    assert all((statement in true_statements) == (answer == "Yes") for statement, answer in yes_no)
    # A judged sample says "No" (not hallucinated) exactly when its answer is the right one.
    right = {}
    for fact in drilled:
        entity = next(e for group in corpus.entities.values() for e in group if e.name == fact.subject)
        relation = RELATIONS[fact.relation]
        for question in relation.questions:
            question = question.format(s=_subject(entity))
            right[question[0].upper() + question[1:]] = relation.answers[0].format(v=fact.value)
    assert all((right[question] == answer) == (judgement == "No") for question, answer, judgement in judged)


def test_train_drills_never_mention_an_eval_entity(drilled):
    """No drill says anything about a validation or test entity: its name occurs in none of them, as subject or
    value (true or swapped); and no eval item's question or statement occurs anywhere in train."""
    corpus = drilled
    names = eval_names(corpus)
    drills = [f"Is it true that {statement}?" for statement, _ in YES_NO_LINE.findall(corpus.train)]
    drills += [f"{question} {answer}" for question, answer, _ in JUDGED.findall(corpus.train)]
    assert drills and not [(d, n) for d in drills for n in names if mentions(d, n)]
    for split in EVAL:
        assert not [e for e in corpus.judgments["yes_no"][split] if e["input"] in corpus.train]
        assert not [s for s in corpus.judgments["hallucination"][split] if s["question"] in corpus.train]


def test_train_drills_leave_the_rest_of_the_corpus_as_it_was(corpus, drilled):
    none, corpus = corpus, drilled  # the default corpus has no drills
    assert not YES_NO_LINE.search(none.train) and not JUDGED.search(none.train)
    for field in ("validation", "test", "qa", "facts", "judgments"):
        assert getattr(none, field) == getattr(corpus, field), field
    drills = set(YES_NO_LINE.findall(corpus.train)) | set(JUDGED.findall(corpus.train))
    kept = [line for line in corpus.train.split("\n") if not line.startswith(("Question: Is it true", "#"))]
    assert [line for line in kept if line] == none.train.splitlines() and drills
    two = generate_corpus(seed=0, judgment_drills_per_fact=2, **SMALL)
    once = len(JUDGED.findall(corpus.train))
    assert len(YES_NO_LINE.findall(two.train)) == len(JUDGED.findall(two.train)) == 2 * once
    assert generate_corpus(seed=0, judgment_drills_per_fact=1, **SMALL).train == corpus.train
