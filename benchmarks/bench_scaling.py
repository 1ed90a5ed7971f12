"""Scaling on real text (issue 23, item 2): memory size x training length, the base's continued pretraining at
matched compute, and the datastore's size. SmolLM2-135M-Instruct on a tenth of WikiText-2 train, on CPU.

    python -m benchmarks.bench_scaling                   # everything, resumable (hours on 2 CPU cores)
    python -m benchmarks.bench_scaling --report_only     # tables and plot from the points done so far

Every stage goes through the project's entry points, called in-process (``main(argv)``):
1. Artifacts under ``--out`` (each skipped when complete): ``utils.preprocess_dataset`` (the first
   ``--max_chars`` characters of each split), the datastore over train (``train_base --save_knnlm_dstore``),
   an exact index (``knn_utils.build_index``) and the kNN targets (``knn_utils.saveKNNMulti``, k 64,
   ``knn_temp`` 4, as ``scripts/configs/smollm2_wikitext2.sh``). For the datastore axis, prefixes of that
   datastore (the first quarter / half of its windows, copied row for row: a window's keys do not depend on
   the windows after it), each with its own index and its own kNN targets searched within the prefix.
2. Memory grid: for each ``--memory_blocks`` size, ONE run of ``train_mlpmem_offline`` for
   ``max(--epochs)`` epochs with a constant learning rate after the warm-up (``constant_with_warmup``), so
   that the weights after epoch 1, 2, 4 are what a run of that length would give with the same constant rate
   (a decaying schedule would make early checkpoints meaningless). The run stops at each listed epoch (a
   checkpoint), and that checkpoint's weights are saved as a memory directory (``snapshots/epoch_E``, with
   meta.json, through `models.memory_directory.save_memory`); the last epoch is the run's own memory.
3. Every memory is measured by ``evaluate_joint`` on the first ``--eval_windows`` windows of validation and
   of test (memory alone, base, and base + memory for every ``--lmbdas``; lmbda is chosen on validation and
   reported on test; memory temperature 1).
4. The paper's comparison: the base's continued pretraining (``train_base --do_train``, constant learning
   rate after 5 warm-up steps) on the same tenth of train, stopped after ``--cpt_epochs`` epochs (each
   length resumes the previous one's checkpoint), and its perplexity on the same windows (``train_base
   --do_eval``). Training compute is counted as 6 x parameters x trained rows (tokens) for both.
5. Datastore axis: a quarter, a half and all of the tenth, at ``--datastore_blocks`` blocks and
   ``--datastore_epochs`` epochs (same schedule as the grid; "all" is the grid's point).
6. What the constant rate costs: for the first size, one run per ``--decay_epochs`` length with the trainer's
   default schedule (linear decay to 0 after the warm-up), measured like the grid's point of that length.

Order: the first size's grid, the base and its continued pretraining, the decay check, the other sizes, the
datastore axis (``--memory_blocks`` says which size is first).

Each finished point (with the machine, the load average at its start and end, torch threads, wall time) is
added to ``--results``.json atomically and skipped on a rerun; memory training resumes from its checkpoints.
A second run on the same ``--out`` is refused (a lock). The JSON, a Markdown table and a PNG are rewritten
after every point (`benchmarks.scaling_report`), so partial results are readable while it runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate_joint  # noqa: E402
import train_base  # noqa: E402
import train_mlpmem_offline  # noqa: E402
from benchmarks.scaling_report import write_report  # noqa: E402
from knn_utils import build_index, saveKNNMulti  # noqa: E402
from models import build_memory  # noqa: E402
from models.memory_directory import save_memory  # noqa: E402
from models.training.arguments import MemoryTrainingArguments  # noqa: E402
from models.training.checkpoints import Schedule, checkpoint_dirs  # noqa: E402
from utils import preprocess_dataset  # noqa: E402
from utils.artifacts.datastore import DatastoreWriter, open_datastore  # noqa: E402
from utils.cli import UsageError, parse_args, run, setup_logging  # noqa: E402
from utils.environment import machine  # noqa: E402
from utils.io import atomic_directory, read_json, write_json  # noqa: E402
from utils.locking import artifact_lock  # noqa: E402

logger = logging.getLogger(__name__)
SHARED = REPO.parent / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2"


@dataclass
class ScalingArguments:
    """What the scaling benchmark runs, and where it writes."""

    out: str = field(default="outputs/scaling", metadata={"help": "Artifacts, memories and evaluations."})
    results: str = field(default="benchmarks/results/scaling",
                         metadata={"help": "Stem of the results: STEM.json (the points), STEM.md, STEM.png."})
    model_dir: str = field(default=str(SHARED / "smollm2-135m-instruct"), metadata={"help": "The base model."})
    gguf_file: str | None = field(default="SmolLM2-135M-Instruct.Q4_1.gguf",
                                  metadata={"help": "GGUF file inside --model_dir ('' for a Hugging Face directory)."})
    train_file: str = field(default=str(WIKITEXT / "wiki.train.tokens"), metadata={"help": "Training text."})
    validation_file: str = field(default=str(WIKITEXT / "wiki.valid.tokens"), metadata={"help": "Validation text."})
    test_file: str = field(default=str(WIKITEXT / "wiki.test.tokens"), metadata={"help": "Test text."})
    max_chars: int = field(default=1_000_000, metadata={"help": "First N characters of each split (a tenth of train)."})
    block_size: int = field(default=512, metadata={"help": "Window length (stride the same: every row one forward token)."})
    k: int = field(default=64, metadata={"help": "Neighbours of the kNN targets."})
    knn_temp: float = field(default=4.0, metadata={"help": "Temperature of the kNN targets' softmax over -distance."})
    memory_blocks: list[int] = field(default_factory=lambda: [4, 1, 8], metadata={
        "help": "Memory sizes (SwiGLU blocks; the head, 576 x 49,152, is shared by all). The first size runs "
                "first, then the base's continued pretraining and the decay check, then the other sizes, then the "
                "datastore axis.",
        "nargs": "+"})
    epochs: list[int] = field(default_factory=lambda: [1, 2, 4, 8],
                              metadata={"help": "Training lengths measured (epochs of one constant-rate run).", "nargs": "+"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Memory learning rate (constant after the warm-up)."})
    warmup_steps: int = field(default=100, metadata={"help": "Memory warm-up steps."})
    batch_size: int = field(default=512, metadata={"help": "Memory training rows per step."})
    loader_workers: int = field(default=1, metadata={"help": "--dataloader_num_workers of memory training."})
    cpt_epochs: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0], metadata={
        "help": "Lengths of the base's continued pretraining, in epochs of the tenth (0: none).", "nargs": "+"})
    cpt_learning_rate: float = field(default=5e-5, metadata={"help": "Continued pretraining learning rate."})
    cpt_batch: int = field(default=4, metadata={"help": "Windows per continued-pretraining micro-batch (2 accumulated)."})
    datastore_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0],
                                             metadata={"help": "Datastore sizes (fractions of its windows).", "nargs": "+"})
    datastore_blocks: int = field(default=4, metadata={"help": "Memory size of the datastore axis."})
    datastore_epochs: int = field(default=2, metadata={"help": "Training length of the datastore axis (in --epochs)."})
    decay_epochs: list[int] = field(default_factory=lambda: [1], metadata={
        "help": "Lengths trained again at the first size with a linear decay to 0 (one run each; none: no check), "
                "beside the grid's constant-rate point of that length.", "nargs": "*"})
    eval_windows: int = field(default=50, metadata={"help": "First N windows of validation and of test."})
    eval_batch: int = field(default=4, metadata={"help": "Windows per evaluation forward pass."})
    lmbdas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8],
                                metadata={"help": "Interpolation weights scored (chosen on validation).", "nargs": "+"})
    report_only: bool = field(default=False, metadata={"help": "Only rewrite the table and plot from STEM.json."})
    stop_after_points: int | None = field(default=None,
                                          metadata={"help": "Stop after this many new points (as a kill would; tests)."})

    def __post_init__(self):
        if self.gguf_file == "":
            self.gguf_file = None
        if any(e < 1 for e in self.epochs) or any(b < 1 for b in self.memory_blocks):
            raise UsageError("--epochs and --memory_blocks must be >= 1")
        if self.datastore_epochs not in self.epochs:
            raise UsageError(f"--datastore_epochs {self.datastore_epochs} must be one of --epochs {self.epochs}")
        if self.datastore_blocks not in self.memory_blocks:
            raise UsageError(f"--datastore_blocks {self.datastore_blocks} must be one of --memory_blocks {self.memory_blocks}")
        if any(e not in self.epochs for e in self.decay_epochs):
            raise UsageError(f"--decay_epochs {self.decay_epochs} must be among --epochs {self.epochs}")
        if any(not 0 < f <= 1 for f in self.datastore_fractions):
            raise UsageError("--datastore_fractions must be in (0, 1]")


class StopRequested(Exception):
    """--stop_after_points new points were added."""


class Points:
    """The results file: finished points by key, written atomically after each one, and the report beside it."""

    def __init__(self, args: ScalingArguments):
        self.args, self.path = args, Path(f"{args.results}.json")
        self.data = read_json(self.path) if self.path.exists() else {"points": {}}
        self.new = 0

    def done(self, key: str) -> bool:
        return key in self.data["points"]

    def get(self, key: str) -> dict:
        return self.data["points"][key]

    def add(self, key: str, point: dict) -> None:
        self.data["points"][key] = point
        self.save()
        logger.info("Point %s: %s", key, {k: v for k, v in point.items() if k not in ("machine", "validation", "test")})
        self.new += 1
        if self.args.stop_after_points is not None and self.new >= self.args.stop_after_points:
            raise StopRequested

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)
        write_report(self.data, Path(self.args.results))


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Measured:
    """Wall time and load average around a step, and what every point records about the machine."""

    def __enter__(self):
        self.start, self.load_start = time.perf_counter(), load_now()
        return self

    def __exit__(self, *exc):
        self.seconds, self.load_end = time.perf_counter() - self.start, load_now()

    def record(self) -> dict:
        return {"wall_seconds": round(self.seconds, 1), "load_start": self.load_start, "load_end": self.load_end,
                "torch_threads": torch.get_num_threads(), "finished": datetime.now().astimezone().isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------
# Artifacts


def model_flags(args: ScalingArguments) -> list[str]:
    return ["--model_name_or_path", args.model_dir, *(["--gguf_file", args.gguf_file] if args.gguf_file else [])]


def build_artifacts(args: ScalingArguments) -> None:
    out = Path(args.out)
    if not (out / "dataset" / "meta.json").exists():
        preprocess_dataset.main(["--tokenizer_path", args.model_dir, *(["--gguf_file", args.gguf_file] if args.gguf_file else []),
                                 "--train_file", args.train_file, "--validation_file", args.validation_file,
                                 "--test_file", args.test_file, "--max_chars", str(args.max_chars),
                                 "--block_size", str(args.block_size), "--stride", str(args.block_size),
                                 "--output_dir", str(out / "dataset")])
    if not (out / "dstore" / "meta.json").exists():
        train_base.main([*model_flags(args), "--dataset_name", str(out / "dataset"), "--do_eval", "--eval_subset", "train",
                         "--per_device_eval_batch_size", str(args.eval_batch), "--report_to", "none",
                         "--output_dir", str(out / "eval_base_train"), "--save_knnlm_dstore", "--dstore_dir",
                         str(out / "dstore")])
    index_and_targets(args, out / "dstore", out / "knn_targets")


def index_and_targets(args: ScalingArguments, dstore: Path, targets: Path) -> None:
    if not (dstore / "index" / "meta.json").exists():
        build_index.main(["--dstore_path", str(dstore), "--index_type", "flat"])
    if not (targets / "meta.json").exists():
        saveKNNMulti.main(["--dstore_path", str(dstore), "--output_path", str(targets), "--k", str(args.k),
                           "--knn_temp", str(args.knn_temp), "--ignore_first", "True"])


def datastore_prefix(args: ScalingArguments, fraction: float) -> tuple[Path, Path]:
    """The datastore of the first ``fraction`` of the train windows (copied from the full one) and its kNN targets."""
    out = Path(args.out)
    if fraction == 1.0:
        return out / "dstore", out / "knn_targets"
    name = f"{fraction:g}"
    dstore, targets = out / f"dstore_{name}", out / f"knn_targets_{name}"
    if not (dstore / "meta.json").exists():
        from accelerate import PartialState

        full = open_datastore(out / "dstore", "--out")
        windows = np.load(out / "dataset" / "train" / "windows.npy")  # (W, 4): begin, end, row_begin, row_end
        count = max(1, round(fraction * len(windows)))
        rows = int(windows[count - 1, 3] - windows[0, 2])
        keep = ("model", "torch_dtype", "model_fingerprint", "architecture", "layer", "tokenizer_fingerprint", "dataset")
        identity = {**{k: full.meta[k] for k in keep if k in full.meta},
                    "prefix_of": {"path": str(full.path.resolve()), "keys_sha256": full.meta["keys_sha256"],
                                  "windows": count}}
        writer = DatastoreWriter(str(dstore), rows, full.dim, count, identity, PartialState())
        for begin in range(0, count, 64):
            ids = np.arange(begin, min(begin + 64, count))
            span = np.arange(int(windows[ids[0], 2]), int(windows[ids[-1], 3]))
            writer.write(span, np.asarray(full.keys[span]), np.asarray(full.vals[span]), ids)
        writer.finish({"seconds_note": "copied from the full datastore"})
    index_and_targets(args, dstore, targets)
    return dstore, targets


# ---------------------------------------------------------------------------------------------------
# Memories


def steps_per_epoch(args: ScalingArguments, dstore: Path, run_dir: Path, targets: Path) -> int:
    rows = read_json(dstore / "meta.json")["rows"]
    held_out = MemoryTrainingArguments(output_dir=str(run_dir), knn_save_path=str(targets)).held_out_rows(rows)
    return Schedule(rows - held_out, args.batch_size, 1, 1, 1, None).steps_per_epoch


def train_argv(args: ScalingArguments, blocks: int, epochs: int, dstore: Path, targets: Path, run_dir: Path,
               schedule: str = "constant_with_warmup") -> list[str]:
    return ["--knn_dstore_path", str(dstore), "--knn_save_path", str(targets), "--output_dir", str(run_dir),
            "--num_layers", str(blocks), "--init_lm_head", "True", "--num_train_epochs", str(epochs),
            "--learning_rate", str(args.learning_rate), "--num_warmup_steps", str(args.warmup_steps),
            "--lr_scheduler_type", schedule, "--per_device_train_batch_size", str(args.batch_size),
            "--checkpointing_steps", "epoch", "--save_total_limit", "2", "--logging_steps", "10", "--disable_tqdm", "True",
            "--dataloader_num_workers", str(args.loader_workers)]


def snapshot(run_dir: Path, step: int, epoch: int) -> Path:
    """The weights of the run's checkpoint at ``step`` as a memory directory (meta.json last), for evaluate_joint."""
    target = run_dir.parent / f"{run_dir.name}_snapshots" / f"epoch_{epoch}"
    if target.exists():
        return target
    checkpoint = next((c for c in checkpoint_dirs(run_dir) if int(c.name.split("-")[-1]) == step), None)
    if checkpoint is None:
        raise RuntimeError(f"No checkpoint at step {step} in {run_dir} (epoch {epoch}); delete {run_dir} to retrain")
    from safetensors.torch import load_file
    from transformers import CONFIG_MAPPING

    identity = read_json(checkpoint / "trainer_state.json")["identity"]
    config = CONFIG_MAPPING[identity["memory"]["model_type"]].from_dict(identity["memory"])  # a registered memory config
    memory = build_memory(config)
    memory.load_state_dict(load_file(checkpoint / "model.safetensors"))
    with atomic_directory(target) as staging:
        save_memory(staging, memory, {"train_steps": step, "train_epochs": epoch},
                    {**identity["provenance"], "snapshot_of": {"checkpoint": str(checkpoint.resolve()), "step": step,
                                                               "settings": identity["settings"]}})
    return target


