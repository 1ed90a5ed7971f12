"""Closed-book QA metrics, SQuAD style: normalisation, exact match, token F1 and "contains a gold answer".

A prediction is scored against every gold answer and the best score is kept (``max`` over golds), as
the SQuAD evaluation script does. Means are reported x100.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable

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


def score(prediction: str, golds: Iterable[str]) -> dict[str, float]:
    """``{"em", "f1", "contains"}`` of one prediction: each the max over the gold answers (0 with no golds)."""
    golds = list(golds)
    if not golds:
        return {"em": 0.0, "f1": 0.0, "contains": 0.0}
    return {
        "em": max(exact_match(prediction, g) for g in golds),
        "f1": max(token_f1(prediction, g) for g in golds),
        "contains": max(contains_answer(prediction, g) for g in golds),
    }


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """Means x100 of per-question scores: ``{"exact_match", "f1", "contains", "count"}``."""
    n = len(scores)
    mean = lambda key: 100.0 * sum(s[key] for s in scores) / n if n else 0.0  # noqa: E731
    return {"count": n, "exact_match": mean("em"), "f1": mean("f1"), "contains": mean("contains")}
