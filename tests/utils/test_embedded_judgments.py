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
from utils.embedded_corpus import RELATIONS, generate_corpus, write_corpus

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
        assert re.fullmatch(r"Question: Is it true that .+\? Answer: ", items[0].prompt)
        samples_file = out / meta[f"halueval_{split}"]["file"]
        assert samples_file.suffix == ".json" and len(samples_file.read_text().splitlines()) > 1  # JSON lines
        samples = read_local(str(samples_file))
        assert halueval.detect_task(samples[0], "f") == "qa"
        judged = halueval.record_items(samples[0], 0, "qa", "", False, "f")
        assert [item.labels for item in judged] == [[0, 1], [1, 0]]
        for key in (f"yes_no_{split}", f"halueval_{split}"):
            text = (out / meta[key]["file"]).read_bytes()
            assert hashlib.sha256(text).hexdigest() == meta[key]["sha256"]


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