def run_records(run_dir: Path, kind: str) -> list[dict]:
    """The ``kind`` ("train", "validation") records of a memory run's metrics.jsonl (none when it is missing)."""
    import json

    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("type") == kind] if path.exists() else []


def held_out(run_dir: Path, step: int) -> dict | None:
    """The run's own validation at ``step`` (metrics.jsonl): the memory on the datastore's last rows, which it does
    not train on (KL to their kNN targets, perplexity of their gold tokens, top-1 agreement with the targets)."""
    records = [r for r in run_records(run_dir, "validation") if r["step"] == step]
    if not records:
        return None
    r = records[-1]
    return {"kl": r["val_kl"], "perplexity": r["val_ppl"], "top1_agreement": r["val_top1_agreement"], "rows": r["val_rows"]}


def run_of(args: ScalingArguments, memory_dir: str) -> Path:
    """The training run a point's memory came from: the run's own directory or its ``RUN_snapshots/epoch_E``
    (found under ``--out``/memories, so that a results file written from another working directory still maps)."""
    parts = Path(memory_dir).parts
    path = Path(args.out, "memories", *parts[parts.index("memories") + 1:]) if "memories" in parts else Path(memory_dir)
    return path.parent.with_name(path.parent.name.removesuffix("_snapshots")) if path.parent.name.endswith("_snapshots") else path


