"""The dry run of a recipe: its stages, which are complete, and the rows, disk and time each will need.

No model is loaded and nothing is downloaded. Sizes come from the run's preprocessed dataset when it exists,
else the recipe's ``plan`` section (WikiText-103's token counts, a hub model's size), else the local text files
(about `CHARS_PER_TOKEN` characters a token); the base model's size from its local ``config.json`` (counted on
the meta device) or ``plan``. Costs per row and per token come from what `benchmarks/bench_scale.py` measured
(``benchmarks/results/bench_scale.json``: SmolLM2-135M keys of width 576 on its 2-core CPU, IVFPQ at k 1024) and
the H100 run it quotes (`benchmarks.scale_plan.H100`, docs/results.md), scaled as bench_scale scales them: by the
key width for writing, indexing and searching, by parameters for the forward passes and memory training, by
rows squared for an exact search. A dash is a cost nothing measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from scripts.runs import Run, field_default
from scripts.stages import Context
from utils.cli import UsageError
from utils.environment import machine
from utils.io import read_json

BENCH_SCALE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "bench_scale.json"
BENCH_REAL = BENCH_SCALE.with_name("real_smollm2_wikitext2.json")
CHARS_PER_TOKEN = 4.1  # SmolLM2's tokenizer on WikiText-2: 10^6 characters -> 244,345 tokens
SMOL_PARAMETERS, SMOL_WIDTH, SMOL_MEMORY = 134_515_008, 576, 33_621_696  # what bench_scale and the H100 run used
TRAINING_FLOPS = 3  # a training step costs about three forward passes (forward + backward)
PARALLEL_STAGES = ("datastore", "knn_targets", "memory", "memory_online", "eval_base", "knnlm", "eval_joint")


@dataclass
class Sizes:
    """What the costs scale with, and where each number came from."""

    tokens: dict[str, int]
    tokens_from: str
    parameters: int | None
    width: int | None
    memory_parameters: int | None
    model_from: str


def _local_model_size(model: str | None) -> tuple[int | None, int | None]:
    """Parameters and width of a local model directory's config (instantiated on the meta device: no weights)."""
    if not model or not os.path.isfile(os.path.join(model, "config.json")):
        return None, None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters(), config.hidden_size


def sizes(ctx: Context) -> Sizes:
    plan = ctx.expanded("plan")
    dataset_meta = Path(ctx.dataset) / "meta.json"
    if dataset_meta.is_file():
        splits = read_json(dataset_meta)["splits"]
        tokens, tokens_from = {split: s["tokens"] for split, s in splits.items()}, f"the dataset ({ctx.dataset})"
    elif all(f"{split}_tokens" in plan for split in ("train", "validation", "test")):
        tokens = {split: int(plan[f"{split}_tokens"]) for split in ("train", "validation", "test")}
        tokens_from = "the recipe's plan"
    else:
        section, tokens = ctx.expanded("preprocess"), {}
        for split in ("train", "validation", "test"):
            path = section.get(f"{split}_file")
            if path and os.path.isfile(path):
                chars = os.path.getsize(path) if not section.get("max_chars") else min(section["max_chars"],
                                                                                     os.path.getsize(path))
                tokens[split] = int(chars / CHARS_PER_TOKEN)
        tokens_from = f"the text files' sizes (about {CHARS_PER_TOKEN} characters a token)" if tokens else "nowhere"
    parameters, width = plan.get("parameters"), plan.get("hidden_size")
    model_from = "the recipe's plan"
    if parameters is None or width is None:
        parameters, width = _local_model_size(ctx.shared["model"])
        model_from = (f"{ctx.shared['model']}/config.json" if parameters
                      else "nowhere (set plan.parameters, plan.hidden_size)")
    trained = ctx.expanded("memory_online" if "memory_online" in ctx.stages else "memory")
    memory = plan.get("memory_parameters") or (parameters if not trained.get("num_layers") else None)
    return Sizes(tokens, tokens_from, parameters, width, memory, model_from)


