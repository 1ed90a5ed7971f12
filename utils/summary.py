"""Gather the quickstart's results into one table (printed) and ``summary.json``.

    python -m utils.summary --output_dir outputs/quickstart

Each entry reads a file some stage wrote; entries whose stage has not run are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.io import write_json


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: Path) -> dict:
    """The quickstart's numbers, keyed by what they measure."""
    summary: dict = {}
    if dataset := _read(out / "dataset" / "meta.json"):
        summary["tokens"] = {split: s["tokens"] for split, s in dataset["splits"].items()}
        summary["block_size"], summary["stride"] = dataset["block_size"], dataset["stride"]
    if train := _read(out / "base" / "train_results.json"):
        summary["base_train_seconds"] = train.get("train_runtime")
        summary["base_train_loss"] = train.get("train_loss")
    if base := _read(out / "eval_base_test" / "eval_results.json"):
        summary["test_perplexity"] = {"base": base["perplexity"]}
        summary["test_tokens"] = base["eval_tokens"]
        summary["tokens_per_second"] = {"base": base["eval_tokens_per_second"]}
    if dstore := _read(out / "dstore" / "meta.json"):
        summary["datastore"] = {"rows": dstore["rows"], "dim": dstore["dim"], "seconds": dstore["seconds"],
                                "rows_per_second": round(dstore["rows"] / max(dstore["seconds"], 1e-9), 1)}
    if targets := _read(out / "knn_targets" / "meta.json"):
        summary["knn_targets"] = {"rows": targets["rows"], "entries_per_row": round(targets["nnz"] / max(targets["rows"], 1), 2),
                                  "k": targets["k"], "knn_temp": targets["knn_temp"]}
    if knnlm := _read(out / "eval_knnlm_test" / "knnlm_results.json"):
        summary.setdefault("test_perplexity", {})["knn_lm"] = knnlm["perplexity"]
        summary.setdefault("tokens_per_second", {})["knn_lm"] = knnlm["eval_tokens_per_second"]
        summary["knn_lm_settings"] = {"k": knnlm["k"], "lmbda": knnlm["lmbda"], "knn_temp": knnlm["knn_temp"],
                                      "index": knnlm["index_type"]}
    if memory := _read(out / "memory" / "training_results.json"):
        summary["memory_training"] = {"seconds": memory["train_seconds"], "steps": memory["train_steps"],
                                      "validation_kl_to_knn": memory["val_kl"],
                                      "validation_top1_agreement_with_knn": memory["val_top1_agreement"]}
    if joint := _read(out / "eval_joint_test" / "joint_results.json"):
        perplexity = summary.setdefault("test_perplexity", {})
        perplexity["memory_alone"] = joint["memory_perplexity"]
        for entry in joint["lmbda_sweep"]:
            perplexity[f"base_plus_memory_lmbda_{entry['lmbda']}"] = entry["perplexity"]
        summary.setdefault("tokens_per_second", {})["base_plus_memory"] = joint["joint_tokens_per_second"]
    return summary


def format_table(summary: dict) -> str:
    """A two-column Markdown table of the summary."""
    lines = ["| what | value |", "|---|---|"]

    def add(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, v in value.items():
                add(f"{key} / {sub}", v)
        else:
            lines.append(f"| {key} | {round(value, 3) if isinstance(value, float) else value} |")

    for key, value in summary.items():
        add(key, value)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="The quickstart's output directory.")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    summary = collect(out)
    write_json(out / "summary.json", summary)
    print(format_table(summary))
    return summary


if __name__ == "__main__":
    main()