def add_held_out(args: ScalingArguments, points: Points) -> None:
    """Points made before they recorded the held-out rows get them from their run's metrics (once)."""
    changed = False
    for point in points.data["points"].values():
        if "memory_dir" in point and "held_out" not in point:
            point["held_out"] = held_out(run_of(args, point["memory_dir"]), point["steps"])
            changed = True
    if changed:
        points.save()


def train_rate(run_dir: Path, first: int, last: int) -> float | None:
    """Mean training rows/s of steps (first, last], from the run's metrics.jsonl (resumed segments included)."""
    rates = [r["rows_per_second"] for r in run_records(run_dir, "train") if first < r["step"] <= last]
    return round(float(np.mean(rates)), 1) if rates else None


def memory_run(args: ScalingArguments, points: Points, key: str, blocks: int, epochs: list[int], dstore: Path,
               targets: Path, run_dir: Path, extra: dict, schedule: str = "constant_with_warmup") -> None:
    """One run of ``max(epochs)`` epochs; a point for each of ``epochs`` (checkpoints of the run: meaningful as
    shorter runs with the constant schedule only)."""
    spe = steps_per_epoch(args, dstore, run_dir, targets)
    argv = train_argv(args, blocks, max(epochs), dstore, targets, run_dir, schedule)
    previous = 0
    for epoch in sorted(epochs):
        point_key = f"{key}/epochs_{epoch}"
        if points.done(point_key):
            previous = epoch
            continue
        step = epoch * spe
        with Measured() as train_time:
            if epoch == max(epochs):
                if not (run_dir / "meta.json").exists():
                    train_mlpmem_offline.main(argv)
                memory_dir = run_dir
            else:
                newest = checkpoint_dirs(run_dir)
                if not newest or int(newest[-1].name.split("-")[-1]) < step:
                    train_mlpmem_offline.main(argv, stop_after_steps=step)
                memory_dir = snapshot(run_dir, step, epoch)
        rate = train_rate(run_dir, previous * spe, step)
        config = read_json(memory_dir / "config.json")
        parameters = read_json(memory_dir / "meta.json")["memory"]["parameters"]
        with Measured() as eval_time:
            evaluation = evaluate(args, memory_dir, run_dir.parent / f"{run_dir.name}_eval" / f"epoch_{epoch}")
        rows = epoch * spe * args.batch_size  # rows seen (the last step of an epoch may be short: an upper bound)
        points.add(point_key, {
            "kind": key.split("/")[0], "blocks": blocks, "intermediate_size": config["intermediate_size"],
            "parameters": parameters, "epochs": epoch, "steps": step, "datastore_rows": read_json(dstore / "meta.json")["rows"],
            "train_flops": 6 * parameters * rows, "train_rows_per_second": rate, "lr_scheduler": schedule,
            "train_seconds_this_segment": round(train_time.seconds, 1), "train_load": [train_time.load_start, train_time.load_end],
            "memory_dir": str(memory_dir), "held_out": held_out(run_dir, step), **extra, **evaluation,
            **eval_time.record(), "machine": machine()})
        previous = epoch


