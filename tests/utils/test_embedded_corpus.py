"""Tests for the embedded default corpus: determinism, sizes, no leakage of new facts, files, tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from utils.embedded_corpus import (
    EOS_TOKEN,
    CorpusSizes,
    generate_corpus,
    main,
    write_corpus,
)

SMALL = {"num_countries": 3, "num_cities": 12, "num_rivers": 4, "num_organisations": 10, "num_people": 40}


def _sentences(text: str) -> set[str]:
    return {s for line in text.splitlines() for s in re.split(r"(?<=\.)\s+", line) if s}


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(seed=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "embedded"
    write_corpus(out, seed=0)
    return out


def test_same_seed_same_text_other_seed_other_text(corpus):
    again = generate_corpus(seed=0)
    for field in ("train", "validation", "test", "qa", "facts"):
        assert getattr(again, field) == getattr(corpus, field)
    other = generate_corpus(seed=1)
    assert other.train != corpus.train and other.test != corpus.test


def test_split_sizes(corpus):
    train_chars = len(corpus.train)
    assert 150_000 <= train_chars <= 350_000
    assert 25_000 <= len(corpus.train.split()) <= 60_000
    for split in ("validation", "test"):
        assert 0.04 <= len(getattr(corpus, split)) / train_chars <= 0.10
        assert 150 <= len(corpus.qa[split]) <= 1000
    for text in (corpus.train, corpus.validation, corpus.test):
        assert text.endswith("\n")
    assert "\n\n" not in corpus.validation + corpus.test
    # Train's only blank lines part the judged samples of its judgment drills.
    assert all(block.startswith("#Question#: ") for block in corpus.train.split("\n\n")[1:])


def test_eval_splits_state_only_train_facts(corpus):
    train = set(corpus.facts["train"])
    for split in ("validation", "test"):
        assert corpus.facts[split]
        assert set(corpus.facts[split]) <= train
    subjects = {split: {f.subject for f in corpus.facts[split]} for split in ("validation", "test")}
    assert not subjects["validation"] & subjects["test"]
    # Every fact an eval paragraph states is a true attribute of its subject.
    truth = {(e.name, r): v for group in corpus.entities.values() for e in group for r, v in e.attributes.items()}
    assert all(truth[f.subject, f.relation] == f.value for f in corpus.facts["test"])


def test_eval_sentences_never_occur_in_train(corpus):
    train = _sentences(corpus.train)
    validation, test = _sentences(corpus.validation), _sentences(corpus.test)
    assert not test & train
    assert not validation & train
    assert not validation & test
    for line in corpus.test.splitlines():
        assert line not in corpus.train


def _qa_lines(text: str) -> dict[str, str]:
    """The QA lines of a split (not its yes/no lines): question -> answer."""
    return dict(re.findall(r"^Question: (?!Is it true that )(.*?) Answer: (.*)$", text, flags=re.MULTILINE))


def test_qa_sets_ask_about_their_split_entities(corpus):
    for split in ("validation", "test"):
        subjects = {f.subject for f in corpus.facts[split]}
        assert len(corpus.qa[split]) == len(corpus.facts[split])
        for pair in corpus.qa[split]:
            assert set(pair) == {"question", "answer"} and pair["answer"]
            assert pair["answer"][0] in corpus.train
            assert any(subject in pair["question"] for subject in subjects)


def test_qa_questions_are_held_out_of_train(corpus):
    """Train asks every fact in QA lines, but never in the wording an eval QA set asks it in."""
    drilled = _qa_lines(corpus.train)
    names = {e.name: e for group in corpus.entities.values() for e in group}
    for split in ("validation", "test"):
        for fact, pair in zip(corpus.facts[split], corpus.qa[split]):
            question, answer = pair["question"], pair["answer"][0]
            assert question not in corpus.train
            subject = f"the {fact.subject} River" if names[fact.subject].kind == "river" else fact.subject
            assert re.search(rf"\b{re.escape(subject)}\b", question)
            # The same fact, about the same subject, is drilled in another wording.
            others = [q for q, a in drilled.items() if a == answer and re.search(rf"\b{re.escape(subject)}\b", q)]
            assert others and question not in others


def test_qa_drills_per_fact(corpus):
    facts = sum(len(e.attributes) for group in corpus.entities.values() for e in group)
    assert len(_qa_lines(corpus.train)) == facts * CorpusSizes().qa_drills_per_fact
    none = generate_corpus(seed=0, qa_drills_per_fact=0, **SMALL)
    assert not _qa_lines(none.train) and none.qa["test"]
    two = generate_corpus(seed=0, qa_drills_per_fact=2, **SMALL)
    drilled = _qa_lines(two.train)
    assert len(drilled) == 2 * sum(len(e.attributes) for group in two.entities.values() for e in group)
    assert not {pair["question"] for split in ("validation", "test") for pair in two.qa[split]} & set(drilled)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="--num_people"):
        CorpusSizes(num_people=1)
    with pytest.raises(ValueError, match="--eval_fraction"):
        CorpusSizes(eval_fraction=0.5)
    with pytest.raises(ValueError, match="--qa_drills_per_fact"):
        CorpusSizes(qa_drills_per_fact=4)
    with pytest.raises(ValueError, match="--judgment_drills_per_fact"):
        CorpusSizes(judgment_drills_per_fact=-1)
    with pytest.raises(TypeError):
        generate_corpus(seed=0, num_unicorns=3)


def test_write_corpus_files_and_meta(written):
    names = {p.name for p in written.iterdir()}
    assert {"train.txt", "validation.txt", "test.txt", "qa_validation.jsonl", "qa_test.jsonl", "tokenizer",
            "meta.json"} <= names
    assert not written.with_name(written.name + ".partial").exists()
    meta = json.loads((written / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["sizes"]["num_people"] == CorpusSizes().num_people
    assert 30_000 <= meta["splits"]["train"]["tokens"] <= 80_000
    for split in ("train", "validation", "test"):
        text = (written / f"{split}.txt").read_text()
        assert meta["splits"][split]["chars"] == len(text)
        assert meta["splits"][split]["lines"] == len(text.splitlines())
    for split in ("validation", "test"):
        qa = [json.loads(line) for line in (written / f"qa_{split}.jsonl").read_text().splitlines()]
        assert len(qa) == meta[f"qa_{split}"]["count"] and all(isinstance(p["answer"], list) for p in qa)
    train = (written / "train.txt").read_text()
    assert meta["train_qa_lines"] == len(re.findall(r"^Question: (?!Is it true that )", train, re.M))
    for answer in ("Yes", "No"):
        yes_no = re.findall(rf"^Question: Is it true that .*\? Answer: {answer}$", train, re.M)
        assert meta["train_yes_no_lines"][answer] == len(yes_no)  # 0 by default (--judgment_drills_per_fact)
        judged = re.findall(rf"^#Your Judgement#: {answer}$", train, re.M)
        assert meta["train_judged_samples"][answer] == len(judged)


def test_write_corpus_is_byte_identical(written, tmp_path):
    again = tmp_path / "again"
    write_corpus(again, seed=0)
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (written / name).read_bytes() == (again / name).read_bytes(), name


def test_tokenizer_loads_and_round_trips(written):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(written / "tokenizer")
    meta = json.loads((written / "meta.json").read_text())
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == meta["tokenizer"]["eos_token_id"]
    assert len(tokenizer) == meta["tokenizer"]["vocab_size"] <= 4096
    paragraph = (written / "test.txt").read_text().splitlines()[0]
    ids = tokenizer(paragraph)["input_ids"]
    assert tokenizer.decode(ids) == paragraph
    assert tokenizer.eos_token_id not in ids
    # Entity names stay short: a name is 1-3 tokens (the first word of person names counted alone).
    corpus = generate_corpus(seed=0)
    names = [e.name.split()[-1] for group in corpus.entities.values() for e in group]
    lengths = [len(tokenizer(" " + name)["input_ids"]) for name in names]
    assert sum(n <= 3 for n in lengths) / len(lengths) > 0.95


def test_write_corpus_is_idempotent_and_refuses_other_settings(tmp_path):
    out = tmp_path / "small"
    meta = write_corpus(out, seed=0, **SMALL)
    stamp = (out / "train.txt").stat().st_mtime_ns
    assert write_corpus(out, seed=0, **SMALL) == meta
    assert (out / "train.txt").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=re.escape(str(out))):
        write_corpus(out, seed=1, **SMALL)
    with pytest.raises(ValueError, match="num_people"):
        write_corpus(out, seed=0, **{**SMALL, "num_people": 41})


def test_stale_partial_directory_is_replaced(tmp_path):
    out = tmp_path / "small"
    stale = tmp_path / "small.partial"
    stale.mkdir()
    (stale / "junk.txt").write_text("left by an interrupted run")
    write_corpus(out, seed=0, **SMALL)
    assert not stale.exists() and not (out / "junk.txt").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--output_dir", str(out), "--seed", "2", "--vocab_size", "1024"]
    argv += [arg for key, value in SMALL.items() for arg in (f"--{key}", str(value))]
    meta = main(argv)
    assert meta["seed"] == 2 and meta["vocab_size"] == 1024 and meta["sizes"]["num_people"] == 40
    assert str(out) in capsys.readouterr().out
    assert (out / "tokenizer" / "tokenizer.json").is_file()
