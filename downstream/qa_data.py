"""Loading closed-book QA sets as ``[{"question": str, "golds": [str, ...]}, ...]``.

Sources: a local file holding a JSON list of records, an object holding one under ``data`` or
``examples`` (BIG-bench), JSON lines (whatever the suffix: HaluEval's release names them ``.json``) or
a ``.csv`` with a header line (TruthfulQA's); or a datasets-hub dataset. Field names are given or detected
from the common layouts:

=====================  ==========  =====================================================================
set                    question    answer field (normalised to a list of gold strings)
=====================  ==========  =====================================================================
NQ-open                question    ``answer``: list of strings
TriviaQA (hub)         question    ``answer``: dict with ``aliases`` / ``normalized_aliases`` / ``value``
TriviaQA (llm-foundry) context     ``answer``: a string, with the record's ``aliases`` list; the context
                                   is ``"Question: ...\nAnswer:"``, whose labels are removed
WebQuestions (hub)     question    ``answers``: list of strings
WebQuestions (qId)     qText       ``answers``: list of strings
WebQuestions (Berant)  utterance   ``targetValue``: ``(list (description X) (description "Y Z"))``
PopQA                  question    ``possible_answers``: a JSON string holding a list
HaluEval QA            question    ``right_answer``: a string
SQuAD style            question    ``answers``: dict with a ``text`` list
=====================  ==========  =====================================================================
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

from downstream.qa_protocols import QUESTION_LABEL, unwrap_question
from utils.cli import UsageError

logger = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "query", "input", "qText", "utterance")
# A field that holds the question with its labels ("Question: ...\nAnswer:"): a question field only then.
LABELLED_QUESTION_FIELDS = ("context",)
ANSWER_FIELDS = ("answer", "answers", "possible_answers", "right_answer", "golds", "gold_answers", "target",
                 "targetValue")
# Keys of an answer dict that hold gold strings, in the order they are collected.
ANSWER_DICT_KEYS = ("value", "aliases", "normalized_value", "normalized_aliases", "text")
# Record-level fields of more gold strings, used beside the detected answer field when present (TriviaQA subsets).
ALIAS_FIELDS = ("aliases", "normalized_aliases", "answer_aliases")
RECORD_LISTS = ("data", "examples")  # keys of an object that holds the records


# One answer of WebQuestions' original targetValue: (description "Two words") or (description Word)
_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^\s")]+))\)')


def target_values(value: str) -> list[str] | None:
    """The answers of a WebQuestions ``targetValue`` (``(list (description X) ...)``), or None if it is not one."""
    if not value.startswith("(list"):
        return None
    return [quoted.replace('\\"', '"') if quoted else bare for quoted, bare in _DESCRIPTION.findall(value)]


def gold_list(value: Any) -> list[str]:
    """Gold answers of one record as a de-duplicated list of non-empty strings (order kept).

    Strings that look like a JSON list (PopQA's ``possible_answers``) are parsed, so are WebQuestions'
    ``(list (description ...))`` values; lists are flattened; dicts contribute the strings under
    `ANSWER_DICT_KEYS`; numbers become strings.
    """
    out: list[str] = []

    def collect(v: Any) -> None:
        if v is None:
            return
        if isinstance(v, str):
            s = v.strip()
            if target_values(s) is not None:
                collect(target_values(s))
                return
            if s.startswith("[") and s.endswith("]"):
                try:
                    parsed = json.loads(s)
                except json.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, list):
                    collect(parsed)
                    return
            if s:
                out.append(s)
        elif isinstance(v, (list, tuple)):
            for item in v:
                collect(item)
        elif isinstance(v, dict):
            for key in ANSWER_DICT_KEYS:
                collect(v.get(key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(str(v))

    collect(value)
    return list(dict.fromkeys(out))


def recorded_prompt(data_file: str) -> tuple[str, str] | None:
    """The prompt a QA file brings: the ``qa_prompt`` (with a ``{question}`` placeholder) of the ``meta.json``
    beside it, and that file's path; None when there is none (the quickstart's corpus records one)."""
    meta_file = os.path.join(os.path.dirname(os.path.abspath(data_file)), "meta.json")
    if not os.path.isfile(meta_file):
        return None
    with open(meta_file) as f:
        template = json.load(f).get("qa_prompt")
    return (template, meta_file) if isinstance(template, str) and "{question}" in template else None


def detect_question_field(record: dict, source: str) -> str:
    """The question field of ``record``: one of `QUESTION_FIELDS`, else a `LABELLED_QUESTION_FIELDS` field whose text
    starts with a ``Question:`` label (llm-foundry's TriviaQA subset)."""
    for name in LABELLED_QUESTION_FIELDS:
        if not any(q in record for q in QUESTION_FIELDS) and isinstance(record.get(name), str) \
                and QUESTION_LABEL.match(record[name]):
            return name
    return detect_field(record, QUESTION_FIELDS, "question", "--question_field", source)


def detect_field(record: dict, candidates: Iterable[str], what: str, flag: str, source: str) -> str:
    for name in candidates:
        if name in record:
            return name
    raise UsageError(f"{source}: cannot detect the {what} field among {sorted(record)}; name it with {flag}")


def json_lines(path: str, text: str, flag: str = "--data_file") -> list:
    """The records of JSON-lines ``text`` (errors name the line)."""
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"{flag} {path}, line {number}: not JSON ({err})") from None
    return records