def _eval_tokens(ctx: Context, sz: Sizes, split: str) -> int | None:
    tokens = sz.tokens.get(split)
    windows = ctx.shared["eval_windows"]
    if tokens is None or windows is None:
        return tokens
    stride = ctx.expanded("preprocess").get("stride",
                                            field_default("utils.preprocess_dataset:PreprocessArguments", "stride"))
    return min(tokens, windows * stride)


def predict(fit: tuple[float, float], size: float) -> float:
    from benchmarks.scale_plan import predict as bench_predict  # the extrapolation bench_scale itself uses

    return bench_predict(fit, size)


class Costs:
    """Seconds per unit of work on bench_scale's CPU and on one H100, for one recipe's sizes."""

    def __init__(self, sz: Sizes):
        if not BENCH_SCALE.is_file() or not BENCH_REAL.is_file():
            raise UsageError(f"--dry_run reads the measured costs in {BENCH_SCALE.parent} (bench_scale.json, "
                             "real_smollm2_wikitext2.json): run it from a checkout of the repository")
        from benchmarks.scale_plan import H100  # the H100 run's figures, as bench_scale extrapolates them

        scale = read_json(BENCH_SCALE)
        self.h100 = H100
        self.plan, self.last = scale["plan"], scale["sizes"][-1]
        self.fits = {name: (fit["a"], fit["b"]) for name, fit in self.plan["fits"].items()}
        self.machine = scale["machine"]
        flat = [c for c in read_json(BENCH_REAL)["curve"] if c["index"] == "flat" and not c["synthetic"]][-1]
        self.flat_cpu = flat["knn_seconds"] / flat["tokens"] / (flat["rows"] * SMOL_WIDTH)  # s per query-row-dim
        self.sz = sz
        self.width = (sz.width or SMOL_WIDTH) / SMOL_WIDTH
        self.params = (sz.parameters or SMOL_PARAMETERS) / SMOL_PARAMETERS
        self.memory = (sz.memory_parameters or SMOL_MEMORY) / SMOL_MEMORY

    def forward(self, tokens: float) -> tuple[float, float]:
        return (tokens * self.plan["base_seconds_per_token"] * self.params,
                tokens * self.h100["write_seconds"] / self.h100["rows"] * self.params)

    def write(self, rows: float) -> float:
        return rows / predict(self.fits["write_rows_per_second"], rows) * self.width

    def search(self, queries: float, rows: float, index: str) -> tuple[float, float | None]:
        """kNN targets: every datastore row searched (CPU: IVFPQ fit or exact; H100: exact torch, an upper bound)."""
        h100 = self.h100
        gpu = h100["exact_targets_seconds"] * (queries / h100["rows"]) * (rows / h100["rows"]) * self.width
        if index == "flat":
            return queries * rows * (self.sz.width or SMOL_WIDTH) * self.flat_cpu, gpu
        from benchmarks.scale_plan import exact_search_seconds

        return queries * exact_search_seconds(self.fits, self.plan.get("disk_rerank"), rows) * self.width, gpu

    def knnlm(self, tokens: float, rows: float, index: str) -> tuple[float, float | None]:
        per_token = (rows * (self.sz.width or SMOL_WIDTH) * self.flat_cpu if index == "flat"
                     else predict(self.fits["knn_search_seconds_per_token"], rows) * self.width)
        gpu = (tokens / self.h100["knnlm_exact_gpu_tokens_per_second"] * rows / self.h100["rows"] * self.width
               if index == "flat" else None)
        return self.forward(tokens)[0] + tokens * per_token, gpu

    def train_memory(self, rows: float) -> tuple[float, float]:
        return (rows / predict(self.fits["train_rows_per_second"], rows) * self.memory,
                rows / self.h100["train_rows_per_second"] * self.memory)

    def joint(self, tokens: float) -> tuple[float, float]:
        cpu = tokens * (self.plan["base_seconds_per_token"] * self.params +
                        self.plan["memory_seconds_per_token"] * self.memory)
        both = ((self.sz.parameters or SMOL_PARAMETERS) + (self.sz.memory_parameters or SMOL_MEMORY)) / \
            (SMOL_PARAMETERS + SMOL_MEMORY)
        return cpu, tokens / self.h100["memory_tokens_per_second"] * both