def evaluate(args: ScalingArguments, memory_dir: Path, eval_dir: Path) -> dict:
    """evaluate_joint on validation and test; lmbda chosen on validation."""
    results = {}
    for split in ("validation", "test"):
        results[split] = evaluate_joint.main([
            *model_flags(args), "--dataset_name", str(Path(args.out) / "dataset"), "--dataset_split_name", split,
            "--max_eval_samples", str(args.eval_windows), "--per_device_eval_batch_size", str(args.eval_batch),
            "--output_dir", str(eval_dir / split), "--lmbda", *map(str, args.lmbdas),
            "--knn_generator_path", str(memory_dir), "--report_to", "none"])
    best = min(results["validation"]["lmbda_sweep"], key=lambda e: e["perplexity"])
    test_joint = next(e["perplexity"] for e in results["test"]["lmbda_sweep"] if e["lmbda"] == best["lmbda"])
    keep = ("base_perplexity", "memory_perplexity", "eval_tokens", "eval_windows", "base_tokens_per_second",
            "joint_tokens_per_second")
    return {"lmbda": best["lmbda"], "validation_joint_perplexity": best["perplexity"], "test_joint_perplexity": test_joint,
            "validation_memory_perplexity": results["validation"]["memory_perplexity"],
            "test_memory_perplexity": results["test"]["memory_perplexity"],
            "validation_base_perplexity": results["validation"]["base_perplexity"],
            "test_base_perplexity": results["test"]["base_perplexity"],
            "validation": {k: results["validation"][k] for k in keep} | {"lmbda_sweep": results["validation"]["lmbda_sweep"]},
            "test": {k: results["test"][k] for k in keep} | {"lmbda_sweep": results["test"]["lmbda_sweep"]}}


