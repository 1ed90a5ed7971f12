"""What downstream.eval_qa writes, and merging the output directories of a sharded run.

One setting (the base alone, or base + memory at one ``lmbda``) is ``predictions.jsonl`` (one line per question,
with its prompt) and ``qa_results.json`` (merged into ``all_results.json``), `write_results`. A run that scores
several settings writes each into a subdirectory named after it (``base/``, ``lmbda_0.5/``, ...), in that same
format, and at the top the first setting with a memory, with ``by_setting``: every setting's scores and speed
(`write_settings`). `merge_shards` merges the top-level results of the shards of one run (the subdirectories of
shards merge the same way, one setting at a time).
"""

from __future__ import annotations

import json
import logging
import os

from downstream.qa_metrics import SCORE_KEYS, aggregate
from utils.cli import UsageError
from utils.io import read_json, save_metrics

logger = logging.getLogger(__name__)

SETTING_SUMMARY = ("count", *SCORE_KEYS.values(), "seconds", "questions_per_second", "threads", "use_neural_knn",
                   "lmbda", "memory_temp")


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write JSON lines atomically (temporary file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(output_dir: str, rows: list[dict], metrics: dict) -> None:
    """``predictions.jsonl``, ``qa_results.json`` (merged into ``all_results.json``) and the summary line."""
    os.makedirs(output_dir, exist_ok=True)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
    save_metrics(output_dir, "qa", metrics)
    setting = (f"base + memory (lmbda {metrics['lmbda']:g}, memory_temp {metrics['memory_temp']:g})"
               if metrics["use_neural_knn"] else "base model alone")
    extra = f" has_answer {metrics['has_answer']:.2f}" if "has_answer" in metrics else ""
    logger.info("QA %s (%s protocol), %s: %d questions, EM %.2f F1 %.2f contains %.2f%s, %.2f questions/s (%.1f s, "
                "%s torch threads)", metrics["data"]["source"], metrics["protocol"]["name"], setting, metrics["count"],
                metrics["exact_match"], metrics["f1"], metrics["contains"], extra,
                metrics["questions_per_second"] or 0.0, metrics["seconds"], metrics.get("threads"))


# Results that differ between the shards of one run; everything else must agree for them to merge.
PER_SHARD = {"count", *SCORE_KEYS.values(), "seconds", "questions_per_second", "questions", "device", "by_setting"}


def merge_shards(directories: list[str], output_dir: str) -> dict:
    """One result from the output directories of the shards 0..K-1 of one run: the predictions in order and the
    metrics recomputed from them, which equal those of the unsharded run."""
    shards = []
    for directory in directories:
        results_file = os.path.join(directory, "qa_results.json")
        if not os.path.isfile(results_file):
            raise UsageError(f"--merge {directory}: no qa_results.json (run downstream.eval_qa there first)")
        metrics = read_json(results_file)
        if "questions" not in metrics:
            raise UsageError(f"--merge {directory}: written before sharding existed; run it again")
        with open(os.path.join(directory, "predictions.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != metrics["count"]:
            raise UsageError(f"--merge {directory}: predictions.jsonl has {len(rows)} rows, qa_results.json counts "
                             f"{metrics['count']}")
        shards.append((metrics, rows, directory))
    shards.sort(key=lambda shard: shard[0]["questions"]["shard_index"])
    first = shards[0][0]

    def common(metrics: dict) -> dict:
        settings = {k: v for k, v in metrics["settings"].items() if k != "shard_index"}
        return {**{k: v for k, v in metrics.items() if k not in PER_SHARD}, "settings": settings}

    for metrics, _, directory in shards[1:]:
        differing = sorted(k for k in {**common(first), **common(metrics)}
                           if common(first).get(k) != common(metrics).get(k))
        if differing:
            raise UsageError(f"--merge {directory}: not a shard of the same run as {shards[0][2]} (differs in "
                             f"{', '.join(differing)})")
    num_shards = first["questions"]["num_shards"]
    indices = [metrics["questions"]["shard_index"] for metrics, _, _ in shards]
    if indices != list(range(num_shards)):
        raise UsageError(f"--merge: expected the shards 0..{num_shards - 1} of --num_shards {num_shards} once each, "
                         f"got {indices}")
    rows = [row for _, shard_rows, _ in shards for row in shard_rows]
    seconds = sum(metrics["seconds"] for metrics, _, _ in shards)
    merged = {
        **{k: v for k, v in first.items() if k not in PER_SHARD},
        **aggregate([{k: row[k] for k in SCORE_KEYS if k in row} for row in rows]),
        "seconds": seconds, "questions_per_second": len(rows) / seconds if seconds > 0 else None,
        "questions": {"start": first["questions"]["start"], "end": shards[-1][0]["questions"]["end"],
                      "num_shards": num_shards, "shard_index": None},
        "device": sorted({metrics["device"] for metrics, _, _ in shards}),
        "merged_from": [os.path.abspath(directory) for _, _, directory in shards],
    }
    write_results(output_dir, rows, merged)
    return merged


def write_settings(output_dir: str, results: dict[str, tuple[list[dict], dict]]) -> dict:
    """Several settings of one run ({name: (rows, metrics)}): each in ``output_dir/<name>``, and at the top the first
    setting with a memory, with ``by_setting`` (the scores and speed of each). Returns the top-level metrics."""
    for name, (rows, metrics) in results.items():
        write_results(os.path.join(output_dir, name), rows, metrics)
    primary = next(name for name, (_, metrics) in results.items() if metrics["use_neural_knn"])
    rows, metrics = results[primary]
    by_setting = {name: {key: m[key] for key in SETTING_SUMMARY if key in m} for name, (_, m) in results.items()}
    top = {**metrics, "by_setting": by_setting}
    os.makedirs(output_dir, exist_ok=True)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
    save_metrics(output_dir, "qa", top)
    return top