def csv_records(path: str, text: str, flag: str = "--data_file") -> list[dict]:
    """The rows of CSV ``text`` with a header line (TruthfulQA's ``TruthfulQA.csv``), as records keyed by column."""
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = [dict(row) for row in reader]
    except csv.Error as err:
        raise UsageError(f"{flag} {path}: not CSV ({err})") from None
    if any(None in row for row in records):
        raise UsageError(f"{flag} {path}: a row has more fields than the header ({', '.join(reader.fieldnames)})")
    return records


def read_local(path: str, flag: str = "--data_file") -> list[dict]:
    """Records of a local JSON or JSON-lines file, whatever its suffix, or of a ``.csv`` file with a header line
    (errors name ``flag``)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file")
    is_csv = path.lower().endswith(".csv")
    try:  # CSV: a byte-order mark is not part of the first column's name; quoted fields keep their line ends
        with open(path, encoding="utf-8-sig" if is_csv else "utf-8", newline="" if is_csv else None) as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if is_csv:
        return csv_records(path, text, flag)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = json_lines(path, text, flag)  # one record per line
    if isinstance(data, dict):  # an object holding the records, or the one record of a one-line JSON-lines file
        data = next((data[key] for key in RECORD_LISTS if isinstance(data.get(key), list)), [data])
    if not isinstance(data, list):
        raise UsageError(f"{flag} {path}: expected a list of records, JSON lines, or an object with a "
                         f"{' or '.join(repr(k) for k in RECORD_LISTS)} list")
    records = data
    if records and not all(isinstance(r, dict) for r in records):
        raise UsageError(f"{flag} {path}: every record must be a JSON object")
    return records


def read_hub(name: str, config: str | None, split: str) -> list[dict]:
    """Records of a datasets-hub dataset split (errors name ``--dataset_name``)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all are a user-facing problem here
        raise UsageError(f"--dataset_name {name} (config {config!r}, split {split!r}): could not load it ({err})") from None
    return list(dataset)


