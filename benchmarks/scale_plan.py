"""The capacity plan of benchmarks/bench_scale.py: its settings (`ScaleArguments`, here so that the stage modules
import them without importing the command), rates fitted over the measured sizes, extrapolated to WikiText-103
and a 500M-token datastore (disk, RAM, hours on this CPU and on H100s), the Markdown report and the plot.

Writing, adding and training cost the same per row at any size: their rate is the median over the sizes.
Searching gets a power law, rate = a N^b. Costs per row are scaled by the key width (measured at 576).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAGES = ("write", "index", "search", "targets", "train", "knnlm", "memory")  # bench_scale's, in pipeline order
# docs/results.md, all of WikiText-2 train (2,581,967 rows) on one H100 (SmolLM2-135M, width 576)
H100 = {"rows": 2_581_967, "write_seconds": 87.0, "exact_targets_seconds": 161.0, "train_rows_per_second": 4993 * 512 / 43.0,
        "memory_tokens_per_second": 67_798.0, "knnlm_exact_gpu_tokens_per_second": 16_607.0}
TARGETS = {"WikiText-103, SmolLM2-135M (d 576)": (103_000_000, 576),
           "WikiText-103, GPT2-large (d 1280)": (103_000_000, 1280),
           "500M tokens, GPT2-large (d 1280)": (500_000_000, 1280)}


@dataclass
class ScaleArguments:
    """Sizes, settings and where the results go."""

    sizes: list[int] = field(default_factory=lambda: [200_000, 2_000_000, 20_000_000],
                             metadata={"help": "Datastore rows to measure, ascending."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where NAME.json/.md/.png go."})
    name: str = field(default="bench_scale", metadata={"help": "Base name of the result files."})
    work_dir: str = field(default="outputs/bench_scale", metadata={"help": "Seed, datastores, indexes (large)."})
    seed_chars: int = field(default=100_000, metadata={"help": "Characters of WikiText-2 train the seed datastore covers."})
    noise: float = field(default=0.05, metadata={"help": "Noise added to the repeated seed keys, times each dimension's std."})
    ncentroids: int = field(default=1024, metadata={"help": "IVF lists of every index."})
    code_size: int = field(default=32, metadata={"help": "PQ bytes per key."})
    train_size: int = field(default=65_536, metadata={"help": "Keys sampled to train every index."})
    probe: int = field(default=32, metadata={"help": "nprobe of the search, kNN-LM and target rates."})
    k: int = field(default=1024, metadata={"help": "Neighbours per query (the paper's)."})
    num_queries: int = field(default=2000, metadata={"help": "Queries of the search stage."})
    train_steps: int = field(default=40, metadata={"help": "Optimizer steps of the train stage."})
    train_batch: int = field(default=512, metadata={"help": "Rows per training step (the real run's)."})
    eval_windows: int = field(default=2, metadata={"help": "Test windows (512 tokens) of the knnlm and memory stages."})
    keep: bool = field(default=False, metadata={"help": "Keep each size's datastore, index and targets."})
    stages: list[str] = field(default_factory=lambda: list(STAGES),
                              metadata={"help": "Stages to run (all by default); the others' numbers come from --reuse_results."})
    reuse_results: str | None = field(
        default=None, metadata={"help": "A previous NAME.json whose numbers the stages not in --stages keep (same sizes)."})
    note: str | None = field(default=None, metadata={"help": "Free text printed with the results (e.g. the machine's load)."})


def power_fit(sizes: list[int], values: list[float]) -> tuple[float, float]:
    """(a, b) of value = a * size^b, least squares in log-log (b = 0 with one size)."""
    if len(sizes) < 2:
        return float(values[0]), 0.0
    b, log_a = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(math.exp(log_a)), float(b)


def predict(fit: tuple[float, float], size: float) -> float:
    return fit[0] * size ** fit[1]


EXACT, FAISS_RANKING = "exact ranking", "FAISS ranking"  # benchmarks.scale_search's strategy names


def search_rate(size: dict, strategy: str = EXACT) -> float:
    """Queries/s of one size's search stage with ``strategy`` (a search stage from before the strategies were
    measured holds the exact ranking's rate alone)."""
    search = size["stages"]["search"]
    return search["strategies"][strategy]["queries_per_second"] if "strategies" in search else search["queries_per_second"]


