"""The real run: SmolLM2-135M on WikiText-2, MLP memory against kNN-LM and fine-tuning (issue 6).

    python -m benchmarks.bench_real                      # everything (about 2 h on 2 CPU cores)
    python -m benchmarks.bench_real --skip_finetune      # without the fine-tuned rows
    python -m benchmarks.bench_real --curve_only         # only the cost curve (needs the base artifacts)

All of WikiText-2 train on one GPU (2,581,967 datastore rows; about 20 min on an H100 with faiss-cpu,
exact search in torch on the GPU), from the recipe of that run:

    python -m benchmarks.bench_real --recipe scripts/recipes/smollm2_wikitext2_full_gpu.yaml \
        --out outputs/smollm2_wikitext2_full --name real_smollm2_wikitext2_full_h100 --finetune_blocks 0 --knn_gpu \
        --batch_size 16 --qa_questions 0 --curve_full 0

Artifacts (a complete stage with the same settings is skipped: an interrupted run resumes):
1. ``scripts/pipeline.sh RECIPE out=OUT`` (default: the tenth-of-WikiText-2 CPU recipe): the base model's memory.
2. The base model fine-tuned on the same training text (``train_base --do_train``, ``OUT/finetuned``), and its
   own memory (``scripts/pipeline.sh`` again, ``out=OUT/ft``), trained on the base retriever's kNN targets
   (``shared.knn_targets``: the same tokens and rows, as SPEC.md allows for a retriever sharing the tokenizer).

Measurements (one process, one machine, the same scored tokens for every method):
- For validation and test (first ``--eval_windows`` windows each), one forward pass per model keeps, per
  token, the gold log-probability of the LM, of the memory (softmax temperature in ``--memory_temps``)
  and of the kNN distribution (exact search over the datastore, ``knn_temp`` in ``--knn_temps``). The
  interpolation of two gold probabilities is all perplexity needs, so every (lmbda, temperature) pair
  is scored from those numbers; the pair is chosen on validation and reported on test.
- Tokens/s as deployed, timed on the test pass: the forward pass; + memory forward, softmax and
  interpolation over the vocabulary; + FAISS search, p_knn over the vocabulary and interpolation.
- Cost curve: kNN-LM and base + memory tokens/s over the first ``--curve_windows`` test windows as the
  datastore grows: prefixes of the real datastore, then (``--curve_full``) the row count of all of
  WikiText-2 train, made of the real keys repeated with small noise (search cost only: FAISS time does
  not depend on which keys are stored for a flat index). Exact (flat) and IVFPQ indexes.
- NQ-open exact match / F1 with and without the memory (``downstream/eval_qa.py``).

Writes ``benchmarks/results/real_smollm2_wikitext2.{json,md}`` and ``real_*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from knn_utils.index_search import load_index  # noqa: E402
from knn_utils.knnlm import knnlm_log_probs  # noqa: E402
from models.joint import interpolate_log_probs, load_checked_memory, memory_log_probs  # noqa: E402
from utils.arguments import ModelArguments  # noqa: E402
from utils.artifacts.dataset import load_split  # noqa: E402
from utils.artifacts.datastore import open_datastore  # noqa: E402
from utils.cli import check_finite_floats, run  # noqa: E402
from utils.distributed import synchronize  # noqa: E402
from utils.environment import machine  # noqa: E402
from utils.io import read_json, write_json  # noqa: E402
from utils.modeling import load_model_for_dataset  # noqa: E402
from utils.run_layout import RunLayout  # noqa: E402
from utils.scoring import check_finite_loss, score_batches  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
RECIPE = "scripts/recipes/smollm2_wikitext2_tenth_cpu.yaml"
RESULTS = REPO / "benchmarks" / "results"


def sh(cmd: list[str], env: dict | None = None) -> None:
    """Run a command from the repository root, streaming its output."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------------
# Artifacts