def load_qa(data_file: str | None = None, dataset_name: str | None = None, dataset_config_name: str | None = None,
            dataset_split: str = "validation", question_field: str | None = None,
            answer_field: str | list[str] | None = None, max_samples: int | None = None,
            drop_golds: Iterable[str] = (), flag: str = "--data_file") -> tuple[list[dict], dict]:
    """Questions with their gold answers, and a description of what was read (source, fields, counts).

    ``answer_field`` may name several fields, whose gold strings are pooled; when it is not given, the
    detected field is joined by the alias fields (`ALIAS_FIELDS`) the records hold. Records without any
    gold answer are skipped (with a warning), so are those with a gold answer in ``drop_golds`` (the released
    NQ-open evaluation drops the answer ``)``); ``max_samples`` keeps the first N usable records. ``flag``
    names ``data_file`` in errors. Warns when the gold answers look like sentences (`sentence_like_share`).
    """
    if (data_file is None) == (dataset_name is None):
        raise UsageError(f"Give exactly one of {flag} (a local .json/.jsonl) or --dataset_name (a datasets-hub name)")
    if data_file is not None:
        records, source = read_local(data_file, flag), f"{flag} {data_file}"
    else:
        records, source = read_hub(dataset_name, dataset_config_name, dataset_split), f"--dataset_name {dataset_name}"
    if not records:
        raise UsageError(f"{source}: no records")
    first = records[0]
    q_field = question_field or detect_question_field(first, source)
    if answer_field:
        a_fields = [answer_field] if isinstance(answer_field, str) else list(answer_field)
    else:
        a_fields = [detect_field(first, ANSWER_FIELDS, "answer", "--answer_field", source)]
        a_fields += [name for name in ALIAS_FIELDS if name in first and name not in a_fields]
    if any(isinstance(first.get(a), dict) and "aliases" in first[a] for a in a_fields):
        logger.info("%s: TriviaQA answers (%s): the value and every alias are gold answers", source,
                    ", ".join(k for k in ANSWER_DICT_KEYS if any(k in first.get(a, {}) for a in a_fields)))
    elif len(a_fields) > 1:
        logger.info("%s: gold answers from %s", source, ", ".join(a_fields))
    drop_golds = set(drop_golds)
    examples, skipped, dropped = [], 0, 0
    for index, record in enumerate(records):
        for field_name, fl in ((q_field, "--question_field"), *((a, "--answer_field") for a in a_fields)):
            if field_name not in record:
                raise UsageError(f"{source}: record {index} has no field {field_name!r} ({fl}); it has {sorted(record)}")
        question = record[q_field]
        if not isinstance(question, str) or not question.strip():
            raise UsageError(f"{source}: record {index} has no question text in {q_field!r}")
        golds = gold_list([record[a] for a in a_fields])
        if not golds:
            skipped += 1
            continue
        if drop_golds.intersection(golds):
            dropped += 1
            continue
        if q_field in LABELLED_QUESTION_FIELDS:
            question = unwrap_question(question)
        examples.append({"question": question.strip(), "golds": golds})
        if max_samples is not None and len(examples) >= max_samples:
            break
    if skipped:
        logger.warning("%s: skipped %d record(s) without a gold answer in %s", source, skipped, a_fields)
    if dropped:
        logger.info("%s: dropped %d question(s) with a gold answer in %s", source, dropped, sorted(drop_golds))
    if not examples:
        raise UsageError(f"{source}: no record has a gold answer in {a_fields}")
    sentences = sentence_like_share(examples)
    if sentences >= 0.5:
        logger.warning("%s: the gold answers of %.0f%% of the questions look like sentences (the shortest has %d+ "
                       "words): exact match and F1 then mean little; 'contains' or a judgment benchmark fits better",
                       source, 100 * sentences, SENTENCE_WORDS)
    info = {"source": data_file or dataset_name, "dataset_config_name": dataset_config_name,
            "dataset_split": None if data_file else dataset_split, "question_field": q_field,
            "answer_field": a_fields[0] if len(a_fields) == 1 else a_fields,
            "records_read": len(records), "skipped_without_gold": skipped}
    if drop_golds:
        info["dropped_for_gold"] = {"golds": sorted(drop_golds), "count": dropped}
    if sentences:
        info["sentence_like_golds"] = sentences
    return examples, info


SENTENCE_WORDS = 6  # a question whose shortest gold answer has this many words has a sentence for an answer


def sentence_like_share(examples: list[dict]) -> float:
    """The share of questions whose shortest gold answer has `SENTENCE_WORDS` words or more."""
    long = sum(min(len(g.split()) for g in ex["golds"]) >= SENTENCE_WORDS for ex in examples)
    return long / len(examples) if examples else 0.0


def select(examples: list, start: int = 0, count: int | None = None, num_shards: int = 1,
           shard_index: int = 0) -> tuple[list, dict]:
    """The questions ``[start, start + count)``, then the ``shard_index``-th of ``num_shards`` contiguous, nearly
    equal blocks of them, and where they lie: ``{"start", "end", "num_shards", "shard_index"}`` (positions in
    ``examples``). Shards 0..K-1 concatenated in order are the unsharded selection."""
    window = examples[start:] if count is None else examples[start:start + count]
    if start and not window:
        raise UsageError(f"--start {start} is past the last of the {len(examples)} questions")
    begin = len(window) * shard_index // num_shards
    end = len(window) * (shard_index + 1) // num_shards
    where = {"start": start + begin, "end": start + end, "num_shards": num_shards, "shard_index": shard_index}
    return window[begin:end], where
