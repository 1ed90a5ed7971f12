"""Benchmark the kNN search (IVFPQ at several nprobe against exact search) and the kNN-LM's speed.

    python -m benchmarks.bench_knn                          # synthetic 200k x 576 datastore, tiny GPT-2
    python -m benchmarks.bench_knn --dstore_path DSTORE     # search part on a real datastore
    python -m benchmarks.bench_knn --model_name_or_path M --dataset_name D --lm_dstore_path DS   # real kNN-LM

Part 1 searches the same queries (random rows of the datastore, as in the kNN-target search) with an
exact IndexFlatL2 and with IndexIVFPQ at each nprobe: queries/s and recall@k against the exact result,
side by side, for each k, each with FAISS's own ranking and with the exact ranking (the default: the
index's candidates re-ranked by exact distance to the stored keys), which shows what the exact ranking
costs; plus rows/s of the whole target computation (search + sparse aggregation), both ways.
Part 2 evaluates the base LM and the kNN-LM on the same split: tokens/s of each. Without a model it
builds a tiny random GPT-2 over the embedded corpus (utils/embedded_corpus/) and its datastore.

Writes ``knn_search.json``, ``knn_search.md`` and ``knn_search.png`` (``--name``) to --output_dir, with the machine
(CPU, cores, load average, FAISS and torch versions).
"""

from __future__ import annotations

import utils.openmp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch and FAISS load)

# isort: split

import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import candidate_count, load_index
from knn_utils.knn_targets import SearchJob, TargetSettings, search_rows
from utils.artifacts.datastore import DatastoreWriter, load_datastore
from utils.cli import parse_args, run, setup_logging
from utils.distributed import process_state
from utils.environment import machine
from utils.io import write_json

logger = logging.getLogger(__name__)


