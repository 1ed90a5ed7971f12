"""What the multiple-choice evaluations share: flags, reading records, the model and memory, scoring, results.

An evaluation (`downstream.halueval`, `downstream.strategyqa`, `downstream.truthfulqa`) turns records into
`Item`s: a prompt, its choices (continuations) and a 0/1 label per choice. `score_items` gives every
choice its log-likelihood (`downstream.loglik`) under the base model alone and, with a memory
(`models.joint.settings.MemoryArguments`: ``--memory`` / ``--knn_generator_path``, or a joint directory as the
model, loaded by `models.joint.loading.load_joint`), under base + memory at each ``--lmbda``, in one run;
`choice_outcome` reads an item's prediction (the choice of highest log-likelihood), whether it is right (its
label is 1) and the probability mass of the right choices (TruthfulQA's MC2). `write_results` writes
``OUT/predictions.jsonl`` (one line per item, its scores under each setting) and ``OUT/<name>_results.json`` (merged into ``OUT/all_results.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from downstream.eval_qa import prepare_tokenizer
from downstream.loglik import continuation_logliks
from downstream.qa_data import read_hub, read_local
from downstream.qa_results import write_jsonl
from models.joint.loading import LoadedJoint, load_joint
from models.joint.settings import DOWNSTREAM, MemoryArguments
from utils.arguments import PretrainedModelArguments, check_positive
from utils.cli import UsageError
from utils.io import save_metrics

logger = logging.getLogger(__name__)

BASE, JOINT = "base", "base_plus_memory"  # the settings, as results name them (JOINT@<lmbda> for several lmbdas)


@dataclass
class ChoiceEvalArguments:
    """Data and batching of a multiple-choice evaluation (the memory: `MemoryArguments`)."""

    output_dir: str = field(metadata={"help": "Directory for predictions.jsonl and <benchmark>_results.json."})
    data_file: str | None = field(default=None, metadata={
        "help": "Local file: a JSON list of records, JSON lines (whatever the suffix), or an object holding the "
                "records under 'data' or 'examples'."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "datasets-hub name instead of --data_file (offline only from the local cache)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config, e.g. multiple_choice."})
    dataset_split: str = field(default="validation", metadata={"help": "Hub split to evaluate."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N records."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_length: int | None = field(default=None, metadata={
        "help": "Longest sequence scored; longer ones are cut on the left (default: the model's position limit)."})
    def __post_init__(self):
        check_positive(self, "max_samples", "per_device_eval_batch_size", "max_length")
        if (self.data_file is None) == (self.dataset_name is None):
            raise UsageError("Give exactly one of --data_file (a local file) or --dataset_name (a datasets-hub name)")


@dataclass
class Item:
    """One question: the prompt, its choices (continuations of the prompt) and a 0/1 label per choice."""

    prompt: str
    choices: list[str]
    labels: list[int]
    info: dict = field(default_factory=dict)  # what predictions.jsonl records beside the scores

    def __post_init__(self):
        if len(self.choices) != len(self.labels) or len(self.choices) < 2 or 1 not in self.labels:
            raise UsageError(f"An item needs >= 2 choices, one label each and a right one; got choices {self.choices} "
                             f"with labels {self.labels}")


def read_records(args: ChoiceEvalArguments) -> tuple[list[dict], str]:
    """The records of --data_file or --dataset_name, and a name of the source."""
    if args.data_file is not None:
        records, source = read_local(args.data_file), args.data_file
    else:
        records, source = read_hub(args.dataset_name, args.dataset_config_name, args.dataset_split), args.dataset_name
    if not records:
        raise UsageError(f"{source}: no records")
    return records, source


def read_object(path: str) -> dict:
    """The top-level JSON object of a local file (a BIG-bench task's prefixes), or {} for lists and JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_model(model_args: PretrainedModelArguments, memory_args: MemoryArguments,
               preset: tuple[str, float] | None = None) -> LoadedJoint:
    """The base model (on the GPU if there is one) and its memory (`load_joint`; ``preset``: (source, lmbda) of a
    protocol that ran at its own lmbda), the tokenizer set to left padding."""
    loaded = load_joint(model_args, memory_args, DOWNSTREAM, preset=preset)
    if torch.cuda.is_available():
        loaded.to("cuda")
    prepare_tokenizer(loaded.tokenizer, loaded.model)
    return loaded


def settings(loaded: LoadedJoint) -> list[tuple[str, object]]:
    """(name, joint model or None) of each setting a run scores: the base alone, then base + memory at each lmbda
    (named ``base_plus_memory``, or ``base_plus_memory@<lmbda>`` when there are several)."""
    several = len(loaded.lmbdas) > 1
    return [(BASE, None)] + [(f"{JOINT}@{lmbda:g}" if several else JOINT, loaded.joint(lmbda))
                             for lmbda in loaded.lmbdas]