def disk_rerank(results: dict) -> dict | None:
    """The exact ranking's cost per query beyond FAISS's own search with the keys on disk: the two rankings' times
    at the largest size when its keys did not fit in the page cache (None otherwise). A query reads its candidates'
    keys, one random read each, so this cost does not grow with the datastore: beyond that size the exact ranking is
    FAISS's search (its own power law) plus this."""
    largest = results["sizes"][-1]
    search = largest["stages"]["search"]
    if search.get("page_cache") != "cold" or FAISS_RANKING not in search.get("strategies", {}):
        return None
    return {"seconds_per_query": 1 / search_rate(largest) - 1 / search_rate(largest, FAISS_RANKING),
            "beyond_rows": largest["rows"]}


def exact_search_seconds(fits: dict, disk: dict | None, rows: float) -> float:
    """Seconds per query of the exact ranking (the default) at ``rows``: the power law through the measured sizes,
    and beyond the largest, where its keys were on disk, FAISS's search plus the re-ranking's reads (`disk_rerank`)."""
    if disk is not None and rows > disk["beyond_rows"]:
        return 1 / predict(fits["search_queries_per_second_faiss_ranking"], rows) + disk["seconds_per_query"]
    return 1 / predict(fits["search_queries_per_second"], rows)


def plan(results: dict, args: ScaleArguments) -> dict:
    """Disk, RAM and hours per stage at the TARGETS sizes, from the fitted curves."""
    sizes = [r["rows"] for r in results["sizes"]]
    by = lambda stage, key: [r["stages"][stage][key] for r in results["sizes"]]  # noqa: E731
    # Writing, adding and training cost the same per row at any size (their work per row does not depend on N: the
    # IVF assignment scans --ncentroids lists, a training step one batch), so their rate is the median of the sizes
    # (b = 0), which keeps the load of a shared machine out of the extrapolation. A search scans lists that grow with
    # N at a fixed --ncentroids: its rate gets a power law.
    flat = lambda values: (float(np.median(values)), 0.0)  # noqa: E731
    fits = {"write_rows_per_second": flat(by("write", "rows_per_second")),
            "add_rows_per_second": flat(by("index", "add_rows_per_second")),
            "search_queries_per_second": power_fit(sizes, [search_rate(r) for r in results["sizes"]]),
            "train_rows_per_second": flat(by("train", "rows_per_second")),
            "knn_search_seconds_per_token": power_fit(sizes, [r["per_token"]["knn_search"] for r in results["sizes"]])}
    if all("strategies" in r["stages"]["search"] for r in results["sizes"]):
        fits["search_queries_per_second_faiss_ranking"] = power_fit(
            sizes, [search_rate(r, FAISS_RANKING) for r in results["sizes"]])
    base = float(np.median([r["per_token"][k] for r in results["sizes"] for k in ("base_in_knnlm", "base_in_joint")]))
    memory_cost = float(np.median([r["per_token"]["memory"] for r in results["sizes"]]))  # flat: no datastore
    last = results["sizes"][-1]
    nnz_per_row = last["stages"]["targets"]["nnz"] / last["rows"]
    train_seconds = last["stages"]["index"]["train_seconds"]
    peak_anon = {stage: max(r["stages"][stage]["peak_anon_bytes"] for r in results["sizes"]) for stage in STAGES}
    keys_on_disk = disk_rerank(results) if "search_queries_per_second_faiss_ranking" in fits else None
    out = {"fits": {k: {"a": a, "b": b} for k, (a, b) in fits.items()}, "targets": {}, "disk_rerank": keys_on_disk,
           "base_seconds_per_token": base, "memory_seconds_per_token": memory_cost,
           "measured_speedup": {r["rows"]: (base + r["per_token"]["knn_search"]) / (base + memory_cost)
                                for r in results["sizes"]}}
    for label, (rows, dim) in TARGETS.items():
        width = dim / 576  # CPU rates measured at 576; per-row costs of writing, adding and searching grow with d
        index_bytes = rows * (args.code_size + 8) + args.ncentroids * dim * 4
        disk = {"keys_and_vals": rows * (2 * dim + 4), "index": index_bytes, "knn_targets": rows * (8 + 4 + nnz_per_row * 6)}
        cpu_hours = {
            "write (keys only, no forward)": rows / predict(fits["write_rows_per_second"], rows) * width / 3600,
            "index train + add": (train_seconds * width + rows / predict(fits["add_rows_per_second"], rows) * width) / 3600,
            f"kNN targets, IVFPQ k {args.k} nprobe {args.probe}, exact ranking (the default)":
                rows * exact_search_seconds(fits, keys_on_disk, rows) * width / 3600,
            "memory training, 1 epoch (SmolLM2-size memory)": rows / predict(fits["train_rows_per_second"], rows) / 3600,
        }
        if "search_queries_per_second_faiss_ranking" in fits:  # no keys read: IVFPQ codes only
            cpu_hours[f"kNN targets, IVFPQ k {args.k} nprobe {args.probe}, FAISS's ranking (--recompute_dists False)"] = \
                rows / predict(fits["search_queries_per_second_faiss_ranking"], rows) * width / 3600
        scale = rows / H100["rows"]
        gpu_hours = {  # one H100, from docs/results.md; exact search cost grows with rows^2
            "datastore (forward + write)": H100["write_seconds"] * scale * width / 3600,
            "exact kNN targets (torch, GPU)": H100["exact_targets_seconds"] * scale ** 2 * width / 3600,
            "memory training, 1 epoch (SmolLM2-size memory)": rows / H100["train_rows_per_second"] / 3600,
        }
        knnlm = 1 / (base + predict(fits["knn_search_seconds_per_token"], rows) * width)  # SmolLM2's base and memory
        memory = 1 / (base + memory_cost)
        out["targets"][label] = {
            "rows": rows, "dim": dim, "disk_gb": {k: v / 1e9 for k, v in disk.items()},
            "ram_gb": {"the index in RAM to search it (codes + ids)": index_bytes / 1e9,
                       **{f"{stage} (measured peak)": b / 1e9 for stage, b in peak_anon.items()}},
            "cpu_hours_2_cores": cpu_hours, "h100_hours_1": gpu_hours,
            "h100_hours_8": {k: v / 8 for k, v in gpu_hours.items()},
            "knnlm_tokens_per_second_cpu": knnlm, "memory_tokens_per_second_cpu": memory,
            "memory_speedup_over_knnlm_cpu": memory / knnlm,
        }
    return out


