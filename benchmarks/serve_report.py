"""The JSON, Markdown table and plot of `benchmarks.bench_serve` (vLLM base against base + memory, HF beside)."""

from __future__ import annotations

import os
from pathlib import Path

from utils.io import write_json


def ratio(results: dict, stage: str, batch) -> float | None:
    """Base + memory tokens/s over the base's in ``stage`` at ``batch``, None if not measured."""
    runs = results.get(stage)
    if not runs:
        return None
    base, joint = runs["base"]["batches"][batch], runs["joint"]["batches"][batch]
    return joint["tokens_per_second"] / base["tokens_per_second"]


def table(results: dict) -> list[str]:
    """One row per batch size: vLLM base, base + memory and their ratio, times to first token, HF beside."""
    bound = results["flop_bound"]
    lines = ["| batch | vLLM base tok/s | vLLM base + memory tok/s | ratio | TTFT base | TTFT base + memory | "
             "HF base tok/s | HF base + memory tok/s | HF ratio | FLOP bound |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in results["settings"]["batch_sizes"]:
        cells = [str(batch)]
        for stage in ("vllm", "hf"):
            runs = results.get(stage)
            if not runs:
                cells += ["", "", ""] if stage == "hf" else ["", "", "", "", ""]
                continue
            base, joint = runs["base"]["batches"][batch], runs["joint"]["batches"][batch]
            value = f"{ratio(results, stage, batch):.2f}x"
            cells += [f"{base['tokens_per_second']:.1f}", f"{joint['tokens_per_second']:.1f}",
                      f"**{value}**" if stage == "vllm" else value]
            if stage == "vllm":
                cells += [f"{base['ttft_seconds'] * 1000:.0f} ms", f"{joint['ttft_seconds'] * 1000:.0f} ms"]
        cells.append(f"{bound:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_outputs(results: dict, out_dir: Path, name: str) -> None:
    """benchmarks/results/<name>.json, .md (the table, the machine, the settings) and .png (tokens/s per batch)."""
    for stage in ("vllm", "hf"):  # JSON keys are strings: keep the batch sizes as given
        for runs in (results.get(stage) or {}).values():
            runs["batches"] = {int(k): v for k, v in runs["batches"].items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", results)
    m, s, mem = results["machine"], results["settings"], results["memory"]
    flops = results["flops_per_token"]
    lines = [f"# {name}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}, {results['threads']} "
             f"threads; load average {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])} at the end. {m['note']}".rstrip(),
             f"Base: {'a tiny random Llama' if s['tiny'] else s['model_dir'] + '/' + s['gguf_file'] + ' (dequantised)'}"
             ", "
             f"{results['base_parameters'] / 1e6:.1f}M parameters. Memory: {mem['num_layers']} {mem['memory_style']} "
             f"blocks of width {mem['hidden_size']} (intermediate {mem['intermediate_size']}) reading block "
             f"{mem['layer']}, {mem['parameters'] / 1e6:.1f}M parameters, random weights (the speed depends on the "
             f"shape only), lmbda {s['lmbda']}.",
             f"Device {s['device']}, {s['dtype']}, vLLM {'eager' if s['enforce_eager'] else 'compiled'} (both engines "
             f"in the benchmark's process, taking turns); prompts of {s['prompt_tokens']} tokens, greedy, "
             f"{s['new_tokens']} new "
             f"tokens each (ignore_eos); medians of {s['repeats']} repeats after a warm-up. TTFT: the wall time of the "
             "same batch with one new token. FLOP bound: F_base / (F_base + F_memory) = "
             f"{flops['base'] / 1e6:.1f}M / ({flops['base'] / 1e6:.1f}M + {flops['memory'] / 1e6:.1f}M) per token at "
             f"mean context {flops['context']:.0f}.", ""]
    if results.get("plan"):
        lines += [f"Dry run: stages {results['stages']}, plan {results['plan']}.", ""]
    else:
        lines += table(results) + [""]
        starts = {stage: {label: run.get("engine_start_seconds") for label, run in results[stage].items()}
                  for stage in ("vllm",) if results.get(stage)}
        lines += [f"Stage seconds: {results['stage_seconds']}; vLLM engine starts (s): {starts}.", ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    if not results.get("plan") and results.get("vllm"):
        plot(results, out_dir / f"{name}.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["settings"]["batch_sizes"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.2
    series = [(stage, label) for stage in ("vllm", "hf") if results.get(stage) for label in ("base", "joint")]
    for i, (stage, label) in enumerate(series):
        values = [results[stage][label]["batches"][b]["tokens_per_second"] for b in batches]
        name = f"{'vLLM' if stage == 'vllm' else 'HF generate'} {'base' if label == 'base' else 'base + memory'}"
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(batches))], values, width, label=name)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    partial = path.with_suffix(".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)