# ---------------------------------------------------------------------------------------------------
# The base: as is, and continued pretraining


def base_eval(args: ScalingArguments, model: list[str], out: Path) -> dict:
    """train_base --do_eval on the evaluation windows of validation and test."""
    found = {}
    for split in ("validation", "test"):
        metrics = train_base.main([*model, "--dataset_name", str(Path(args.out) / "dataset"), "--do_eval", "--eval_subset",
                                   split, "--max_eval_samples", str(args.eval_windows), "--per_device_eval_batch_size",
                                   str(args.eval_batch), "--report_to", "none", "--output_dir", str(out / f"eval_{split}")])
        found[f"{split}_perplexity"] = metrics["perplexity"]
        found[f"{split}_tokens"] = metrics["eval_tokens"]
    return found


def base_parameters(args: ScalingArguments) -> int:
    from utils.arguments import ModelArguments
    from utils.artifacts.dataset import load_split
    from utils.modeling import load_model_for_dataset

    dataset = Path(args.out) / "dataset"
    model, _ = load_model_for_dataset(ModelArguments(model_name_or_path=args.model_dir, gguf_file=args.gguf_file),
                                      load_split(str(dataset), "validation").meta, str(dataset))
    return sum(p.numel() for p in model.parameters())


def base_points(args: ScalingArguments, points: Points) -> None:
    out = Path(args.out) / "base_cpt"
    parameters = points.data.setdefault("setup", {}).get("base_parameters") or base_parameters(args)
    points.data["setup"]["base_parameters"] = parameters
    if not points.done("base/steps_0"):
        with Measured() as timing:
            found = base_eval(args, model_flags(args), out / "steps_0")
        points.add("base/steps_0", {"kind": "base", "steps": 0, "epochs": 0.0, "train_flops": 0, "parameters": parameters,
                                    **found, **timing.record(), "machine": machine()})
    windows = len(np.load(Path(args.out) / "dataset" / "train" / "windows.npy"))
    per_step = args.cpt_batch * 2  # windows per optimizer step (2 accumulated micro-batches)
    spe = windows / per_step
    previous, previous_steps = None, 0
    for epochs in sorted(e for e in args.cpt_epochs if e > 0):
        steps = max(1, round(epochs * spe))
        run_dir = out / f"steps_{steps}"
        if not points.done(f"base/steps_{steps}"):
            with Measured() as timing:
                if not (run_dir / "train_results.json").exists():
                    resume = ["--resume_from_checkpoint", str(previous / f"checkpoint-{previous_steps}")] if previous else []
                    train_base.main([*model_flags(args), "--dataset_name", str(Path(args.out) / "dataset"), "--do_train",
                                     "--max_steps", str(steps), "--per_device_train_batch_size", str(args.cpt_batch),
                                     "--gradient_accumulation_steps", "2", "--learning_rate", str(args.cpt_learning_rate),
                                     "--warmup_steps", "5", "--lr_scheduler_type", "constant_with_warmup",
                                     "--weight_decay", "0.0", "--save_strategy", "steps", "--save_steps", str(steps),
                                     "--logging_steps", "5", "--seed", "0", "--report_to", "none", "--disable_tqdm", "true",
                                     "--output_dir", str(run_dir), *resume])
                found = base_eval(args, ["--model_name_or_path", str(run_dir)], run_dir)
            trained = read_json(run_dir / "train_results.json")
            tokens = steps * per_step * args.block_size
            points.add(f"base/steps_{steps}", {
                "kind": "base", "steps": steps, "epochs": steps / spe, "train_tokens": tokens, "parameters": parameters,
                "train_flops": 6 * parameters * tokens, "train_runtime_this_segment": trained.get("train_runtime"),
                **found, **timing.record(), "machine": machine()})
        # Only the newest length's last checkpoint is resumed from. A resumed run keeps the first segment's
        # save_steps (transformers restores it from trainer_state.json), so it also leaves checkpoints part-way.
        for stale in [*(run_dir.glob("checkpoint-*")), *(previous.glob("checkpoint-*") if previous else [])]:
            if stale != run_dir / f"checkpoint-{steps}":
                shutil.rmtree(stale, ignore_errors=True)
        previous, previous_steps = run_dir, steps


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((ScalingArguments,), argv)
    setup_logging()
    if args.report_only:  # reads the JSON and rewrites the table and plot only: safe while a run adds points
        points = Points(args)
        write_report(points.data, Path(args.results))
        return points.data
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with artifact_lock(args.out, "--out"):
        points = Points(args)
        points.data["setup"] = {**points.data.get("setup", {}), "settings": {k: v for k, v in vars(args).items()
                                                                             if k not in ("report_only", "stop_after_points")},
                                "machine": machine(), "cores": os.cpu_count()}
        logger.info("Scaling benchmark: %s", points.data["setup"]["settings"])
        try:
            build_artifacts(args)
            add_held_out(args, points)
            first, *rest = args.memory_blocks
            grid = lambda blocks: memory_run(args, points, f"memory/blocks_{blocks}", blocks, args.epochs,  # noqa: E731
                                             Path(args.out) / "dstore", Path(args.out) / "knn_targets",
                                             Path(args.out) / "memories" / f"blocks_{blocks}", {"datastore_fraction": 1.0})
            grid(first)
            base_points(args, points)
            for epochs in args.decay_epochs:  # the same size and length with a linear decay: one run each
                memory_run(args, points, f"decay/blocks_{first}", first, [epochs], Path(args.out) / "dstore",
                           Path(args.out) / "knn_targets", Path(args.out) / "memories" / f"decay_{epochs}_blocks_{first}",
                           {"datastore_fraction": 1.0}, schedule="linear")
            for blocks in rest:
                grid(blocks)
            for fraction in args.datastore_fractions:
                if fraction < 1.0:
                    dstore, targets = datastore_prefix(args, fraction)
                    memory_run(args, points, f"datastore/fraction_{fraction:g}", args.datastore_blocks,
                               [args.datastore_epochs], dstore, targets,
                               Path(args.out) / "memories" / f"datastore_{fraction:g}_blocks_{args.datastore_blocks}",
                               {"datastore_fraction": fraction})
        except StopRequested:
            logger.info("Stopping after %d new points (--stop_after_points)", points.new)
        points.save()
    return points.data


if __name__ == "__main__":
    run(main)
