"""What only a GPU can tell us, in one run of under 8 minutes on one H100 (issue 23, item 3).

    python -m benchmarks.gpu_run --dry_run --out outputs/gpu_dry    # any machine: the plan, then every stage, tiny
    python -m benchmarks.gpu_run --out outputs/gpu_run              # one GPU: the plan, then every stage, full size

SmolLM2-135M-Instruct (``--model``, GGUF) on all of WikiText-2 train (``--data``), stage after stage (`STAGES`):

1. ``environment``: the GPU (its name from torch), the libraries, whether FAISS can use the GPU.
2. ``preprocess``: ``utils.preprocess_dataset``, 512-token windows, no overlap (every train token a datastore row).
3. ``finetune``: ``train_base --do_train`` from the GGUF checkpoint, on the first ``finetune_windows`` windows.
4. ``datastore``: ``train_base --save_knnlm_dstore`` with the fine-tuned model over all of train.
5. ``index``: ``knn_utils.build_index``, IVFPQ: 4096 lists, 48 sub-quantizers of 8 bits (576 / 48 = 12 dimensions
   each: FAISS-GPU's IVFPQ takes 12 but not 9, so the paper's 64 does not fit SmolLM2's width), on the GPU.
   Where FAISS has no GPU (pip's faiss-cpu: the lent machines, benchmarks/gpu/README.md), an exact index instead.
6. ``knn_targets``: ``knn_utils.saveKNNMulti`` on the GPU, k 1024, ``nprobe`` 32, the query's own row left out,
   FAISS's own (PQ) distances (``--recompute_dists False``: the exact re-ranking runs on the CPU); the neighbours
   ordered and the targets built on the GPU (`knn_utils.torch_targets`). The exact fallback searches in torch.
7. ``reranking``: the exact ranking (issue 25) on the search's device, against FAISS's and the CPU kernel's
   (`benchmarks.gpu_rerank`).
8. ``memory``: ``train_mlpmem_offline`` on the fine-tuned model's keys and those targets, ``memory_epochs`` (> 1)
   epochs, bf16: 2 SwiGLU blocks with the base's head and norm, as in docs/results.md.
9. ``finetuned_gain``: ``evaluate_joint`` of the fine-tuned base with and without the memory on the first
   ``eval_windows`` validation and test windows; ``lmbda`` chosen on validation, the gain reported on test.
10. ``large_throughput``: the ``large`` memory preset (GPT2-large width, 54 blocks, 772.6M parameters) trained in
   bf16 autocast (AdamW, the project's loss on sparse targets) on random inputs: rows/s, and
   6 x (matrix parameters) FLOPs a row as a share of the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`).

Each stage has a plan (rows, steps and the seconds expected from the rates measured on an H100 in
docs/results.md, `RATES`, or an estimate where nothing was measured) and a run. ``--dry_run`` prints and records
the full-size plan, then runs every stage's code path on a tiny slice on the CPU (the embedded corpus, a 2-layer
model trained from scratch, 16-list index, k 16, a `tiny` stand-in for the large preset), so that the test suite
checks the stages and their sizes without a GPU (tests/benchmarks/test_gpu_run.py). A stage whose output is
complete is skipped, so an interrupted run resumes. Results: ``NAME.json`` and ``NAME.md`` in ``--results_dir``
(``benchmarks/results`` for a real run, ``--out`` for a dry one). To add a GPU check, append a `Stage` to `STAGES`:
a name, what it measures, its plan at both sizes and its run.

On this workplace's lent GPU machine (no network; 64 MiB travel with each call) see benchmarks/gpu/README.md for
the carried files and the one command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.gpu_rerank import RERANK_RATES, rerank_plan, rerank_summary, run_reranking  # noqa: E402
from benchmarks.memory_throughput import measure_throughput, memory_params  # noqa: E402
from utils.cli import UsageError, run, setup_logging  # noqa: E402
from utils.io import read_json, write_json  # noqa: E402

logger = logging.getLogger(__name__)

SHARED = REPO.parent / "shared" / "data"
BUDGET_SECONDS = 480  # 8 minutes on one H100
# Rates measured on one H100 with 16 CPU cores (docs/results.md, "All of WikiText-2 train on one H100"), and what
# nothing measured yet (estimates, marked so): (value, unit, source).
RATES = {
    "gguf_load_seconds": (25.0, "s", "estimate: the GGUF dequantised (20 s on 2 cores, shared/data/README.md)"),
    "load_seconds": (3.0, "s", "estimate: a 135M model from safetensors, to the GPU"),
    "preprocess_tokens_per_second": (150_000.0, "tokens/s", "estimate: the fast tokenizer over 2.6M tokens"),
    "finetune_windows_per_second": (5_053 / 157, "windows/s", "H100: 5,053 windows of 512 in 157 s (float32)"),
    "datastore_rows_per_second": (2_581_967 / 87, "rows/s", "H100: 2,581,967 rows in 87 s"),
    "index_seconds": (45.0, "s", "estimate: FAISS-GPU k-means on 1M keys, encoding 2.6M"),
    "search_queries_per_second": (40_000.0, "queries/s", "estimate: FAISS-GPU IVFPQ, k 1024, nprobe 32"),
    "exact_search_queries_per_second": (2_581_967 / 161, "queries/s", "H100: exact torch search with the targets on "
                                        "the CPU, k 64, in 161 s (the fallback when FAISS has no GPU; k 1024 unmeasured)"),
    "targets_rows_per_second": (200_000.0, "rows/s", "estimate: knn_utils.torch_targets on the GPU; on one CPU core "
                                "the NumPy path makes 2,285 rows/s at k 1024 (a loaded 2-core EPYC), 1,130 s for all"),
    **RERANK_RATES,
    "memory_rows_per_second": (2_581_967 / 43, "rows/s", "H100: an epoch of 2,581,967 rows in 43 s (2 SwiGLU blocks)"),
    "joint_tokens_per_second": (65_072.0, "tokens/s", "H100: fine-tuned base + memory, evaluate_joint"),
}


@dataclass(frozen=True)
class RunSizes:
    """Everything that sizes the run; `full` for the GPU, `dry` for a CPU check of the code paths."""

    block: int = 512
    train_tokens: int = 2_581_968  # for the plan: WikiText-2 train under SmolLM2's tokenizer (docs/results.md)
    finetune_windows: int = 1_280  # a quarter of an epoch: what the budget leaves
    finetune_batch: int = 16
    ncentroids: int = 4096
    code_size: int = 48
    train_size: int = 1_000_000
    probe: int = 32
    k: int = 1024
    knn_temp: float = 4.0
    search_batch: int = 16_000
    rerank_queries: int = 16_384
    rerank_batch: int = 4_096
    rerank_cpu_queries: int = 256
    rerank_repeats: int = 3
    memory_epochs: int = 3
    memory_batch: int = 512
    eval_windows: int = 50
    lmbdas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    large_preset: str = "large"
    large_rows: int = 4096  # rows per step of the throughput stage
    large_steps: int = 20  # timed, after `large_warmup`
    large_warmup: int = 5

    @property
    def train_rows(self) -> int:
        return self.train_tokens - 1  # every token but the first is predicted once (utils/windows.py)

    @staticmethod
    def full() -> "RunSizes":
        return RunSizes()

    @staticmethod
    def dry() -> "RunSizes":
        return RunSizes(block=64, train_tokens=0, finetune_windows=16, finetune_batch=8, ncentroids=16,
                        code_size=8, train_size=4096, probe=4, k=16, search_batch=512, rerank_queries=256,
                        rerank_batch=64, rerank_cpu_queries=32, rerank_repeats=2, memory_epochs=2,
                        memory_batch=1024, eval_windows=2, lmbdas=(0.25, 0.5), large_preset="tiny", large_rows=32,
                        large_steps=2, large_warmup=1)


@dataclass
class Run:
    """One run: its sizes, where it writes, the base model and data, the device and what the stages found so far."""

    sizes: RunSizes
    out: Path
    dry_run: bool
    tokenizer: list[str]  # preprocess_dataset's flags naming the tokenizer
    base: list[str]  # train_base's flags naming the model to fine-tune (or, dry, to train from scratch)
    files: dict[str, str]  # split -> text file
    device: str
    search: str = "auto"  # index type: auto (`index_type`), ivfpq or flat
    results: dict = field(default_factory=dict)

    def path(self, name: str) -> str:
        return str(self.out / name)


@dataclass(frozen=True)
class Stage:
    """A named step: what it measures, its plan (rows, steps, expected seconds) and its run (results)."""

    name: str
    what: str
    plan: Callable[[RunSizes], dict]
    run: Callable[[Run], dict]


# ---------------------------------------------------------------------------------------------------------------
# Plans: sizes and expected seconds from RATES


def rate(name: str) -> float:
    return RATES[name][0]


def plan_environment(s: RunSizes) -> dict:
    return {"seconds": 2.0}


def plan_preprocess(s: RunSizes) -> dict:
    return {"tokens": s.train_tokens, "seconds": s.train_tokens / rate("preprocess_tokens_per_second")}


def plan_finetune(s: RunSizes) -> dict:
    steps = -(-s.finetune_windows // s.finetune_batch)
    return {"windows": s.finetune_windows, "steps": steps,
            "seconds": rate("gguf_load_seconds") + s.finetune_windows / rate("finetune_windows_per_second")}


def plan_datastore(s: RunSizes) -> dict:
    return {"rows": s.train_rows, "seconds": rate("load_seconds") + s.train_rows / rate("datastore_rows_per_second")}


def plan_index(s: RunSizes) -> dict:
    return {"rows": s.train_rows, "ncentroids": s.ncentroids, "code_size": s.code_size,
            "train_size": min(s.train_size, s.train_rows), "seconds": rate("index_seconds")}


def plan_targets(s: RunSizes) -> dict:
    search = s.train_rows / rate("search_queries_per_second")
    targets = s.train_rows / rate("targets_rows_per_second")
    return {"queries": s.train_rows, "k": s.k, "probe": s.probe, "batches": -(-s.train_rows // s.search_batch),
            "search_seconds": search, "targets_seconds": targets, "seconds": search + targets,
            "exact_search_seconds": s.train_rows / rate("exact_search_queries_per_second")}


def plan_memory(s: RunSizes) -> dict:
    return {"rows": s.train_rows, "epochs": s.memory_epochs, "steps": s.memory_epochs * -(-s.train_rows // s.memory_batch),
            "seconds": s.memory_epochs * s.train_rows / rate("memory_rows_per_second")}


def plan_gain(s: RunSizes) -> dict:
    tokens = 2 * s.eval_windows * s.block
    return {"windows": 2 * s.eval_windows, "lmbdas": list(s.lmbdas),
            "seconds": 2 * rate("load_seconds") + tokens / rate("joint_tokens_per_second")}


def plan_large(s: RunSizes) -> dict:
    return {"preset": s.large_preset, "rows_per_step": s.large_rows, "steps": s.large_warmup + s.large_steps,
            **memory_params(s.large_preset), "seconds": 30.0}


# ---------------------------------------------------------------------------------------------------------------
# Runs: the pipeline's own entry points, in this process


def done(path: str) -> bool:
    return Path(path).is_file()


def run_environment(r: Run) -> dict:
    import torch

    from knn_utils.faiss_devices import faiss_gpu_available
    from utils.environment import machine

    found = {"machine": machine(), "device": r.device, "faiss_gpu": faiss_gpu_available()}
    if r.device == "cuda" and not found["faiss_gpu"]:
        logger.warning("FAISS cannot use the GPU here (faiss-cpu): unless --search ivfpq, the index is exact and "
                       "searched by torch on the GPU (benchmarks/gpu/README.md)")
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def run_preprocess(r: Run) -> dict:
    from utils import preprocess_dataset

    if not done(r.path("dataset/meta.json")):
        preprocess_dataset.main(r.tokenizer + [f"--{split}_file={path}" for split, path in r.files.items()]
                                + ["--block_size", str(r.sizes.block), "--stride", str(r.sizes.block),
                                   "--output_dir", r.path("dataset")])
    meta = read_json(r.path("dataset/meta.json"))
    return {"tokens": {split: found["tokens"] for split, found in meta["splits"].items()}}


def bf16_flags(r: Run) -> list[str]:
    return ["--bf16", "True"] if r.device == "cuda" else []


def run_finetune(r: Run) -> dict:
    import train_base

    if not done(r.path("finetuned/train_results.json")):
        train_base.main(r.base + ["--dataset_name", r.path("dataset"), "--do_train", "--num_train_epochs", "1",
                                  "--max_train_samples", str(r.sizes.finetune_windows),
                                  "--per_device_train_batch_size", str(r.sizes.finetune_batch),
                                  "--learning_rate", "5e-5", "--lr_scheduler_type", "cosine", "--save_strategy", "no",
                                  "--logging_steps", "50", "--report_to", "none", "--disable_tqdm", "true",
                                  "--seed", "0", "--output_dir", r.path("finetuned"), *bf16_flags(r)])
    found = read_json(r.path("finetuned/train_results.json"))
    return {"seconds": found.get("train_runtime"), "loss": found.get("train_loss"),
            "windows_per_second": found.get("train_samples_per_second")}


def run_datastore(r: Run) -> dict:
    import train_base

    if not done(r.path("dstore/meta.json")):
        train_base.main(["--model_name_or_path", r.path("finetuned"), "--dataset_name", r.path("dataset"), "--do_eval",
                         "--eval_subset", "train", "--per_device_eval_batch_size", "16", "--report_to", "none",
                         "--output_dir", r.path("eval_train"), "--save_knnlm_dstore", "--dstore_dir", r.path("dstore")])
    meta = read_json(r.path("dstore/meta.json"))
    return {"rows": meta["rows"], "dim": meta["dim"], "seconds": meta.get("seconds")}


def index_type(r: Run) -> str:
    """IVFPQ where FAISS can search it on the GPU (and on a dry run's CPU); else exact, which `knn_utils.index_search`
    searches on the GPU with torch when FAISS has no GPU (faiss-cpu)."""
    from knn_utils.faiss_devices import faiss_gpu_available

    if r.search != "auto":
        return r.search
    return "ivfpq" if r.dry_run or faiss_gpu_available() else "flat"


def run_index(r: Run) -> dict:
    from knn_utils import build_index

    s = r.sizes
    if not done(r.path("dstore/index/meta.json")):
        build_index.main(["--dstore_path", r.path("dstore"), "--index_type", index_type(r),
                          "--ncentroids", str(s.ncentroids), "--code_size", str(s.code_size),
                          "--train_size", str(s.train_size), "--probe", str(s.probe), "--knn_gpu", str(r.device == "cuda")])
    meta = read_json(r.path("dstore/index/meta.json"))
    return {key: meta.get(key) for key in ("index_type", "rows", "built_on", "seconds", "index_bytes", "settings")}


def run_targets(r: Run) -> dict:
    from knn_utils import saveKNNMulti

    s = r.sizes
    if not done(r.path("knn_targets/meta.json")):
        saveKNNMulti.main(["--dstore_path", r.path("dstore"), "--output_path", r.path("knn_targets"), "--k", str(s.k),
                           "--knn_temp", str(s.knn_temp), "--probe", str(s.probe), "--ignore_first", "True",
                           "--recompute_dists", "False", "--batch_size", str(s.search_batch),
                           *(["--knn_gpu"] if r.device == "cuda" else [])])
    meta = read_json(r.path("knn_targets/meta.json"))
    return {"rows": meta["rows"], "k": meta["k"], "probe": meta["index"]["probe"], "seconds": meta["seconds"],
            "search_seconds": meta["search_seconds"], "entries_per_row": meta["mean_targets_per_row"]}


def run_memory(r: Run) -> dict:
    import train_mlpmem_offline

    from models.memory_directory import TRAINING_RESULTS

    s = r.sizes
    if not done(r.path(f"memory/{TRAINING_RESULTS}")):
        train_mlpmem_offline.main(["--knn_dstore_path", r.path("dstore"), "--knn_save_path", r.path("knn_targets"),
                                   "--output_dir", r.path("memory"), "--num_layers", "2", "--init_lm_head", "True",
                                   "--num_train_epochs", str(s.memory_epochs), "--learning_rate", "1e-3",
                                   "--num_warmup_steps", "100", "--per_device_train_batch_size", str(s.memory_batch),
                                   "--checkpointing_steps", "no", "--disable_tqdm", "true"])
    found = read_json(r.path(f"memory/{TRAINING_RESULTS}"))
    return {"epochs": s.memory_epochs, "steps": found["train_steps"], "seconds": found["train_seconds"],
            "validation_kl_to_knn": found["val_kl"], "validation_top1_agreement": found["val_top1_agreement"]}


def run_gain(r: Run) -> dict:
    import evaluate_joint

    found = {}
    for split in ("validation", "test"):
        if not done(r.path(f"eval_joint_{split}/joint_results.json")):
            evaluate_joint.main(["--model_name_or_path", r.path("finetuned"), "--dataset_name", r.path("dataset"),
                                 "--dataset_split_name", split, "--max_eval_samples", str(r.sizes.eval_windows),
                                 "--per_device_eval_batch_size", "16", "--knn_generator_path", r.path("memory"),
                                 "--knn_temp", "1", "--lmbda", *map(str, r.sizes.lmbdas), "--report_to", "none",
                                 "--output_dir", r.path(f"eval_joint_{split}")])
        found[split] = read_json(r.path(f"eval_joint_{split}/joint_results.json"))
    chosen = min(found["validation"]["lmbda_sweep"], key=lambda entry: (entry["perplexity"], entry["lmbda"]))["lmbda"]
    test = found["test"]
    joint = next(entry["perplexity"] for entry in test["lmbda_sweep"] if entry["lmbda"] == chosen)
    return {"lmbda": chosen, "tokens": test["eval_tokens"], "finetuned_base": test["base_perplexity"],
            "finetuned_base_plus_memory": joint, "memory_alone": test["memory_perplexity"],
            "gain_percent": 100.0 * (1.0 - joint / test["base_perplexity"]),
            "tokens_per_second": {"base": test["base_tokens_per_second"], "joint": test["joint_tokens_per_second"]}}


def run_large(r: Run) -> dict:
    s = r.sizes
    small = {"hidden_size": 64, "vocab_size": 512} if r.dry_run else {}
    return measure_throughput(s.large_preset, s.large_rows, s.large_steps, s.large_warmup, r.device, **small)


STAGES: list[Stage] = [
    Stage("environment", "GPU, libraries, whether FAISS sees the GPU", plan_environment, run_environment),
    Stage("preprocess", "WikiText-2 in 512-token windows", plan_preprocess, run_preprocess),
    Stage("finetune", "SmolLM2 fine-tuned on train windows", plan_finetune, run_finetune),
    Stage("datastore", "keys of every train row, fine-tuned model", plan_datastore, run_datastore),
    Stage("index", "FAISS IVFPQ over the keys", plan_index, run_index),
    Stage("knn_targets", "k 1024, nprobe 32 targets of every row", plan_targets, run_targets),
    Stage("reranking", "exact re-ranking on the search's device: rate, batch independence, CPU agreement",
          lambda s: rerank_plan(s, rate("search_queries_per_second")), run_reranking),
    Stage("memory", "the memory trained for several epochs", plan_memory, run_memory),
    Stage("finetuned_gain", "fine-tuned base vs fine-tuned base + memory", plan_gain, run_gain),
    Stage("large_throughput", "large preset training rows/s and share of bf16 peak", plan_large, run_large),
]


# ---------------------------------------------------------------------------------------------------------------
# The command line


def make_plan(sizes: RunSizes) -> dict:
    """Every stage's plan at ``sizes``, and the total expected seconds."""
    stages = {stage.name: stage.plan(sizes) for stage in STAGES}
    return {"stages": stages, "seconds": sum(p["seconds"] for p in stages.values()), "budget_seconds": BUDGET_SECONDS,
            "rates": {name: {"value": v, "unit": unit, "source": source} for name, (v, unit, source) in RATES.items()}}


def dry_inputs(out: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """The dry run's text files, tokenizer flags and base-model flags: the embedded corpus at a small size and a
    2-layer Llama of width 64 trained from scratch on it (no download, no shared data)."""
    from utils.embedded_corpus import write_corpus

    corpus = out / "corpus"
    write_corpus(corpus, seed=0, vocab_size=512, num_countries=2, num_cities=5, num_rivers=2, num_organisations=5,
                 num_people=10, qa_drills_per_fact=0)
    files = {split: str(corpus / f"{split}.txt") for split in ("train", "validation", "test")}
    tokenizer = str(corpus / "tokenizer")
    config = ("num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=4,"
              "max_position_embeddings=64,tie_word_embeddings=true")
    return files, ["--tokenizer_path", tokenizer], ["--model_type", "llama", "--tokenizer_name", tokenizer,
                                                    "--config_overrides", config, "--learning_rate", "2e-3"]


def full_inputs(model: str, gguf_file: str, data: str) -> tuple[dict[str, str], list[str], list[str]]:
    """The real run's WikiText-2 files and SmolLM2 flags; missing files are a one-line error."""
    files = {split: str(Path(data) / f"wiki.{name}.tokens") for split, name in
             (("train", "train"), ("validation", "valid"), ("test", "test"))}
    for path in [*files.values(), str(Path(model) / gguf_file)]:
        if not Path(path).is_file():
            raise UsageError(f"{path} is missing: give --model (with --gguf_file) and --data (WikiText-2's wiki.*.tokens)")
    flags = [model, "--gguf_file", gguf_file]
    return files, ["--tokenizer_path", *flags], ["--model_name_or_path", *flags]


def report(found: dict) -> str:
    """The plan against what each stage took, and the headline numbers, as Markdown."""
    plan = found["plan"]["stages"]
    kind = "plan" if not found["seconds"] else "dry run (CPU, tiny slice)" if found["dry_run"] else "full run"
    lines = [f"# {found['name']}: {kind}", "",
             f"Device: {found['device']} ({found.get('gpu') or 'no GPU'}); plan for the full run "
             f"{found['plan']['seconds']:.0f} s of {BUDGET_SECONDS} s.", "",
             "| stage | planned (full size) | seconds planned | seconds taken (this run) |", "|---|---|---:|---:|"]
    for name, planned in plan.items():
        sizes = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in planned.items()
                          if k not in ("seconds",) and not isinstance(v, float))
        taken = found["seconds"].get(name)
        lines.append(f"| {name} | {sizes} | {planned['seconds']:.0f} | {'-' if taken is None else f'{taken:.1f}'} |")
    if gain := found["stages"].get("finetuned_gain"):
        lines += ["", f"Fine-tuned base {gain['finetuned_base']:.2f} -> + memory {gain['finetuned_base_plus_memory']:.2f} "
                      f"(lmbda {gain['lmbda']:g}, chosen on validation): {gain['gain_percent']:.1f}% lower test perplexity "
                      f"over {gain['tokens']:,} tokens."]
    if rerank := found["stages"].get("reranking"):
        lines += ["", rerank_summary(rerank)]
    if large := found["stages"].get("large_throughput"):
        share = f"{100 * large['share_of_peak']:.1f}% of the {large['peak_bf16_tflops']:g} TFLOP/s bf16 peak" \
            if large["share_of_peak"] is not None else "no known peak for this device"
        lines += ["", f"Memory preset `{large['preset']}` ({large['parameters'] / 1e6:.1f}M parameters): "
                      f"{large['rows_per_second']:,.0f} rows/s, {large['achieved_tflops']:.1f} TFLOP/s, {share}."]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/gpu_run", help="Work directory (each stage's artifacts).")
    parser.add_argument("--dry_run", action="store_true", help="Every stage on a tiny slice, on the CPU.")
    parser.add_argument("--plan_only", action="store_true", help="Print the full-size plan and stop.")
    parser.add_argument("--model", default=str(SHARED / "smollm2-135m-instruct"), help="Base model directory.")
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="GGUF file in --model.")
    parser.add_argument("--data", default=str(SHARED / "wikitext-2"), help="Directory of wiki.{train,valid,test}.tokens.")
    parser.add_argument("--search", default="auto", choices=["auto", "ivfpq", "flat"],
                        help="Index: ivfpq (FAISS-GPU), flat (exact: torch on the GPU with faiss-cpu); auto: ivfpq where "
                        "FAISS sees the GPU (or on a dry run), else flat.")
    parser.add_argument("--stages", nargs="+", choices=[stage.name for stage in STAGES],
                        help="Run only these stages (the others' outputs must exist).")
    parser.add_argument("--results_dir", default=None, help="Where NAME.json/.md go (default: benchmarks/results, "
                        "or --out for a dry run).")
    parser.add_argument("--name", default=None, help="Results file stem (default: gpu_run, or gpu_run_dry).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    setup_logging()
    import torch

    plan = make_plan(RunSizes.full())
    logger.info("Plan (full size): %s", json.dumps(plan["stages"]))
    logger.info("Planned: %.0f s of a %d s budget", plan["seconds"], BUDGET_SECONDS)
    if args.plan_only:
        print(report({"name": "gpu_run", "dry_run": False, "device": "-", "plan": plan, "seconds": {}, "stages": {}}))
        return {"plan": plan}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if not args.dry_run and device != "cuda":
        raise UsageError("No GPU is visible: run on a GPU machine, or use --dry_run to check the stages on the CPU")
    files, tokenizer, base = dry_inputs(out) if args.dry_run else full_inputs(args.model, args.gguf_file, args.data)
    r = Run(RunSizes.dry() if args.dry_run else RunSizes.full(), out, args.dry_run, tokenizer, base, files, device,
            args.search)
    seconds = {}
    for stage in STAGES:
        if args.stages and stage.name not in args.stages:
            continue
        logger.info("== stage %s: %s", stage.name, stage.what)
        start = time.perf_counter()
        r.results[stage.name] = stage.run(r)
        seconds[stage.name] = time.perf_counter() - start
        logger.info("== stage %s took %.1f s: %s", stage.name, seconds[stage.name], json.dumps(r.results[stage.name]))
    name = args.name or ("gpu_run_dry" if args.dry_run else "gpu_run")
    found = {"name": name, "dry_run": args.dry_run, "device": device, "gpu": r.results.get("environment", {}).get("gpu"),
             "sizes": dataclasses.asdict(r.sizes), "plan": plan, "seconds": seconds, "stages": r.results}
    results_dir = Path(args.results_dir or (out if args.dry_run else REPO / "benchmarks" / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / f"{name}.json", found)
    (results_dir / f"{name}.md").write_text(report(found), encoding="utf-8")
    print(report(found))
    return found


if __name__ == "__main__":
    run(main)