def _index_type(ctx: Context, rows: int) -> str:
    index = ctx.expanded("index")
    kind = index.get("index_type", "auto")
    if kind == "auto":  # knn_utils.index_build: flat below MIN_POINTS_PER_CENTROID keys per list
        from knn_utils.index_build import MIN_POINTS_PER_CENTROID

        kind = "flat" if rows < MIN_POINTS_PER_CENTROID * index.get("ncentroids", 4096) else "ivfpq"
    return kind


def run_cost(run: Run, ctx: Context, sz: Sizes, costs: Costs) -> tuple[str, float | None, float | None, float | None]:
    """(rows, disk bytes, CPU seconds, one-H100 seconds) of one run; None where nothing measured it."""
    rows = sz.tokens.get("train")
    d = sz.width or SMOL_WIDTH
    settings, stage = run.settings, run.stage
    if stage in ("eval_base", "knnlm", "eval_joint"):
        split = settings.get("eval_subset") or settings.get("dataset_split_name")
        tokens = _eval_tokens(ctx, sz, split)
        if tokens is None:
            return "?", None, None, None
        if stage == "eval_base":
            return f"{tokens:,} tokens", 0, *costs.forward(tokens)
        if stage == "knnlm":
            return f"{tokens:,} tokens", 0, *costs.knnlm(tokens, rows or 0, _index_type(ctx, rows or 0))
        return f"{tokens:,} tokens", 0, *costs.joint(tokens)
    if stage == "download":  # float32 weights
        is_base = settings["repo_id"] == ctx.expanded("download").get("base_model")
        count = sz.parameters if is_base else sz.memory_parameters
        return "-", 4 * count if count else None, None, None
    if stage == "convert":
        return "-", 4 * (sz.memory_parameters or 0) or None, None, None
    if rows is None:
        return "?", None, None, None
    if stage == "preprocess":
        return f"{sum(sz.tokens.values()):,} tokens", 4 * sum(sz.tokens.values()), None, None
    if stage == "train_base":
        epochs = float(settings.get("num_train_epochs", field_default("transformers:TrainingArguments",
                                                                      "num_train_epochs")))
        cpu, gpu = costs.forward(rows * epochs * TRAINING_FLOPS)
        return f"{rows:,} tokens x {epochs:g} epochs", 4 * (sz.parameters or 0) or None, cpu, gpu
    if stage == "datastore":
        cpu, gpu = costs.forward(rows)
        return f"{rows:,} rows", rows * (2 * d + 4), cpu + costs.write(rows), gpu
    if stage == "index":
        kind = _index_type(ctx, rows)
        if kind == "flat":
            return f"{rows:,} rows, flat", rows * d * 4, costs.write(rows), None
        index = ctx.expanded("index")
        code = index.get("code_size", field_default("knn_utils.index_build:IndexSettings", "code_size"))
        lists = index.get("ncentroids", field_default("knn_utils.index_build:IndexSettings", "ncentroids"))
        train = costs.last["stages"]["index"]["train_seconds"] * costs.width
        cpu = train + rows / predict(costs.fits["add_rows_per_second"], rows) * costs.width
        return f"{rows:,} rows, IVFPQ {lists} lists x {code} B", rows * (code + 8) + lists * d * 4, cpu, None
    if stage == "knn_targets":
        k = settings.get("k", 1024)
        nnz = costs.last["stages"]["targets"]["nnz"] / costs.last["rows"] * min(1.0, k / 1024)
        cpu, gpu = costs.search(rows, rows, _index_type(ctx, rows))
        return f"{rows:,} queries, k {k}", rows * (12 + nnz * 6), cpu, gpu
    if stage in ("memory", "memory_online"):
        default = field_default("models.training.arguments:MemoryTrainingArguments", "num_train_epochs")
        epochs = float(settings.get("num_train_epochs", default))
        cpu, gpu = costs.train_memory(rows * epochs)
        work = f"{rows:,} rows x {epochs:g} epochs"
        if stage == "memory_online":  # and the base's forward over every row of every epoch
            forward_cpu, forward_gpu = costs.forward(rows * epochs)
            cpu, gpu, work = cpu + forward_cpu, gpu + forward_gpu, work + ", base forward each"
        return work, 16 * (sz.memory_parameters or 0) or None, cpu, gpu
    return "-", None, None, None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float | None, upper_bound: bool = False) -> str:
    if s is None:
        return "-"
    mark = "<= " if upper_bound else ""
    if s < 60:
        return f"{mark}{s:.0f} s"
    if s < 3600:
        return f"{mark}{s / 60:.1f} min"
    return f"{mark}{s / 3600:,.1f} h"


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