def build_artifacts(args) -> None:
    out = Path(args.out)
    layout = RunLayout(out)
    sh(["bash", "scripts/pipeline.sh", args.recipe, f"out={out}"])
    if args.skip_finetune:
        return
    finetuned = out / "finetuned"
    if not (finetuned / "train_results.json").exists():
        start = time.perf_counter()
        sh([sys.executable, "-m", "train_base", "--model_name_or_path", args.model_dir, "--gguf_file", args.gguf_file,
            "--dataset_name", str(layout.dataset), "--do_train", "--num_train_epochs", str(args.finetune_epochs),
            *(["--max_train_samples", str(args.finetune_blocks)] if args.finetune_blocks else []),
            "--per_device_train_batch_size", str(args.finetune_batch), "--gradient_accumulation_steps", "2",
            "--learning_rate", str(args.finetune_lr), "--warmup_steps", "5", "--lr_scheduler_type", "cosine",
            "--weight_decay", "0.0", "--save_strategy", "no", "--logging_steps", "5", "--seed", "0",
            "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(finetuned)])
        print(f"fine-tuning took {time.perf_counter() - start:.0f} s", flush=True)
    sh(["bash", "scripts/pipeline.sh", args.recipe, f"out={out / 'ft'}", f"shared.model={finetuned}",
        "shared.gguf_file=null", f"shared.dataset={layout.dataset}", f"shared.knn_targets={layout.knn_targets}",
        "eval_joint.splits=[test]"])


# ---------------------------------------------------------------------------------------------------
# Per-token gold log-probabilities


def gold_knn_log_probs(dists: np.ndarray, vals: np.ndarray, labels: np.ndarray, temps: list[float]) -> np.ndarray:
    """log p_knn(gold) for each temperature, (n, k), (n, k), (n,) -> (len(temps), n); -inf when no neighbour holds it."""
    out = np.empty((len(temps), len(labels)))
    hit = vals == labels[:, None]  # (n, k)
    for i, temp in enumerate(temps):
        logits = -dists.astype(np.float64) / temp
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            out[i] = np.log((weights * hit).sum(axis=1))
    return out


def mix(lm: np.ndarray, other: np.ndarray, lmbda: float) -> float:
    """Perplexity of the interpolation, from per-token gold log-probabilities."""
    with np.errstate(divide="ignore"):
        joint = np.logaddexp(lm + math.log1p(-lmbda), other + math.log(lmbda))
    return float(np.exp(-joint.mean()))


def measure_model(model_path: str, gguf_file: str | None, memory_dir: Path, dataset: Path, splits: list[str],
                  windows: int, batch: int, memory_temps: list[float], knn: dict | None, knn_temps: list[float],
                  timing_lmbda: float, device: torch.device) -> dict:
    """Per-token gold log-probabilities of the LM, the memory and (``knn``) the kNN distribution, and timings."""
    result = {}
    for split_name in splits:
        split = load_split(str(dataset), split_name)
        model_args = ModelArguments(model_name_or_path=model_path, gguf_file=gguf_file)
        model, _ = load_model_for_dataset(model_args, split.meta, str(dataset))
        memory, layer, _ = load_checked_memory(str(memory_dir), model, split.meta["tokenizer"]["fingerprint"])
        model.to(device)
        memory.to(device)
        lm, mem, knn_lp = [], [], []
        seconds = {"forward": 0.0, "memory": 0.0, "knn": 0.0}
        batches = score_batches(model, split.tokens, split.windows[:windows], batch, layer=layer)
        with torch.no_grad():
            while True:
                start = time.perf_counter()
                scored = next(batches, None)
                if scored is None:
                    break
                lm_log_probs = torch.log_softmax(scored.logits.float(), dim=-1)
                synchronize(device)
                seconds["forward"] += time.perf_counter() - start
                labels = scored.labels
                lm.append(lm_log_probs.gather(-1, labels[:, None]).squeeze(-1).double().cpu().numpy())
                # The memory as deployed: forward, softmax, one interpolation over the vocabulary.
                start = time.perf_counter()
                logits = memory(scored.hidden.to(memory.dtype)).float()  # (n, V), reused for every temperature
                interpolate_log_probs(lm_log_probs, torch.log_softmax(logits / memory_temps[0], -1), timing_lmbda)
                synchronize(device)
                seconds["memory"] += time.perf_counter() - start
                mem.append(np.stack([torch.log_softmax(logits / t, -1).gather(-1, labels[:, None]).squeeze(-1)
                                     .double().cpu().numpy() for t in memory_temps]))
                if knn is not None:
                    start = time.perf_counter()
                    neighbours = knn["index"].search(scored.hidden.float().cpu().numpy(), knn["k"])
                    vals = np.asarray(knn["vals"][np.where(neighbours.valid, neighbours.ids, 0)], dtype=np.int64)
                    knnlm_log_probs(scored.logits, torch.from_numpy(neighbours.dists).to(device),
                                    torch.from_numpy(vals).to(device), timing_lmbda, knn_temps[0])
                    synchronize(device)
                    seconds["knn"] += time.perf_counter() - start
                    knn_lp.append(gold_knn_log_probs(neighbours.dists, vals, labels.cpu().numpy(), knn_temps))
        tokens = int(sum(len(x) for x in lm))
        result[split_name] = {
            "tokens": tokens, "windows": min(windows, len(split.windows)),
            "lm": np.concatenate(lm), "memory": np.concatenate(mem, axis=1),
            "knn": np.concatenate(knn_lp, axis=1) if knn_lp else None, "seconds": seconds,
        }
        del model, memory
    return result


def choose(val_lm: np.ndarray, val_other: np.ndarray, temps: list[float], lmbdas: list[float]) -> dict:
    """The (temperature, lmbda) with the lowest validation perplexity."""
    grid = [(mix(val_lm, val_other[i], lmbda), temp, lmbda) for i, temp in enumerate(temps) for lmbda in lmbdas]
    ppl, temp, lmbda = min(grid)
    return {"temp": temp, "lmbda": lmbda, "validation_perplexity": ppl,
            "grid": [{"temp": t, "lmbda": l, "validation_perplexity": p} for p, t, l in grid]}


# ---------------------------------------------------------------------------------------------------
# Cost curve


def curve(args, out: Path) -> list[dict]:
    """kNN-LM and base + memory tokens/s over the first test windows as the datastore grows."""
    layout = RunLayout(out)
    dataset = layout.dataset
    split = load_split(str(dataset), "test")
    model, _ = load_model_for_dataset(ModelArguments(model_name_or_path=args.model_dir, gguf_file=args.gguf_file),
                                      split.meta, str(dataset))
    memory, layer, _ = load_checked_memory(str(layout.memory), model, split.meta["tokenizer"]["fingerprint"])
    device = torch.device(args.device)
    model.to(device)
    memory.to(device)
    datastore = open_datastore(layout.dstore, "--dstore_dir")
    keys = np.asarray(datastore.keys, dtype=np.float32)
    vals = np.asarray(datastore.vals)
    start = time.perf_counter()
    batches = list(score_batches(model, split.tokens, split.windows[: args.curve_windows], args.batch_size, layer=layer))
    synchronize(device)
    forward = time.perf_counter() - start
    tokens = sum(len(b.rows) for b in batches)
    sizes = sorted({max(args.k, datastore.num_rows // d) for d in (8, 4, 2, 1)})
    if args.curve_full and read_json(dataset / "meta.json")["source"]["max_chars"]:  # else the datastore is all of train
        sizes.append(full_train_rows(args))
    points = []
    for size in sizes:
        synthetic = size > len(keys)
        row_vals = vals[np.resize(np.arange(len(vals)), size)]
        for kind in args.curve_index:
            index, build = new_curve_index(kind, keys, size, args)
            knn_seconds = 0.0
            for b in batches:
                t0 = time.perf_counter()
                dists, ids = index.search(np.ascontiguousarray(b.hidden.float().cpu().numpy()), args.k)
                neighbour_vals = torch.from_numpy(row_vals[np.maximum(ids, 0)].astype(np.int64)).to(device)
                knnlm_log_probs(b.logits, torch.from_numpy(np.where(ids >= 0, dists, np.inf)).to(device), neighbour_vals,
                                args.timing_lmbda, 1.0)
                synchronize(device)
                knn_seconds += time.perf_counter() - t0
            mem_seconds = 0.0
            with torch.no_grad():
                for b in batches:
                    t0 = time.perf_counter()
                    lm_log_probs = torch.log_softmax(b.logits.float(), -1)
                    interpolate_log_probs(lm_log_probs, memory_log_probs(memory, b.hidden, 1.0), args.timing_lmbda)
                    synchronize(device)
                    mem_seconds += time.perf_counter() - t0
            point = {"rows": size, "synthetic": synthetic, "index": kind, "build_seconds": round(build, 2),
                     "tokens": tokens, "forward_seconds": round(forward, 3), "knn_seconds": round(knn_seconds, 3),
                     "memory_seconds": round(mem_seconds, 3),
                     "base_tokens_per_second": round(tokens / forward, 2),
                     "knnlm_tokens_per_second": round(tokens / (forward + knn_seconds), 2),
                     "memory_tokens_per_second": round(tokens / (forward + mem_seconds), 2)}
            print(json.dumps(point), flush=True)
            points.append(point)
            del index
    return points


def key_chunks(keys: np.ndarray, size: int, chunk: int = 262_144):
    """``size`` rows: the real keys, then the real keys again with small Gaussian noise past the real datastore's end."""
    rng = np.random.default_rng(0)
    noise = 0.01 * float(keys.std())
    for begin in range(0, size, chunk):
        positions = np.arange(begin, min(begin + chunk, size))
        part = keys[positions % len(keys)]
        repeated = positions >= len(keys)
        if repeated.any():
            part[repeated] += rng.normal(0, noise, (int(repeated.sum()), keys.shape[1])).astype(np.float32)
        yield np.ascontiguousarray(part)


def new_curve_index(kind: str, keys: np.ndarray, size: int, args):
    """An exact or IVFPQ index over ``size`` rows (see `key_chunks`), and the seconds it took to build."""
    import faiss

    start = time.perf_counter()
    dim = keys.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
        nlist = int(min(1024, max(64, 4 * math.sqrt(size))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, args.code_size, 8)
        sample = keys[np.random.default_rng(0).choice(min(size, len(keys)), min(size, len(keys), 40 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = args.probe
    for part in key_chunks(keys, size):
        index.add(part)
    return index, time.perf_counter() - start


def full_train_rows(args) -> int:
    """Scored rows of all of WikiText-2 train with the model's tokenizer (one datastore row per token after the first)."""
    from utils.modeling import load_tokenizer

    tokenizer = load_tokenizer(args.model_dir, args.gguf_file)
    with open(SHARED / "wikitext-2" / "wiki.train.tokens", encoding="utf-8") as f:
        lines = f.readlines()
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    return int(sum(len(x) for x in ids)) - 1


# ---------------------------------------------------------------------------------------------------
# NQ-open


def nq_open(args, out: Path) -> dict:
    results = {}
    for name, extra in (("base", []), ("base + memory", ["--use_neural_knn", "true", "--knn_generator_path",
                                                         str(RunLayout(out).memory), "--lmbda",
                                                         str(args.qa_lmbda)])):
        target = out / ("nq_open_memory" if extra else "nq_open_base")
        if not (target / "qa_results.json").exists():
            sh([sys.executable, "-m", "downstream.eval_qa", "--model_name_or_path", args.model_dir, "--gguf_file",
                args.gguf_file, "--data_file", str(SHARED / "nq-open" / "NQ-open.dev.jsonl"), "--max_samples",
                str(args.qa_questions), "--per_device_eval_batch_size", "8", "--output_dir", str(target), *extra])
        results[name] = read_json(target / "qa_results.json")
    return results


# ---------------------------------------------------------------------------------------------------
# Report


def report(results: dict) -> str:
    test = results["test"]
    chars = results["setup"]["max_chars"]
    chars = f"first {chars:,} characters" if chars else "all"
    lines = [f"SmolLM2-135M-Instruct (Q4_1) on WikiText-2; {results['setup']['datastore_rows']:,}-row datastore "
             f"({chars} of train); test: first "
             f"{test['windows']} windows of {results['setup']['block_size']} tokens ({test['tokens']:,} scored tokens). "
             f"lmbda and temperatures chosen on validation ({results['validation']['tokens']:,} tokens).", "",
             "| model | test perplexity | vs base | lmbda | temperature | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    base = test["rows"][0]["perplexity"]
    for row in test["rows"]:
        change = f"{100 * (row['perplexity'] / base - 1):+.1f}%" if row is not test["rows"][0] else ""
        lines.append(f"| {row['model']} | {row['perplexity']:.2f} | {change} | {row.get('lmbda', '')} | "
                     f"{row.get('temp', '')} | {row['tokens_per_second']:.0f} |")
    if results.get("curve"):
        lines += ["", "Cost curve (first test windows; tokens/s):", "",
                  "| datastore rows | index | kNN-LM | base + memory | base |", "|---:|---|---:|---:|---:|"]
        for p in results["curve"]:
            rows = f"{p['rows']:,}" + (" (synthetic)" if p["synthetic"] else "")
            lines.append(f"| {rows} | {p['index']} | {p['knnlm_tokens_per_second']:.0f} | "
                         f"{p['memory_tokens_per_second']:.0f} | {p['base_tokens_per_second']:.0f} |")
    if results.get("nq_open"):
        lines += ["", "NQ-open (first questions of the dev set):", "", "| model | questions | EM | F1 | contains | questions/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in results["nq_open"].items():
            lines.append(f"| {name} | {r['count']} | {r['exact_match']:.2f} | {r['f1']:.2f} | "
                         f"{r['contains']:.2f} | {r['questions_per_second']:.2f} |")
    m = results["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}."]
    return "\n".join(lines) + "\n"


def plots(results: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in sorted({p["index"] for p in results["curve"]}):
        pts = [p for p in results["curve"] if p["index"] == kind]
        ax.plot([p["rows"] for p in pts], [p["knnlm_tokens_per_second"] for p in pts], "o-", label=f"kNN-LM ({kind})")
    pts = [p for p in results["curve"] if p["index"] == results["curve"][0]["index"]]
    ax.plot([p["rows"] for p in pts], [p["memory_tokens_per_second"] for p in pts], "s-", label="base + MLP memory")
    ax.plot([p["rows"] for p in pts], [p["base_tokens_per_second"] for p in pts], "--", color="gray", label="base alone")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("datastore rows")
    ax.set_ylabel("tokens/s")
    m = results["machine"]
    ax.set_title(f"Cost as the datastore grows\n(SmolLM2-135M on {m['gpu'] or 'CPU'}; FAISS on {m['cores']} CPU cores)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}_cost_curve.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sweep in results["validation"]["sweeps"].items():
        ax.plot([p["lmbda"] for p in sweep], [p["validation_perplexity"] for p in sweep], "o-", label=name)
    ax.axhline(results["validation"]["base_perplexity"], color="gray", ls="--", label="base")
    ax.set_xlabel("lmbda (at the chosen temperature)")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}_lmbda.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=RECIPE, help="The recipe of the pipeline run (scripts/recipes/).")
    parser.add_argument("--out", default="outputs/smollm2_wikitext2", help="Its output directory (the artifacts).")
    parser.add_argument("--model_dir", default=str(SHARED / "smollm2-135m-instruct"))
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--eval_windows", type=int, default=50, help="First N windows of validation and of test.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--knn_temps", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--memory_temps", type=float, nargs="+", default=[1.0, 0.75, 1.5, 2.0])
    parser.add_argument("--lmbdas", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
                                                                        0.5, 0.55, 0.6, 0.65, 0.7, 0.8])
    parser.add_argument("--timing_lmbda", type=float, default=0.25)
    parser.add_argument("--skip_finetune", action="store_true")
    parser.add_argument("--finetune_epochs", type=float, default=1)
    parser.add_argument("--finetune_lr", type=float, default=5e-5)
    parser.add_argument("--finetune_blocks", type=int, default=240,
                        help="Fine-tune on the first N blocks of 512 tokens (240: half the datastore's text; 0: all).")
    parser.add_argument("--curve_only", action="store_true")
    parser.add_argument("--curve_windows", type=int, default=4, help="Test windows timed for the cost curve.")
    parser.add_argument("--curve_index", nargs="+", default=["flat", "ivfpq"], choices=["flat", "ivfpq"])
    parser.add_argument("--curve_full", type=int, default=1, help="1: add the row count of all of WikiText-2 train.")
    parser.add_argument("--code_size", type=int, default=64)
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--qa_questions", type=int, default=300)
    parser.add_argument("--qa_lmbda", type=float, default=0.25)
    parser.add_argument("--name", default="real_smollm2_wikitext2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Where the base model and the memory run (FAISS search runs on the CPU).")
    parser.add_argument("--knn_gpu", action="store_true",
                        help="Exact kNN search of the quality measurement on the GPU (faiss-gpu, else torch).")
    parser.add_argument("--finetune_batch", type=int, default=4, help="Windows per fine-tuning micro-batch.")
    args = parser.parse_args(argv)
    check_finite_floats(args)
    out = Path(args.out)
    stem = RESULTS / args.name
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = read_json(f"{stem}.json") if args.curve_only and Path(f"{stem}.json").exists() else {}
    results["machine"] = machine()

    if not args.curve_only:
        build_artifacts(args)
        layout = RunLayout(out)
        datastore = open_datastore(layout.dstore, "--dstore_dir")
        index = load_index(layout.index, datastore, use_gpu=args.knn_gpu)
        knn = {"index": index, "vals": np.asarray(datastore.vals), "k": args.k}
        splits = ["validation", "test"]
        common = dict(dataset=layout.dataset, splits=splits, windows=args.eval_windows, batch=args.batch_size,
                      memory_temps=args.memory_temps, knn_temps=args.knn_temps, timing_lmbda=args.timing_lmbda,
                      device=torch.device(args.device))
        base = measure_model(args.model_dir, args.gguf_file, layout.memory, knn=knn, **common)
        models = {"base": base}
        if not args.skip_finetune:
            models["fine-tuned"] = measure_model(str(out / "finetuned"), None, RunLayout(out / "ft").memory, knn=None,
                                                 **common)
        dataset_meta = read_json(layout.dataset / "meta.json")
        results["setup"] = {"datastore_rows": datastore.num_rows, "k": args.k, "index": index.meta["index_type"],
                            "knn_search": type(index.index).__name__, "device": args.device,
                            "max_chars": dataset_meta["source"]["max_chars"], "block_size": dataset_meta["block_size"],
                            "knn_temps": args.knn_temps, "memory_temps": args.memory_temps, "lmbdas": args.lmbdas,
                            "memory": read_json(layout.memory / "config.json")}
        rows, sweeps = [], {}
        val, test = base["validation"], base["test"]
        t = test["seconds"]

        def row(model, ppl, seconds, **extra):
            rows.append({"model": model, "perplexity": ppl, "tokens_per_second": test["tokens"] / seconds, **extra})

        row("base", float(np.exp(-test["lm"].mean())), t["forward"])
        picks = {}
        for name, m in models.items():
            label = "base" if name == "base" else "fine-tuned base"
            if name != "base":
                row(label, float(np.exp(-m["test"]["lm"].mean())), m["test"]["seconds"]["forward"])
            pick = choose(m["validation"]["lm"], m["validation"]["memory"], args.memory_temps, args.lmbdas)
            i = args.memory_temps.index(pick["temp"])
            row(f"{label} + MLP memory", mix(m["test"]["lm"], m["test"]["memory"][i], pick["lmbda"]),
                m["test"]["seconds"]["forward"] + m["test"]["seconds"]["memory"], lmbda=pick["lmbda"], temp=pick["temp"])
            row(f"MLP memory alone ({name})", float(np.exp(-m["test"]["memory"][i].mean())),
                m["test"]["seconds"]["forward"] + m["test"]["seconds"]["memory"], temp=pick["temp"])
            picks[f"{label} + MLP memory"] = pick
            if name == "base":
                kpick = choose(val["lm"], val["knn"], args.knn_temps, args.lmbdas)
                j = args.knn_temps.index(kpick["temp"])
                row("kNN-LM (base, exact search)", mix(test["lm"], test["knn"][j], kpick["lmbda"]),
                    t["forward"] + t["knn"], lmbda=kpick["lmbda"], temp=kpick["temp"])
                picks["kNN-LM"] = kpick
        for name, pick in picks.items():
            sweeps[name] = [g for g in pick["grid"] if g["temp"] == pick["temp"]]
        results["validation"] = {"tokens": val["tokens"], "base_perplexity": float(np.exp(-val["lm"].mean())),
                                 "picks": {k: {x: v[x] for x in ("temp", "lmbda", "validation_perplexity")}
                                           for k, v in picks.items()}, "sweeps": sweeps}
        for entry in rows:  # a NaN or infinite perplexity is an error, never a result
            check_finite_loss(entry["perplexity"], f"{entry['model']}:", "a model, a memory or the datastore is corrupt")
        results["test"] = {"tokens": test["tokens"], "windows": test["windows"], "rows": rows,
                           "seconds": {n: m["test"]["seconds"] for n, m in models.items()}}
        results["nq_open"] = nq_open(args, out) if args.qa_questions else {}
        write_json(f"{stem}.json", results)

    results["curve"] = curve(args, out)
    write_json(f"{stem}.json", results)
    if "test" in results:
        Path(f"{stem}.md").write_text(report(results))
        plots(results, stem)
        print(report(results))
    return results


if __name__ == "__main__":
    run(main)
