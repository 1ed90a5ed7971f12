"""How sure a judgment accuracy is, and whether the memory changed it: intervals and paired comparisons.

`downstream.strategyqa` and `downstream.halueval` score the same items under the base model alone and under
base + memory in one run, and write one line per item to ``predictions.jsonl``. `judgment_report` reads those
lines and gives, per setting, the accuracy with its 95% Wilson interval, the share of "Yes" answers and the AUC of
the margin (``log p(" Yes") - log p(" No")``, or the recorded margin of a judgment read from the answers'
likelihoods) against the right answer (does the model's leaning track the truth,
whatever its bias towards one answer; 50 is chance); beside
them the always-"No" and majority-answer baselines; and, for the two settings on the same items, the
difference of accuracy with a paired bootstrap interval and McNemar's exact test (a two-sided binomial test on
the items exactly one of the two settings gets right). Statistics come from scipy.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, bootstrap, mannwhitneyu

BASE, JOINT = "base", "base_plus_memory"  # the settings, as downstream.choice_eval names them
CONFIDENCE = 0.95
RESAMPLES = 10_000


def wilson_interval(successes: int, count: int, confidence: float = CONFIDENCE) -> list[float]:
    """The Wilson score interval of a proportion, in percent."""
    interval = binomtest(successes, count).proportion_ci(confidence_level=confidence, method="wilson")
    return [100.0 * float(interval.low), 100.0 * float(interval.high)]


def paired_difference(base: np.ndarray, joint: np.ndarray, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """``joint - base`` accuracy in points, with a paired percentile-bootstrap interval (items resampled together),
    and McNemar's exact test: ``base_only`` / ``memory_only`` items right under one setting alone, and the
    two-sided binomial p-value of that split (1 when no item differs)."""
    base, joint = np.asarray(base, dtype=float), np.asarray(joint, dtype=float)
    difference = 100.0 * float(joint.mean() - base.mean())
    if np.array_equal(base, joint):  # every resample gives 0: scipy's bootstrap rejects such data
        low = high = 0.0
    else:
        found = bootstrap((base, joint), lambda b, j, axis: 100.0 * (j.mean(axis=axis) - b.mean(axis=axis)),
                          paired=True, vectorized=True, n_resamples=resamples, confidence_level=confidence,
                          method="percentile", rng=np.random.default_rng(seed))
        low, high = float(found.confidence_interval.low), float(found.confidence_interval.high)
    base_only, memory_only = int(((base == 1) & (joint == 0)).sum()), int(((base == 0) & (joint == 1)).sum())
    p_value = binomtest(memory_only, base_only + memory_only).pvalue if base_only + memory_only else 1.0
    return {"points": difference, "interval": [low, high], "base_only": base_only, "memory_only": memory_only,
            "mcnemar_p": float(p_value)}


def said_yes(row: dict, setting: str) -> bool:
    """Whether ``setting`` answered "Yes" on this predictions.jsonl line (strategyqa records the choices; halueval's
    are " Yes", " No"; a generated HaluEval judgment records its reading)."""
    outcome = row[setting]
    if "judgment" in outcome:
        return outcome["judgment"] == "Yes"
    choices = row.get("choices", [" Yes", " No"])
    return choices[outcome["prediction"]].strip().rstrip(".").lower() == "yes"


def yes_margin(row: dict, setting: str) -> float | None:
    """The judgment's leaning towards "Yes": ``log p(" Yes") - log p(" No")`` of a log-likelihood judgment, the
    recorded ``margin`` of a judgment read from the answers' likelihoods (StrategyQA's ``--judge claim``, HaluEval's
    ``--judge pair``), None for generated ones."""
    outcome = row[setting]
    if "margin" in outcome:
        return outcome["margin"]
    if "logliks" not in outcome:
        return None
    choices = [c.strip().rstrip(".").lower() for c in row.get("choices", [" Yes", " No"])]
    return outcome["logliks"][choices.index("yes")] - outcome["logliks"][choices.index("no")]


def margin_auc(margins: list[float], gold: np.ndarray) -> float | None:
    """The chance (in percent) that an item whose answer is "Yes" has a larger margin than one whose answer is
    "No" (ties count half): the Mann-Whitney U over the product of the two counts."""
    yes, no = [m for m, g in zip(margins, gold) if g], [m for m, g in zip(margins, gold) if not g]
    if not yes or not no:
        return None
    return 100.0 * float(mannwhitneyu(yes, no).statistic) / (len(yes) * len(no))


def gold_yes(row: dict) -> bool:
    """Whether the right answer of this line is "Yes"."""
    if "gold" in row:  # halueval
        return row["gold"] == "Yes"
    return any(label and choice.strip().rstrip(".").lower() == "yes" for choice, label in zip(row["choices"], row["labels"]))


def judgment_report(rows: list[dict]) -> dict:
    """The accuracies, intervals, yes-rates, baselines and (with both settings) the paired comparison of the
    predictions.jsonl lines of one strategyqa or halueval run."""
    count = len(rows)
    gold = np.array([gold_yes(row) for row in rows])
    report: dict = {"items": count, "always_no": 100.0 * float((~gold).mean()), "always_yes": 100.0 * float(gold.mean())}
    report["majority"] = max(report["always_no"], report["always_yes"])
    correct = {}
    for setting in (BASE, JOINT):
        if rows and setting in rows[0]:
            correct[setting] = np.array([bool(row[setting]["correct"]) for row in rows])
            margins = [yes_margin(row, setting) for row in rows]
            report[setting] = {"accuracy": 100.0 * float(correct[setting].mean()),
                               "interval": wilson_interval(int(correct[setting].sum()), count),
                               "yes_rate": 100.0 * float(np.mean([said_yes(row, setting) for row in rows])),
                               "margin_auc": None if None in margins else margin_auc(margins, gold)}
    if len(correct) == 2:
        report["memory_minus_base"] = paired_difference(correct[BASE], correct[JOINT])
    return report