LABELS = {"done": "done", "run": "to run", "remake": "to remake", "refused": "refused without --rebuild",
          "pending": "after the choice it reads"}


def dry_run(ctx: Context, decisions: Iterable[tuple[Run, str, list[str]]]) -> str:
    """The plan of a recipe as text: a Markdown table, then where each number came from."""
    sz = sizes(ctx)
    costs = Costs(sz)
    nproc = max([ctx.nproc(stage) for stage in ctx.stages
                 if stage in ("datastore", "knn_targets", "memory", "memory_online")] or [1])
    rows_index = sz.tokens.get("train") or 0
    header = ["run", "status", "work", "disk", f"{costs.machine['cores']}-core CPU", "one H100"]
    header += [f"{nproc} H100"] if nproc > 1 else []
    lines = [f"Dry run of {ctx.recipe.path} into {ctx.layout.out}: nothing is run, no model is loaded.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    totals = [0.0, 0.0, 0.0, 0.0]
    for stage in ctx.skipped:
        lines.append(f"| {stage} | not run (shared.{'dataset' if stage == 'preprocess' else 'knn_targets'} given) |"
                     + " |" * (len(header) - 2))
    pending = False
    for run, action, reasons in decisions:
        stage, pending = run.stage, pending or action == "pending"
        label = LABELS[action] + (": " + "; ".join(reasons) if reasons else "")
        work, disk, cpu, gpu = run_cost(run, ctx, sz, costs)
        upper = stage == "knn_targets" and _index_type(ctx, rows_index) != "flat"
        parallel = ctx.nproc(stage, shared=stage in ("datastore", "knn_targets", "memory", "memory_online")) \
            if stage in PARALLEL_STAGES else 1
        if action != "done":
            totals = [t + (v or 0) for t, v in zip(totals, (disk, cpu, gpu, (gpu or 0) / parallel))]
        row = [run.name, label, work, human_bytes(disk), human_seconds(cpu), human_seconds(gpu, upper)]
        if nproc > 1:
            row.append(human_seconds(None if gpu is None else gpu / parallel, upper))
        lines.append("| " + " | ".join(row) + " |")
    total = ["total still to run", "", "", human_bytes(totals[0]), human_seconds(totals[1]), human_seconds(totals[2])]
    lines.append("| " + " | ".join(total + ([human_seconds(totals[3])] if nproc > 1 else [])) + " |")
    here = machine()
    counts = ", ".join(f"{split} {n:,}" for split, n in sz.tokens.items()) or "unknown"
    lines += ["", f"Tokens: {counts} (from {sz.tokens_from}).",
              f"Base model: {_count(sz.parameters)} parameters, width {sz.width or '?'} (from {sz.model_from}); "
              f"memory: {_count(sz.memory_parameters)} parameters.",
              f"CPU costs: bench_scale's {costs.machine['cores']}-core {costs.machine['cpu']} "
              f"(this machine: {here['cores']} cores, {here['cpu']}, GPU {here['gpu'] or 'none'}); "
              "H100: the run of docs/results.md, scaled.",
              "'<=': IVFPQ on a GPU was never measured; the exact search's cost bounds it. '-': not measured "
              "(downloads, QA and judgments, the demo).", "Shared values: " + ", ".join(
                  f"{k}={v}" for k, v in ctx.shared.items() if v is not None and k not in ("model", "tokenizer")) + "."]
    if pending:
        lines.append("'after the choice it reads': its lmbda is the one an earlier run chooses on validation and "
                     "records.")
    return "\n".join(lines)