def score_items(model, tokenizer, items: list[Item], batch_size: int, joint=None, max_length: int | None = None,
                add_special_tokens: bool = False) -> tuple[list[list[float]], float]:
    """The log-likelihood of every choice of every item, and the seconds it took (``add_special_tokens``: the
    tokenizer's BOS before each prompt, `downstream.loglik.encode_pair`)."""
    requests = list(dict.fromkeys((item.prompt, choice) for item in items for choice in item.choices))  # once each
    start = time.perf_counter()
    scored = dict(zip(requests, continuation_logliks(model, tokenizer, requests, batch_size, joint, max_length,
                                                     add_special_tokens)))
    seconds = time.perf_counter() - start
    return [[scored[item.prompt, choice].loglik for choice in item.choices] for item in items], seconds


def choice_outcome(logliks: list[float], labels: list[int]) -> dict:
    """The prediction (the first choice of highest log-likelihood), whether its label is 1, and the normalised
    probability mass of the choices labelled 1 (MC2: ``sum_true p / sum_all p``, ``p = exp(loglik)``)."""
    prediction = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    top = max(logliks)
    mass = [math.exp(ll - top) for ll in logliks]  # shifted: the ratio is the same and nothing underflows
    true_mass = sum(m for m, label in zip(mass, labels) if label) / sum(mass)
    return {"logliks": logliks, "prediction": prediction, "correct": bool(labels[prediction]), "true_mass": true_mass}


def speed(count: int, seconds: float) -> dict:
    return {"seconds": seconds, "items_per_second": count / seconds if seconds > 0 else None,
            "threads": torch.get_num_threads()}


def run_settings(loaded: LoadedJoint, items: list[Item], args: ChoiceEvalArguments,
                 add_special_tokens: bool = False) -> tuple[dict, dict]:
    """Each setting's outcomes per item ({setting: [choice_outcome, ...]}) and its speed ({setting: speed})."""
    outcomes, speeds = {}, {}
    for name, scorer in settings(loaded):
        logliks, seconds = score_items(loaded.model, loaded.tokenizer, items, args.per_device_eval_batch_size, scorer,
                                       args.max_length, add_special_tokens)
        outcomes[name] = [choice_outcome(ll, item.labels) for ll, item in zip(logliks, items)]
        speeds[name] = speed(len(items), seconds)
        logger.info("Scored %d items (%d choices) under %s in %.1f s", len(items),
                    sum(len(item.choices) for item in items), name, seconds)
    return outcomes, speeds


def mean_percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def run_record(args: ChoiceEvalArguments, loaded: LoadedJoint, source: str) -> dict:
    """What every results file records about the run besides the scores."""
    record = loaded.record
    return {
        "memory": record["memory"], "memory_kind": record["memory_kind"], "joint_dir": record["joint_dir"],
        "lmbda": loaded.lmbda, "lmbdas": loaded.lmbdas or None, "lmbda_source": record["lmbda_source"],
        "memory_temp": record["memory_temp"], "memory_temp_source": record["memory_temp_source"],
        "base_check": record["base_check"], "model": record["model"],
        "tokenizer_fingerprint": record["tokenizer_fingerprint"],
        "data": {"source": source, "dataset_config_name": args.dataset_config_name,
                 "dataset_split": None if args.data_file else args.dataset_split},
        "settings": {k: v for k, v in asdict(args).items() if k != "output_dir"},
        "device": str(next(loaded.model.parameters()).device),
    }


def write_results(output_dir: str, name: str, rows: list[dict], metrics: dict) -> None:
    """``predictions.jsonl`` and ``<name>_results.json`` (merged into ``all_results.json``), atomically."""
    os.makedirs(output_dir, exist_ok=True)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
    save_metrics(output_dir, name, metrics)


def setting_label(name: str, loaded: LoadedJoint) -> str:
    if name == BASE:
        return "base model alone"
    lmbda = float(name.split("@")[1]) if "@" in name else loaded.lmbda
    return f"base + memory (lmbda {lmbda:g}, memory_temp {loaded.memory_temp:g})"


def memory_minus_base(metrics: dict, keys: tuple[str, ...] | None = None) -> dict | float | None:
    """The first setting with the memory minus the base, for ``keys`` of the settings' metrics (one key: a number)."""
    joint = next((name for name in metrics if name.startswith(JOINT)), None)
    if joint is None:
        return None
    if keys is None:
        return metrics[joint]["accuracy"] - metrics[BASE]["accuracy"]
    return {key: metrics[joint][key] - metrics[BASE][key] for key in keys}
