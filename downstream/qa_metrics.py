"""Closed-book QA metrics, SQuAD style: normalisation, exact match, token F1 and "contains a gold answer";
and the two rules of the authors' evaluators (`downstream.qa_protocols`): the released F1's yes/no rule
and the WebQuestions / TriviaQA evaluator's ``has_answer``.

A prediction is scored against every gold answer and the best score is kept (``max`` over golds), as
the SQuAD evaluation script does. Means are reported x100.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (0 when either side is empty
    and the other is not; 1 when both are empty)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, gold: str) -> float:
    """1 if the normalised gold answer appears in the normalised prediction as whole words ("us" is not in "usa",
    "new york" is in "in new york city"); an empty gold never counts."""
    gold_norm = normalize_answer(gold)
    return float(bool(gold_norm) and f" {gold_norm} " in f" {normalize_answer(prediction)} ")


YES_NO_GOLDS = ("yes", "no", "noanswer")


def released_f1(prediction: str, gold: str) -> float:
    """The released evaluation's F1: a gold that normalises to yes / no / noanswer scores 1 when it appears in the
    normalised prediction (as a substring, as there: "no" is in "nothing"), 0 otherwise; any other gold, token F1."""
    gold_norm = normalize_answer(gold)
    if gold_norm in YES_NO_GOLDS:
        return float(gold_norm in normalize_answer(prediction))
    return token_f1(prediction, gold)


def answer_tokens(text: str) -> list[str]:
    """The WebQuestions / TriviaQA evaluator's tokens: after Unicode NFD and lower-casing, each maximal run of
    letters, digits and combining marks, and each other character that is neither a separator nor a control."""
    tokens, word = [], []
    for ch in unicodedata.normalize("NFD", text).lower():
        kind = unicodedata.category(ch)[0]
        if kind in "LNM":
            word.append(ch)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if kind not in "ZC":
            tokens.append(ch)
    if word:
        tokens.append("".join(word))
    return tokens


def has_answer(prediction: str, gold: str) -> float:
    """1 if the gold's `answer_tokens` appear as a contiguous run in the prediction's ("the beatles" is not in
    "beatles", "u.s." is in "the u.s. army"); a gold without tokens never counts."""
    gold_tokens, pred_tokens = answer_tokens(gold), answer_tokens(prediction)
    n = len(gold_tokens)
    return float(n > 0 and any(pred_tokens[i:i + n] == gold_tokens for i in range(len(pred_tokens) - n + 1)))


def score(prediction: str, golds: Iterable[str], scoring: str = "squad") -> dict[str, float]:
    """Scores of one prediction, each the max over the gold answers (0 with no golds): ``{"em", "f1",
    "contains"}``; ``scoring="released"`` takes F1 with the yes/no rule (`released_f1`), ``"webqa"`` adds
    ``has_answer``."""
    golds = list(golds)
    keys = ("em", "f1", "contains", "has_answer") if scoring == "webqa" else ("em", "f1", "contains")
    if not golds:
        return dict.fromkeys(keys, 0.0)
    f1 = released_f1 if scoring == "released" else token_f1
    scores = {
        "em": max(exact_match(prediction, g) for g in golds),
        "f1": max(f1(prediction, g) for g in golds),
        "contains": max(contains_answer(prediction, g) for g in golds),
    }
    if "has_answer" in keys:
        scores["has_answer"] = max(has_answer(prediction, g) for g in golds)
    return scores


SCORE_KEYS = {"em": "exact_match", "f1": "f1", "contains": "contains", "has_answer": "has_answer"}  # per row -> mean


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """Means x100 of per-question scores: ``{"count", "exact_match", "f1", "contains"}``, and ``has_answer`` when
    the scores have it."""
    n = len(scores)
    keys = [k for k in SCORE_KEYS if scores and k in scores[0]] or ["em", "f1", "contains"]
    return {"count": n, **{SCORE_KEYS[k]: 100.0 * sum(s[k] for s in scores) / n if n else 0.0 for k in keys}}