# ---------------------------------------------------------------------------------------------------
# Report


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Capacity plan ({m['cpu']}, {m['cores']} cores)", "",
             *([results["settings"]["note"], ""] if results["settings"].get("note") else []),
             f"Seed: {results['seed_rows']:,} real SmolLM2-135M keys (width 576) of WikiText-2 train, repeated with noise "
             f"{results['settings']['noise']} x std. IVFPQ: {results['settings']['ncentroids']} lists, "
             f"{results['settings']['code_size']}-byte codes, nprobe {results['settings']['probe']}, k {results['settings']['k']}.", "",
             "| rows | write rows/s | index train s | add rows/s | search queries/s | train rows/s | "
             "kNN search ms/token | memory ms/token | memory vs kNN-LM |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["sizes"]:
        s, t = r["stages"], r["per_token"]
        lines.append(f"| {r['rows']:,} | {s['write']['rows_per_second']:,.0f} | {s['index']['train_seconds']:.1f} | "
                     f"{s['index']['add_rows_per_second']:,.0f} | {search_rate(r):,.1f} | "
                     f"{s['train']['rows_per_second']:,.0f} | {1e3 * t['knn_search']:.2f} | {1e3 * t['memory']:.2f} | "
                     f"{results['plan']['measured_speedup'][r['rows']]:.2f}x |")
    lines += ["", f"The last column is (base + kNN search) / (base + memory) per token, at the median base forward cost "
                  f"of all runs ({1e3 * results['plan']['base_seconds_per_token']:.1f} ms/token, SmolLM2-135M on this CPU): "
                  "the two evaluations ran at different times on a shared machine, so their own tokens/s are not compared."]
    if disk := results["plan"].get("disk_rerank"):
        lines += ["", f"Beyond {disk['beyond_rows']:,} rows the exact ranking's hours below are FAISS's search (its power "
                      f"law) plus {1e3 * disk['seconds_per_query']:.1f} ms a query for reading the candidates' keys from "
                      f"disk, measured at {disk['beyond_rows']:,} rows (a cold page cache): a read per candidate, which "
                      "does not grow with the datastore."]
    searched = [r for r in results["sizes"] if "strategies" in r["stages"]["search"]]
    if searched:
        names = list(dict.fromkeys(n for r in searched for n in r["stages"]["search"]["strategies"]))
        lines += ["", f"Search strategies (IVFPQ nprobe {results['settings']['probe']}, k {results['settings']['k']}, "
                      "batches of 500 queries): queries/s, and the share of the exact ranking's neighbours each finds. "
                      "The page cache is warm where the keys fit in half the available memory, cold (the keys file "
                      "dropped from it) where they do not:", "",
                  "| rows | keys GB | page cache | " + " | ".join(f"{n}: queries/s | agreement" for n in names) + " |",
                  "|---:|---:|---|" + "---:|---:|" * len(names)]
        for r in searched:
            search = r["stages"]["search"]
            lines.append(f"| {r['rows']:,} | {search['keys_bytes'] / 1e9:.1f} | {search['page_cache']} | " + " | ".join(
                f"{search['strategies'][n]['queries_per_second']:,.1f} | {search['strategies'][n]['agreement_with_exact_ranking']:.3f}"
                if n in search["strategies"] else "- | -" for n in names) + " |")
    lines += ["", "Peak anonymous memory of each stage, GiB (file-backed pages of memory maps in brackets):", "",
              "| rows | " + " | ".join(STAGES) + " |", "|---:|" + "---:|" * len(STAGES)]
    for r in results["sizes"]:
        lines.append(f"| {r['rows']:,} | " + " | ".join(
            f"{gib(r['stages'][s]['peak_anon_bytes'])} ({gib(r['stages'][s]['peak_file_bytes'])})" for s in STAGES) + " |")
    for label, t in results["plan"]["targets"].items():
        lines += ["", f"## {label}: {t['rows']:,} rows", "",
                  "Disk: " + ", ".join(f"{k} {v:,.1f} GB" for k, v in t["disk_gb"].items()) + ".", "",
                  "RAM: " + ", ".join(f"{k} {v:,.1f} GB" for k, v in t["ram_gb"].items()) + ".", "",
                  "| stage | this CPU, hours | one H100, hours | 8 H100, hours |", "|---|---:|---:|---:|"]
        for k, v in t["cpu_hours_2_cores"].items():
            lines.append(f"| {k} | {v:,.1f} | | |")
        for k, v in t["h100_hours_1"].items():
            lines.append(f"| {k} | | {v:,.2f} | {t['h100_hours_8'][k]:,.2f} |")
        lines += ["", f"Base + memory vs kNN-LM (IVFPQ, nprobe {results['settings']['probe']}, this CPU, fitted; "
                      "SmolLM2-135M's base and memory cost per token, the search's scaled to this width): "
                      f"{t['memory_tokens_per_second_cpu']:,.1f} vs {t['knnlm_tokens_per_second_cpu']:,.2f} tokens/s, "
                      f"**{t['memory_speedup_over_knnlm_cpu']:,.1f}x**."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["rows"] for r in results["sizes"]]
    fig, (rates, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for stage, key, label in (("write", "rows_per_second", "datastore write rows/s"),
                              ("index", "add_rows_per_second", "index add rows/s"),
                              ("train", "rows_per_second", "memory training rows/s"),
                              ):
        rates.plot(sizes, [r["stages"][stage][key] for r in results["sizes"]], "o-", label=label)
    rates.plot(sizes, [search_rate(r) for r in results["sizes"]], "o-", label="kNN search queries/s, exact ranking")
    if all("strategies" in r["stages"]["search"] for r in results["sizes"]):
        rates.plot(sizes, [search_rate(r, FAISS_RANKING) for r in results["sizes"]], "o:",
                   label="kNN search queries/s, FAISS's ranking")
    base = results["plan"]["base_seconds_per_token"]
    rates.plot(sizes, [1 / (base + r["per_token"]["knn_search"]) for r in results["sizes"]], "o--", label="kNN-LM tokens/s")
    rates.plot(sizes, [1 / (base + r["per_token"]["memory"]) for r in results["sizes"]], "o--", label="base + memory tokens/s")
    rates.set(xscale="log", yscale="log", xlabel="datastore rows", ylabel="rate", title="Rates as the datastore grows")
    rates.legend(fontsize=8)
    for stage in STAGES:
        memory.plot(sizes, [r["stages"][stage]["peak_anon_bytes"] / 2 ** 30 for r in results["sizes"]], "o-", label=stage)
    memory.set(xscale="log", xlabel="datastore rows", ylabel="GiB", title="Peak anonymous memory per stage")
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
