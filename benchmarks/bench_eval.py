"""Perplexity evaluation at the FLOP bound (issue 15, section 6): base + memory speed against the base alone.

    python -m benchmarks.bench_eval                         # SmolLM2-135M (GGUF), 4 x 512 WikiText-2 test tokens
    python -m benchmarks.bench_eval --windows 8 --repeats 7

The base model is SmolLM2-135M-Instruct from ../shared/data; the memory has the shape docs/results.md uses (2 SwiGLU
blocks reading the last block, about 33M parameters) and **random weights**: its speed does not depend on them.
Every repeat scores the same batch of ``--windows`` windows of 512 tokens and times, on the same tokens:

- base: the base forward pass and its gold-token NLL (what `evaluate_joint` counts as the base);
- memory + interpolation, new path (`models.joint.perplexity.joint_nll`): the memory forward, one log-sum-exp of its
  logits, the formula on (rows,) vectors;
- memory + interpolation, old path (as before issue 15): ``log_softmax`` of the LM logits again, the memory's full
  ``log_softmax``, the (rows x vocab) interpolation, then a gather;
- the kNN-LM's p_knn at k ``--k`` (random distances and values, the search itself excluded): dense (rows x vocab)
  ``p_knn`` and interpolation against the neighbours-only gold path.

The FLOP bound is ``F_base / (F_base + F_memory)``, the tokens/s ratio base + memory can reach if the memory's
matmuls ran at the base's FLOP rate and nothing else cost time. FLOPs per token are 2 x the weights of every linear
layer (the LM head included) plus the base's attention scores and weighted sums (4 x d x context per layer).
Times are medians of ``--repeats`` repeats after one warm-up. Writes benchmarks/results/<name>.json, .md and .png
with the machine and its load (other jobs shared the CPU when ours ran: see the load average recorded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.flops import flops_per_token  # noqa: E402
from knn_utils.knnlm import knnlm_gold_log_probs_sweep, knnlm_log_probs_sweep  # noqa: E402
from models import MemoryConfig, build_memory  # noqa: E402
from models.joint.interpolation import interpolate_log_probs, memory_log_probs  # noqa: E402
from models.joint.perplexity import joint_nll  # noqa: E402
from utils.arguments import ModelArguments  # noqa: E402
from utils.environment import machine  # noqa: E402
from utils.hidden_state import HiddenStateHook  # noqa: E402
from utils.io import write_json  # noqa: E402
from utils.modeling import load_causal_lm, load_tokenizer  # noqa: E402
from utils.scoring import score_windows, token_nll  # noqa: E402
from utils.windows import make_windows  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def old_joint_seconds(batch, memory, lmbda: float, knn_temp: float) -> tuple[float, float, torch.Tensor]:
    """The path before issue 15: full log_softmax of both, the (rows x vocab) interpolation, a gather."""
    start = time.perf_counter()
    lm_log_probs = torch.log_softmax(batch.logits.float(), dim=-1)  # (n, V), again
    mem_log_probs = memory_log_probs(memory, batch.hidden, knn_temp)  # (n, V)
    middle = time.perf_counter()
    mixed = interpolate_log_probs(lm_log_probs, mem_log_probs, lmbda).gather(-1, batch.labels[:, None])[:, 0]
    return middle - start, time.perf_counter() - middle, -mixed


def knn_seconds(lm_logits: torch.Tensor, labels: torch.Tensor, k: int, lmbda: float, seed: int) -> dict:
    """p_knn scoring of one batch: dense (rows x vocab) against neighbours-only, on random neighbours."""
    generator = torch.Generator().manual_seed(seed)
    n, vocab = lm_logits.shape
    dists = torch.rand(n, k, generator=generator) * 100
    vals = torch.randint(0, vocab, (n, k), generator=generator)
    vals[:, :8] = labels[:, None]  # the gold token among the neighbours, as it often is
    start = time.perf_counter()
    dense = knnlm_log_probs_sweep(lm_logits, dists, vals, [lmbda], 1.0)[0].gather(-1, labels[:, None])[:, 0]
    middle = time.perf_counter()
    lm_gold = -token_nll(lm_logits, labels)  # the base's, shared in evaluate_knnlm
    gold = knnlm_gold_log_probs_sweep(lm_gold, dists, vals, labels, [lmbda], 1.0)[0]
    end = time.perf_counter()
    return {"dense": middle - start, "gold": end - middle, "max_abs_diff": float((dense - gold).abs().max())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=str(SHARED / "smollm2-135m-instruct"))
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--text_file", default=str(SHARED / "wikitext-2" / "wiki.test.raw"))
    parser.add_argument("--windows", type=int, default=4, help="Windows of --block_size tokens per batch.")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--memory_layers", type=int, default=2, help="SwiGLU blocks of the memory.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lmbda", type=float, default=0.25)
    parser.add_argument("--knn_temp", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=1024, help="Neighbours of the kNN-LM scoring comparison.")
    parser.add_argument("--name", default="eval_flop_bound")
    args = parser.parse_args(argv)
    if not Path(args.model_dir, args.gguf_file).is_file():
        raise SystemExit(f"--model_dir {args.model_dir}: {args.gguf_file} not found (see ../shared/data/README.md)")

    torch.manual_seed(0)
    model = load_causal_lm(ModelArguments(model_name_or_path=args.model_dir, gguf_file=args.gguf_file)).eval()
    tokenizer = load_tokenizer(args.model_dir, args.gguf_file)
    text = Path(args.text_file).read_text()[: 40 * args.windows * args.block_size]
    tokens = np.asarray(tokenizer(text).input_ids, dtype=np.int32)
    windows = make_windows(len(tokens), args.block_size, args.block_size)[: args.windows]  # no overlap, as in the docs
    if len(windows) < args.windows:
        raise SystemExit(f"--text_file {args.text_file} has too few tokens for {args.windows} windows")
    config = MemoryConfig.from_base(model.config, num_layers=args.memory_layers, layer=model.config.num_hidden_layers - 1)
    memory = build_memory(config).eval()  # random weights: the speed does not depend on them
    window_ids = np.arange(len(windows))

    timings: dict[str, list[float]] = {key: [] for key in (
        "base", "memory_new", "interpolation_new", "memory_old", "interpolation_old", "knn_dense", "knn_gold")}
    max_abs_diff = knn_diff = 0.0
    with torch.no_grad(), HiddenStateHook(model, config.layer) as hook:
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            batch = score_windows(model, hook, tokens, windows, window_ids)
            base_nll = token_nll(batch.logits, batch.labels)
            base = time.perf_counter() - start
            new = joint_nll(batch, -base_nll, memory, [args.lmbda], args.knn_temp)
            memory_old, interpolation_old, old_nll = old_joint_seconds(batch, memory, args.lmbda, args.knn_temp)
            knn = knn_seconds(batch.logits, batch.labels, args.k, args.lmbda, repeat)
            max_abs_diff = max(max_abs_diff, float((new.joint[0] - old_nll).abs().max()))
            knn_diff = max(knn_diff, knn["max_abs_diff"])
            if repeat:
                for key, value in (("base", base), ("memory_new", new.memory_seconds),
                                   ("interpolation_new", new.interpolation_seconds), ("memory_old", memory_old),
                                   ("interpolation_old", interpolation_old), ("knn_dense", knn["dense"]),
                                   ("knn_gold", knn["gold"])):
                    timings[key].append(value)
    rows = len(batch.rows)
    median = {key: statistics.median(values) for key, values in timings.items()}
    base_flops, memory_flops = flops_per_token(model, memory, context=float(np.mean(np.arange(1, args.block_size + 1))))
    bound = base_flops / (base_flops + memory_flops)
    new_ratio = median["base"] / (median["base"] + median["memory_new"] + median["interpolation_new"])
    old_ratio = median["base"] / (median["base"] + median["memory_old"] + median["interpolation_old"])
    results = {
        "machine": {**machine(), "load_average_at_end": os.getloadavg(),
                    "note": "2-core machine shared with other jobs while this ran; medians of repeats"},
        "model": f"{args.model_dir}/{args.gguf_file}", "memory": {**config.describe(), "random_weights": True},
        "tokens": rows, "windows": args.windows, "block_size": args.block_size, "repeats": args.repeats,
        "lmbda": args.lmbda, "knn_temp": args.knn_temp, "threads": torch.get_num_threads(),
        "seconds_median": {key: round(value, 4) for key, value in median.items()},
        "seconds_all": {key: [round(v, 4) for v in values] for key, values in timings.items()},
        "flops_per_token": {"base": base_flops, "memory": memory_flops},
        "flop_bound": round(bound, 4),
        "joint_over_base": {"new": round(new_ratio, 4), "old": round(old_ratio, 4)},
        "new_over_bound": round(new_ratio / bound, 4),
        "base_tokens_per_second": round(rows / median["base"], 1),
        "joint_tokens_per_second": {
            "new": round(rows / (median["base"] + median["memory_new"] + median["interpolation_new"]), 1),
            "old": round(rows / (median["base"] + median["memory_old"] + median["interpolation_old"]), 1)},
        "max_abs_nll_difference_new_vs_old": max_abs_diff,
        "knn": {"k": args.k, "dense_seconds": round(median["knn_dense"], 4), "gold_seconds": round(median["knn_gold"], 4),
                "max_abs_log_prob_difference": knn_diff},
    }
    write_outputs(results, REPO / "benchmarks" / "results", args.name)
    return results


def write_outputs(results: dict, out_dir: Path, name: str) -> None:
    """JSON, a Markdown table and a bar chart of the seconds per batch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", results)
    m, s = results["machine"], results["seconds_median"]
    ratio, knn, mem = results["joint_over_base"], results["knn"], results["memory"]
    lines = [
        f"# {name}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}, {results['threads']} threads. "
        f"{m['note']} (load average at the end: {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])}).",
        f"Base: {results['model']}. Memory: {mem['num_layers']} {mem['memory_style']} blocks of width "
        f"{mem['hidden_size']} (intermediate {mem['intermediate_size']}), {mem['parameters'] / 1e6:.1f}M parameters, "
        "random weights (its speed does not depend on them).",
        f"One batch of {results['windows']} x {results['block_size']} WikiText-2 test tokens ({results['tokens']} scored), "
        f"lmbda {results['lmbda']}; medians of {results['repeats']} repeats.", "",
        "| | base | memory forward (+ log-sum-exp / log-softmax) | interpolation | base + memory tokens/s | "
        "joint / base | FLOP bound | of the bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| old: full (rows x vocab) | {s['base']:.3f} s | {s['memory_old']:.3f} s | {s['interpolation_old']:.3f} s | "
        f"{results['joint_tokens_per_second']['old']} | {ratio['old']:.3f} | {results['flop_bound']:.3f} | "
        f"{ratio['old'] / results['flop_bound']:.1%} |",
        f"| new: gold token only | {s['base']:.3f} s | {s['memory_new']:.3f} s | {s['interpolation_new']:.4f} s | "
        f"{results['joint_tokens_per_second']['new']} | {ratio['new']:.3f} | {results['flop_bound']:.3f} | "
        f"{results['new_over_bound']:.1%} |", "",
        f"Base alone: {results['base_tokens_per_second']} tokens/s. Largest |NLL difference| new vs old: "
        f"{results['max_abs_nll_difference_new_vs_old']:.2e}.", "",
        f"kNN-LM scoring at k {knn['k']} (search excluded): dense p_knn and interpolation {knn['dense_seconds']:.3f} s, "
        f"gold from the neighbours {knn['gold_seconds']:.4f} s per batch (largest |difference| "
        f"{knn['max_abs_log_prob_difference']:.2e}).", ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    plot(results, out_dir / f"{name}.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["seconds_median"]
    labels = ["old: full vocabulary", "new: gold token only"]
    base = [s["base"], s["base"]]
    mem = [s["memory_old"], s["memory_new"]]
    interp = [s["interpolation_old"], s["interpolation_new"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.barh(labels, base, label="base forward + NLL")
    ax.barh(labels, mem, left=base, label="memory forward + normaliser")
    ax.barh(labels, interp, left=[b + m for b, m in zip(base, mem)], label="interpolation")
    bound_total = s["base"] / results["flop_bound"]
    ax.axvline(bound_total, color="black", linestyle="--", label=f"FLOP bound ({results['flop_bound']:.2f}x base)")
    ax.set_xlabel(f"seconds per batch of {results['tokens']} tokens (median)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    partial = path.with_suffix(".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)


if __name__ == "__main__":
    main()