@dataclass
class BenchArguments:
    """What to benchmark and where to write the results."""

    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where the results go."})
    name: str = field(default="knn_search", metadata={"help": "Base name of the result files: NAME.json, NAME.md, NAME.png."})
    work_dir: str | None = field(default=None, metadata={"help": "Scratch directory (default: a temporary one, deleted)."})
    dstore_path: str | None = field(default=None, metadata={"help": "A real datastore for part 1 (default: synthetic)."})
    rows: int = field(default=200_000, metadata={"help": "Rows of the synthetic datastore."})
    dim: int = field(default=576, metadata={"help": "Key dimension of the synthetic datastore (576: SmolLM2-135M)."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic data and of the query sample."})
    num_queries: int = field(default=2000, metadata={"help": "Queries per measurement."})
    ks: str = field(default="64,1024", metadata={"help": "Comma-separated k values (64: the real run's; 1024: the paper's)."})
    probes: str = field(default="1,4,16,32,64", metadata={"help": "Comma-separated nprobe values for IVFPQ."})
    ncentroids: int = field(default=1024, metadata={"help": "IVF lists of the benchmarked index."})
    code_size: int = field(default=64, metadata={"help": "PQ sub-quantizers."})
    train_size: int = field(default=100_000, metadata={"help": "Training sample of the index."})
    repeats: int = field(default=3, metadata={"help": "Timed repetitions per measurement (the median is reported)."})
    rerank_device: str | None = field(
        default=None, metadata={"help": "Run the exact ranking in torch on this device (e.g. cuda) instead of the CPU kernel."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Part 2: a real base model (else a tiny random GPT-2)."})
    gguf_file: str | None = field(default=None, metadata={"help": "Part 2: GGUF file inside --model_name_or_path."})
    dataset_name: str | None = field(default=None, metadata={"help": "Part 2: preprocessed dataset of the real model."})
    lm_dstore_path: str | None = field(default=None, metadata={"help": "Part 2: datastore of the real model (with its index)."})
    eval_subset: str = field(default="test", metadata={"help": "Part 2: split to evaluate."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Part 2: evaluate only the first N windows."})
    knnlm_k: int = field(default=1024, metadata={"help": "Part 2: neighbours per token."})
    knnlm_probe: int = field(default=32, metadata={"help": "Part 2: nprobe of an IVFPQ index."})
    skip_knnlm: bool = field(default=False, metadata={"help": "Run part 1 only."})
    note: str | None = field(default=None, metadata={"help": "Free text recorded with the results (e.g. how a real datastore was made)."})


def machine_info() -> dict:
    """The machine the numbers were measured on (utils.environment.machine), with FAISS's threads and the load."""
    return {**machine(), "faiss_threads": faiss.omp_get_max_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()}


# ---------------------------------------------------------------------------------------------------
# Part 1: search


def write_synthetic_datastore(path: Path, rows: int, dim: int, seed: int, chunk_rows: int = 10_000) -> None:
    """Hidden-state-like keys: 1000 Gaussian clusters with a shared 32-d low-rank spread, float16 (rows, dim)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    basis = (rng.standard_normal((32, dim)) / np.sqrt(32)).astype(np.float32)
    num_chunks = -(-rows // chunk_rows)
    writer = DatastoreWriter(str(path), num_rows=rows, dim=dim, num_windows=num_chunks, state=process_state(),
                             identity={"model": {"synthetic": seed}, "architecture": "synthetic", "layer": 0,
                                       "tokenizer_fingerprint": "synthetic", "dataset": {"tokens_sha256": "synthetic"}})
    for c in range(num_chunks):
        n = min(chunk_rows, rows - c * chunk_rows)
        keys = (centres[rng.integers(1000, size=n)] + 0.5 * rng.standard_normal((n, 32), dtype=np.float32) @ basis
                + 0.1 * rng.standard_normal((n, dim), dtype=np.float32))  # (n, dim)
        writer.write(np.arange(c * chunk_rows, c * chunk_rows + n), keys, rng.integers(50_000, size=n), np.array([c]))
    writer.finish()


def previous_ranking(keys: torch.Tensor, queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The exact ranking as the code before issue 25 computed it (torch, gathered keys in 4 MB blocks): the same
    formula, the baseline of the re-ranking's speed and of its neighbours. Returns the rows (n, k)."""
    rows_t = torch.from_numpy(rows).sort(dim=1).values
    queries_t, dists = torch.from_numpy(queries), torch.empty(rows_t.shape)
    step = max(1, (1 << 22) // (6 * rows.shape[1] * keys.shape[1]))
    for begin in range(0, len(rows_t), step):
        stored = keys[rows_t[begin : begin + step].clamp(min=0)].float()  # (step, c, d)
        dists[begin : begin + step] = stored.sub_(queries_t[begin : begin + step, None, :]).square_().sum(dim=2)
    order = dists.masked_fill_(rows_t < 0, float("inf")).sort(dim=1, stable=True).indices[:, :k]
    return rows_t.gather(1, order).numpy()


def timed_rankings(index, queries: np.ndarray, k: int, repeats: int) -> tuple[dict, dict, dict]:
    """Median seconds of each ranking (see `RANKINGS`) over ``repeats`` rounds that alternate them, so that both
    see the same machine load; the ids (n, k) each found; and the exact re-ranking step alone: its seconds, those of
    the previous code, and how many neighbours differ between the two."""
    for exact in RANKINGS.values():
        index.search(queries[:50], k, exact=exact)  # warm-up
    seconds, ids = {name: [] for name in RANKINGS}, {}
    for _ in range(repeats):
        for name, exact in RANKINGS.items():
            start = time.perf_counter()
            ids[name] = index.search(queries, k, exact=exact).ids
            seconds[name].append(time.perf_counter() - start)
    candidates = index.search(queries, candidate_count(k), exact=False).ids  # what the exact ranking re-ranks
    rerank = {"seconds": [], "previous_seconds": []}
    for _ in range(repeats):
        start = time.perf_counter()
        found = index.rank_exactly(queries, candidates, k).ids
        rerank["seconds"].append(time.perf_counter() - start)
        start = time.perf_counter()
        previous = previous_ranking(index.keys, queries, candidates, k)
        rerank["previous_seconds"].append(time.perf_counter() - start)
    rerank = {name: statistics.median(s) for name, s in rerank.items()}
    rerank["neighbours_differing_from_previous"] = int((found != previous).sum())
    return {name: statistics.median(s) for name, s in seconds.items()}, ids, rerank


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact k nearest found among the approximate k, (n, k) each."""
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]))


RANKINGS = {"faiss": False, "exact": True}  # KnnIndex.search(exact=...): the index's own k nearest, or the exact ranking


def bench_search(args: BenchArguments, work: Path) -> dict:
    """Part 1: exact vs IVFPQ at each nprobe, for each k, each with FAISS's ranking and with the exact ranking."""
    dstore = Path(args.dstore_path) if args.dstore_path else work / "synthetic_dstore"
    if not args.dstore_path:
        start = time.perf_counter()
        write_synthetic_datastore(dstore, args.rows, args.dim, args.seed)
        logger.info("Synthetic datastore of %d x %d written in %.1f s", args.rows, args.dim, time.perf_counter() - start)
    datastore = load_datastore(str(dstore))
    flat_meta = build_index(str(dstore), str(work / "flat"), IndexSettings(index_type="flat"))
    ivf_meta = build_index(str(dstore), str(work / "ivfpq"), IndexSettings(
        index_type="ivfpq", ncentroids=args.ncentroids, code_size=args.code_size, train_size=args.train_size))
    rows = np.sort(np.random.default_rng(args.seed).choice(datastore.num_rows, args.num_queries, replace=False))
    queries = np.asarray(datastore.keys[rows], dtype=np.float32)  # (num_queries, d)
    device = {"rerank_device": args.rerank_device}
    indexes = [("exact (IndexFlatL2)", None, load_index(work / "flat", datastore, **device))]
    indexes += [("IVFPQ", probe, load_index(work / "ivfpq", datastore, probe=probe, **device))
                for probe in map(int, args.probes.split(","))]
    results = []
    for k in (int(x) for x in args.ks.split(",")):
        truth = None  # the exact k nearest: the exact index with the exact ranking, measured first
        for method, probe, index in indexes:
            seconds, found, rerank = timed_rankings(index, queries, k, args.repeats)
            truth = found["exact"] if truth is None else truth
            results.append({"method": method, "nprobe": probe, "k": k, "rerank_seconds": rerank["seconds"],
                            "rerank_previous_seconds": rerank["previous_seconds"],
                            "neighbours_differing_from_previous": rerank["neighbours_differing_from_previous"],
                            **{f"queries_per_second_{name}": len(queries) / seconds[name] for name in RANKINGS},
                            **{f"recall_at_k_{name}": recall(found[name], truth) for name in RANKINGS}})
            logger.info("%s nprobe=%s k=%d: %.0f queries/s with FAISS's ranking, %.0f with the exact one (re-ranking %.2f s); "
                        "recall@k %.3f / %.3f", method, probe, k, results[-1]["queries_per_second_faiss"],
                        results[-1]["queries_per_second_exact"], rerank["seconds"], results[-1]["recall_at_k_faiss"],
                        results[-1]["recall_at_k_exact"])
    return {"datastore": {"path": args.dstore_path or "synthetic", "rows": datastore.num_rows, "dim": datastore.dim},
            "index": {"ncentroids": args.ncentroids, "code_size": args.code_size, "nbits": 8,
                      "train_size": ivf_meta["settings"]["train_size"], "train_seconds": ivf_meta["seconds"]["train"],
                      "add_seconds": ivf_meta["seconds"]["add"], "bytes": ivf_meta["index_bytes"],
                      "flat_bytes": flat_meta["index_bytes"]},
            "num_queries": len(queries), "search": results,
            "targets": [run for index_type in ("flat", "ivfpq")
                        for run in bench_targets(work, datastore, len(queries), index_type, args.repeats, args.rerank_device)]}


def bench_targets(work: Path, datastore, num_rows: int, index_type: str, repeats: int,
                  rerank_device: str | None = None) -> list[dict]:
    """Rows/s of the whole kNN-target computation over the first rows (search k=1024, at nprobe 32 for IVFPQ, +
    aggregation) with FAISS's ranking and with the exact ranking (``recompute_dists``, the default), alternated over
    ``repeats`` rounds (medians); and whether the exact ranking's targets are byte-identical at 1/8 of the batch."""
    index = load_index(work / index_type, datastore, probe=32 if index_type == "ivfpq" else None,
                       rerank_device=rerank_device)

    def targets(recompute_dists: bool, batch_size: int = num_rows):
        settings = TargetSettings(k=1024, probe=32, batch_size=batch_size, recompute_dists=recompute_dists)
        job = SearchJob(index=index, datastore=datastore, queries=datastore, settings=settings, exclude_self=True)
        start, cpu = time.perf_counter(), time.process_time()
        return search_rows(job, 0, num_rows), time.perf_counter() - start, time.process_time() - cpu

    seconds, cpu_seconds, found = {True: [], False: []}, {True: [], False: []}, {}
    for _ in range(repeats):
        for recompute_dists in (False, True):
            found[recompute_dists], spent, cpu = targets(recompute_dists)
            seconds[recompute_dists].append(spent)
            cpu_seconds[recompute_dists].append(cpu)
    smaller = targets(True, max(1, num_rows // 8))[0]
    identical = all(getattr(smaller, name).tobytes() == getattr(found[True], name).tobytes()
                    for name in ("counts", "token_ids", "probs"))
    runs = []
    for recompute_dists in (False, True):
        rate = num_rows / statistics.median(seconds[recompute_dists])
        logger.info("kNN targets, %s index, recompute_dists %s: %.0f rows/s", index_type, recompute_dists, rate)
        runs.append({"index": index_type, "k": 1024, "nprobe": index.nprobe, "knn_temp": TargetSettings().knn_temp,
                     "recompute_dists": recompute_dists, "rows": num_rows, "rows_per_second": rate,
                     "cpu_seconds_per_row": statistics.median(cpu_seconds[recompute_dists]) / num_rows,
                     "mean_targets_per_row": float(found[recompute_dists].counts.mean()),
                     **({"identical_at_an_eighth_of_the_batch": identical} if recompute_dists else {})})
    return runs


# ---------------------------------------------------------------------------------------------------
# Part 2: kNN-LM speed


def tiny_lm_setup(work: Path) -> tuple[dict, str, str]:
    """A random 4-layer GPT-2 over the embedded corpus, with the datastore of its train split and an index."""
    import torch

    import train_base
    from utils.arguments import ModelArguments
    from utils.embedded_corpus import write_corpus
    from utils.modeling import load_causal_lm, load_tokenizer
    from utils.preprocess_dataset import main as preprocess

    corpus = work / "corpus"
    write_corpus(corpus)
    dataset = work / "dataset"
    preprocess(["--tokenizer_path", str(corpus / "tokenizer"), "--train_file", str(corpus / "train.txt"),
                "--test_file", str(corpus / "test.txt"), "--output_dir", str(dataset), "--block_size", "256", "--stride", "128"])
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(corpus / "tokenizer"))
    model = load_causal_lm(ModelArguments(model_type="gpt2", tokenizer_name=str(corpus / "tokenizer"),
                                          config_overrides="n_layer=4,n_embd=128,n_head=4,n_positions=256"), len(tokenizer))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    dstore = work / "lm_dstore"
    train_base.main(["--model_name_or_path", str(work / "model"), "--dataset_name", str(dataset), "--do_eval",
                     "--eval_subset", "train", "--save_knnlm_dstore", "--dstore_dir", str(dstore),
                     "--per_device_eval_batch_size", "8", "--output_dir", str(work / "dstore_eval"), "--report_to", "none"])
    model_args = {"model_name_or_path": str(work / "model")}
    return model_args, str(dataset), str(dstore)


def bench_knnlm(args: BenchArguments, work: Path) -> dict:
    """Part 2: base LM and kNN-LM tokens/s over the same split (exact and IVFPQ index)."""
    import train_base
    from knn_utils.knnlm import KnnLMArguments, evaluate_knnlm
    from utils.arguments import DataArguments, ModelArguments

    if args.model_name_or_path:
        model_args, dataset, dstore = {"model_name_or_path": args.model_name_or_path, "gguf_file": args.gguf_file}, \
            args.dataset_name, args.lm_dstore_path
    else:
        model_args, dataset, dstore = tiny_lm_setup(work)
    rows = load_datastore(dstore).num_rows
    flat_index, ivf_index = work / "lm_flat", work / "lm_ivfpq"
    build_index(dstore, str(flat_index), IndexSettings(index_type="flat"))
    ncentroids = max(16, min(1024, rows // 100))  # about 100 keys per list
    dim = load_datastore(dstore).dim
    build_index(dstore, str(ivf_index), IndexSettings(index_type="ivfpq", ncentroids=ncentroids,
                                                      code_size=32 if dim % 32 == 0 else 16, train_size=rows))
    eval_flags = ["--dataset_name", dataset, "--do_eval", "--eval_subset", args.eval_subset, "--report_to", "none",
                  "--per_device_eval_batch_size", "8", "--output_dir", str(work / "base_eval")]
    eval_flags += ["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else []
    model_flags = [f for key, value in model_args.items() if value for f in (f"--{key}", value)]
    base = train_base.main([*model_flags, *eval_flags])
    runs = {"base": {"tokens_per_second": base["eval_tokens_per_second"], "perplexity": base["perplexity"]}}
    data_args = DataArguments(dataset_name=dataset, eval_subset=args.eval_subset, max_eval_samples=args.max_eval_samples)
    for name, index_path, probe in (("kNN-LM exact", flat_index, None), (f"kNN-LM IVFPQ nprobe {args.knnlm_probe}", ivf_index,
                                                                          min(args.knnlm_probe, ncentroids))):
        metrics = evaluate_knnlm(ModelArguments(**model_args), data_args, KnnLMArguments(
            dstore_dir=dstore, output_dir=str(work / "knnlm"), index_path=str(index_path), k=args.knnlm_k, probe=probe,
            per_device_eval_batch_size=8))
        runs[name] = {"tokens_per_second": metrics["eval_tokens_per_second"], "perplexity": metrics["perplexity"],
                      "base_perplexity_same_pass": metrics["base_perplexity"], "knn_seconds": metrics["knn_seconds"],
                      "eval_seconds": metrics["eval_seconds"]}
    return {"model": model_args if args.model_name_or_path else "random GPT-2, 4 layers, width 128 (embedded corpus)",
            "datastore_rows": rows, "ivfpq_ncentroids": ncentroids, "k": args.knnlm_k, "eval_subset": args.eval_subset,
            "eval_tokens": base["eval_tokens"], "runs": runs}


# ---------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict) -> str:
    """The results as Markdown tables."""
    search, machine = results["search"], results["machine"]
    lines = [
        "# kNN search benchmark", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['faiss_threads']} FAISS threads), "
        f"load average at start {machine['load_average_at_start']}; FAISS {machine['faiss']}, torch {machine['torch']}.", "",
        *([results["arguments"]["note"], ""] if results["arguments"].get("note") else []),
        f"Datastore: {search['datastore']['path']}, {search['datastore']['rows']} x {search['datastore']['dim']} float16 keys; "
        f"{search['num_queries']} queries (random datastore rows). IVFPQ: {search['index']['ncentroids']} lists, "
        f"{search['index']['code_size']} x 8-bit codes, trained on {search['index']['train_size']} keys in "
        f"{search['index']['train_seconds']:.1f} s, keys added in {search['index']['add_seconds']:.1f} s, "
        f"{search['index']['bytes'] / 1e6:.1f} MB (exact index {search['index']['flat_bytes'] / 1e6:.1f} MB).", "",
        "Each search ranks neighbours two ways: FAISS's own k nearest (`exact=False`, `--recompute_dists False`), or "
        "the exact ranking, the default (the index's k + margin candidates re-ranked by exact float32 distance to the "
        "stored keys, ties to the lower row; `knn_utils.index_search.KnnIndex.search`), here "
        f"{'in torch on ' + results['arguments']['rerank_device'] if results['arguments'].get('rerank_device') else 'by the CPU kernel (knn_utils/exact_ranking.py)'}. "
        "Recall is against the exact index with the exact ranking. \"The same, previous code\": the ranking before issue 25 "
        "(torch, 4 MB blocks) on the same candidates; the neighbours column counts those it ranks differently.", "",
        "| method | nprobe | k | queries/s, FAISS ranking | queries/s, exact ranking | time added | re-ranking alone, "
        "ms per 1000 queries | the same, previous code | neighbours differing from the previous code | "
        "recall@k, FAISS ranking | recall@k, exact ranking |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in search["search"]:
        added = r["queries_per_second_faiss"] / r["queries_per_second_exact"] - 1
        per_1000 = 1e6 / search["num_queries"]
        lines.append(f"| {r['method']} | {r['nprobe'] if r['nprobe'] is not None else '-'} | {r['k']} | "
                     f"{r['queries_per_second_faiss']:.0f} | {r['queries_per_second_exact']:.0f} | {added:+.0%} | "
                     f"{per_1000 * r['rerank_seconds']:.0f} | {per_1000 * r['rerank_previous_seconds']:.0f} | "
                     f"{r['neighbours_differing_from_previous']} of {search['num_queries'] * r['k']:,} | "
                     f"{r['recall_at_k_faiss']:.3f} | {r['recall_at_k_exact']:.3f} |")
    lines += ["", "Whole kNN-target computation (search k=1024 + sparse aggregation, knn_temp "
                  f"{search['targets'][0]['knn_temp']}, {search['targets'][0]['rows']} rows in one batch):", "",
              "| index | nprobe | rows/s, FAISS ranking | rows/s, exact ranking (`--recompute_dists True`) | "
              "time ratio, exact / FAISS | CPU time ratio | exact ranking's targets byte-identical at 1/8 of the batch | "
              "stored tokens per row |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    for index_type in dict.fromkeys(t["index"] for t in search["targets"]):
        runs = {t["recompute_dists"]: t for t in search["targets"] if t["index"] == index_type}
        lines.append(f"| {index_type} | {runs[True]['nprobe'] or '-'} | {runs[False]['rows_per_second']:.0f} | "
                     f"{runs[True]['rows_per_second']:.0f} | "
                     f"{runs[False]['rows_per_second'] / runs[True]['rows_per_second']:.2f} | "
                     f"{runs[True]['cpu_seconds_per_row'] / runs[False]['cpu_seconds_per_row']:.2f} | "
                     f"{'yes' if runs[True].get('identical_at_an_eighth_of_the_batch') else 'no'} | "
                     f"{runs[True]['mean_targets_per_row']:.1f} |")
    if "knnlm" in results:
        knnlm = results["knnlm"]
        base_speed = knnlm["runs"]["base"]["tokens_per_second"]
        lines += ["", "## kNN-LM speed", "",
                  f"Model: {knnlm['model']}; datastore {knnlm['datastore_rows']} rows; k={knnlm['k']}; "
                  f"{knnlm['eval_tokens']} tokens of {knnlm['eval_subset']}.", "",
                  "| run | tokens/s | slowdown vs base | perplexity |", "|---|---:|---:|---:|"]
        for name, run_ in knnlm["runs"].items():
            lines.append(f"| {name} | {run_['tokens_per_second']:.0f} | {base_speed / run_['tokens_per_second']:.2f}x | "
                         f"{run_['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Queries/s and recall@k against nprobe, one line per k, exact search as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    search = results["search"]["search"]
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({r["k"] for r in search}):
        ivf = [r for r in search if r["k"] == k and r["nprobe"] is not None]
        exact = next(r for r in search if r["k"] == k and r["nprobe"] is None)
        color = None
        for ranking, style, exact_style in (("faiss", "o-", "--"), ("exact", "s:", "-.")):
            line, = speed.plot([r["nprobe"] for r in ivf], [r[f"queries_per_second_{ranking}"] for r in ivf], style,
                               color=color, label=f"IVFPQ k={k}, {ranking} ranking")
            color = line.get_color()
            speed.axhline(exact[f"queries_per_second_{ranking}"], ls=exact_style, color=color,
                          label=f"exact index k={k}, {ranking} ranking")
            quality.plot([r["nprobe"] for r in ivf], [r[f"recall_at_k_{ranking}"] for r in ivf], style, color=color,
                         label=f"k={k}, {ranking} ranking")
    speed.set(xscale="log", yscale="log", xlabel="nprobe", ylabel="queries/s", title="Search speed")
    quality.set(xscale="log", xlabel="nprobe", ylabel="recall@k vs exact", ylim=(0, 1.02), title="Recall")
    speed.legend(fontsize=8)
    quality.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_args((BenchArguments,), argv)
    logger.info("Arguments: %s", args)
    results = {"arguments": asdict(args), "machine": machine_info()}
    if args.work_dir is not None:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)  # the scratch directory is made inside it
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        work = Path(scratch)
        results["search"] = bench_search(args, work)
        if not args.skip_knnlm:
            results["knnlm"] = bench_knnlm(args, work)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / f"{args.name}.json", results)
    (output / f"{args.name}.md").write_text(markdown(results))
    plot(results, output / f"{args.name}.png")
    print(markdown(results))
    return results


if __name__ == "__main__":
    run(main)
