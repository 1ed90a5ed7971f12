"""The capacity plan: every stage of the pipeline timed on datastores of growing size, and extrapolated.

    python -m benchmarks.bench_scale                                  # 0.2M, 2M and 20M rows (about 1 h 30 on 2 cores)
    python -m benchmarks.bench_scale --sizes 50000 200000 --name bench_scale_small   # a few minutes

1. **Seed** (once, cached in --work_dir): SmolLM2-135M (``../shared/data``) writes a real datastore over the
   first --seed_chars characters of WikiText-2 train through the pipeline's own commands
   (``utils.preprocess_dataset``, ``train_base --save_knnlm_dstore``), and exact kNN targets of its rows
   (``knn_utils.build_index --index_type flat``, ``knn_utils.saveKNNMulti``).
2. For each size N, each stage runs in its own process, so that its peak memory is its own:

   - ``write``: a datastore of N rows through `DatastoreWriter` (the class train_base writes with), window by
     window. Row r is seed row ``r % S`` plus Gaussian noise of --noise times each dimension's standard
     deviation, at the real width 576; its value is the seed row's. The writer's rows/s exclude generating the
     noise (reported separately) and include the checksums and the rename.
   - ``index``: ``knn_utils.index_build.build_index``, IVFPQ with the same settings at every size
     (--ncentroids lists, --code_size bytes, a --train_size training sample), so training time stays flat and
     adding grows with N.
   - ``search``: `KnnIndex.search` of --num_queries datastore rows, k --k at nprobe --probe, leaving out each
     query's own row: queries/s of the exact ranking the kNN targets use (the default) and of the other ways of
     ranking the candidates when the keys do not fit in memory (benchmarks/scale_search.py).
   - ``targets``: kNN targets for all N rows, made by repeating the seed's real targets (row r gets seed row
     ``r % S``'s), written through the same chunk files and merge as ``saveKNNMulti``. Searching 20M rows at
     k 1024 would take this machine days; the search stage measures its rate instead.
   - ``train``: ``train_mlpmem_offline`` for --train_steps steps (batch --train_batch) of the real run's memory
     (2 SwiGLU blocks, 33M parameters): rows/s from its own log, over the whole datastore's row order.
   - ``knnlm`` and ``memory``: ``knn_utils.knnlm`` (k --k, nprobe --probe, the IVFPQ index of this size) and
     ``evaluate_joint`` (the memory just trained) on the same first --eval_windows test windows: tokens/s.

   Every stage records its wall time, its peak anonymous memory (RssAnon: what the process itself holds) and
   its peak file-backed resident memory (RssFile: pages of memory-mapped files, which the kernel reclaims
   under pressure), sampled every 50 ms; the anonymous memory includes child processes (DataLoader workers).
3. Fitted rates (benchmarks/scale_plan.py; writing, adding and training: the median over the sizes, their
   work per row does not depend on N; searching: power laws, rate = a N^b) extrapolate to WikiText-103 (103M
   rows) at SmolLM2's width (576) and GPT2-large's (1280), and to a 500M-token datastore: disk, RAM and hours
   per stage on this CPU and, for the stages the H100 run of docs/results.md measured, on one GPU and on 8;
   and the memory's speed-up over the kNN-LM there.

Writes NAME.json, NAME.md and NAME.png to --output_dir with the machine recorded. The work directory holds
up to 2 bytes x 576 x N of keys (23 GB at 20M rows); each size's files are deleted once measured unless
--keep.
"""

from __future__ import annotations

import utils.openmp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch and FAISS load)

# isort: split

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.scale_plan import STAGES, ScaleArguments, gib, markdown, plan, plot
from benchmarks.scale_search import stage_search
from utils.cli import UsageError, parse_args, run, setup_logging
from utils.environment import machine
from utils.io import read_json, write_json

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
MODEL = SHARED / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW_ROWS = 65_536  # rows per DatastoreWriter window in the write stage


# ---------------------------------------------------------------------------------------------------
# Peak memory of a stage


class PeakMemory:
    """Peak RssAnon of this process and its children (e.g. DataLoader workers) and peak RssFile of this process
    (bytes), sampled from /proc in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _status(pid: int | str) -> dict[str, int]:
        try:
            with open(f"/proc/{pid}/status") as f:
                return {line.split(":", 1)[0]: int(line.split()[1]) * 1024 for line in f
                        if line.startswith(("RssAnon:", "RssFile:"))}
        except (OSError, ValueError):  # the process ended meanwhile
            return {}

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        found, todo = [], [pid]
        while todo:
            parent = todo.pop()
            for children in Path(f"/proc/{parent}/task").glob("*/children"):
                try:
                    kids = [int(k) for k in children.read_text().split()]
                except OSError:
                    continue
                found += kids
                todo += kids
        return found

    def _sample(self) -> None:
        own = self._status("self")
        anon = own.get("RssAnon", 0) + sum(self._status(pid).get("RssAnon", 0) for pid in self._descendants(os.getpid()))
        self.peak["RssAnon"] = max(self.peak["RssAnon"], anon)
        self.peak["RssFile"] = max(self.peak["RssFile"], own.get("RssFile", 0))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------------------------------
# The seed: a real SmolLM2 datastore and its exact kNN targets


def sh(*cmd: str) -> None:
    logger.info("$ %s", " ".join(cmd))
    subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def make_seed(args: ScaleArguments, work: Path) -> Path:
    """The seed directory: dataset/, dstore/ (real keys) and knn_targets/ (exact, k 64 as the real run)."""
    seed = work / "seed"
    text = SHARED / "wikitext-2"
    if not (seed / "dataset" / "meta.json").is_file():
        sh("utils.preprocess_dataset", "--tokenizer_path", str(MODEL), "--gguf_file", GGUF,
           "--train_file", str(text / "wiki.train.tokens"), "--validation_file", str(text / "wiki.valid.tokens"),
           "--test_file", str(text / "wiki.test.tokens"), "--max_chars", str(args.seed_chars),
           "--block_size", "512", "--stride", "512", "--output_dir", str(seed / "dataset"))
    if not (seed / "dstore" / "meta.json").is_file():
        sh("train_base", "--model_name_or_path", str(MODEL), "--gguf_file", GGUF, "--dataset_name", str(seed / "dataset"),
           "--do_eval", "--eval_subset", "train", "--per_device_eval_batch_size", "4", "--report_to", "none",
           "--output_dir", str(seed / "eval_train"), "--save_knnlm_dstore", "--dstore_dir", str(seed / "dstore"))
    if not (seed / "knn_targets" / "meta.json").is_file():
        if not (seed / "dstore" / "index" / "meta.json").is_file():
            sh("knn_utils.build_index", "--dstore_path", str(seed / "dstore"), "--index_type", "flat")
        sh("knn_utils.saveKNNMulti", "--dstore_path", str(seed / "dstore"), "--output_path", str(seed / "knn_targets"),
           "--k", "64", "--knn_temp", "4", "--ignore_first", "True")
    return seed


# ---------------------------------------------------------------------------------------------------
# The stages (each runs in its own process: python -m benchmarks.bench_scale --stage NAME ...)


def stage_write(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    from utils.artifacts.datastore import DatastoreWriter, load_datastore
    from utils.distributed import process_state

    source = load_datastore(str(seed / "dstore"))
    seed_keys = np.asarray(source.keys, dtype=np.float32)  # (S, d): small
    seed_vals = np.asarray(source.vals)
    sigma = (args.noise * seed_keys.std(axis=0)).astype(np.float32)  # (d,)
    dropped = {"kind", "format_version", "rows", "dim", "windows", "keys_sha256", "vals_sha256", "checksums",
               "key_dtype", "val_dtype", "seconds"}
    identity = {k: v for k, v in source.meta.items() if k not in dropped}
    identity["synthetic"] = {"seed_rows": source.num_rows, "noise": args.noise, "seed_dstore": str(source.path)}
    num_windows = math.ceil(rows / WINDOW_ROWS)
    writer = DatastoreWriter(str(size_dir / "dstore"), rows, source.dim, num_windows, identity, process_state())
    rng = np.random.default_rng(0)
    generate_seconds = write_seconds = 0.0
    for w in range(num_windows):
        start = time.perf_counter()
        block = np.arange(w * WINDOW_ROWS, min((w + 1) * WINDOW_ROWS, rows))
        keys = seed_keys[block % len(seed_keys)] + sigma * rng.standard_normal((len(block), source.dim), dtype=np.float32)
        vals = seed_vals[block % len(seed_vals)]
        middle = time.perf_counter()
        writer.write(block, keys, vals, np.array([w]))
        generate_seconds += middle - start
        write_seconds += time.perf_counter() - middle
    start = time.perf_counter()
    writer.finish()
    finish_seconds = time.perf_counter() - start
    return {"generate_seconds": generate_seconds, "write_seconds": write_seconds, "finish_seconds": finish_seconds,
            "rows_per_second": rows / (write_seconds + finish_seconds),
            "disk_bytes": sum(f.stat().st_size for f in (size_dir / "dstore").iterdir())}


def stage_index(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    from knn_utils.index_build import IndexSettings, build_index

    settings = IndexSettings(index_type="ivfpq", ncentroids=args.ncentroids, code_size=args.code_size,
                             train_size=args.train_size, probe=args.probe)
    start = time.perf_counter()
    meta = build_index(str(size_dir / "dstore"), settings=settings, show_progress=False)
    return {"seconds": time.perf_counter() - start, "train_seconds": meta["seconds"]["train"],
            "add_seconds": meta["seconds"]["add"], "add_rows_per_second": rows / meta["seconds"]["add"],
            "index_bytes": meta["index_bytes"]}


def stage_targets(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    """Real seed targets repeated over N rows, through the chunk files and merge of saveKNNMulti."""
    from utils.artifacts.datastore import datastore_summary, load_datastore
    from utils.artifacts.knn_targets import FORMAT_VERSION, SparseRows, load_knn_targets, merge_chunks, write_chunk
    from utils.io import chunk_ranges

    datastore = load_datastore(str(size_dir / "dstore"), verify=False)
    source = load_knn_targets(seed / "knn_targets")
    offsets = np.asarray(source.offsets)
    token_ids, probs = np.asarray(source.token_ids), np.asarray(source.probs)
    staging = size_dir / "knn_targets.partial"
    shutil.rmtree(staging, ignore_errors=True)
    chunk_rows = 1 << 20
    start = time.perf_counter()
    for c, (begin, end) in enumerate(chunk_ranges(rows, chunk_rows)):
        seed_rows = np.arange(begin, end) % source.num_rows
        counts = offsets[seed_rows + 1] - offsets[seed_rows]  # (n,)
        first = np.repeat(offsets[seed_rows] - (np.cumsum(counts) - counts), counts)
        positions = first + np.arange(int(counts.sum()))
        write_chunk(staging, c, SparseRows(counts=counts, token_ids=token_ids[positions], probs=probs[positions]))
    counts = merge_chunks(staging, datastore, chunk_rows)
    summary = datastore_summary(datastore)
    meta = {"kind": "knn_targets", "format_version": FORMAT_VERSION, "datastore": summary, "queries": summary,
            **counts, "k": source.meta["k"], "knn_temp": source.meta["knn_temp"], "threshold": source.meta["threshold"],
            "synthetic": f"seed targets {source.path} repeated"}
    shutil.rmtree(staging / "chunks")
    write_json(staging / "meta.json", meta)
    os.replace(staging, size_dir / "knn_targets")
    return {"seconds": time.perf_counter() - start, "nnz": counts["nnz"],
            "disk_bytes": sum(f.stat().st_size for f in (size_dir / "knn_targets").iterdir())}


def stage_train(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    import train_mlpmem_offline

    out = size_dir / "memory"
    start = time.perf_counter()
    train_mlpmem_offline.main([
        "--knn_dstore_path", str(size_dir / "dstore"), "--knn_save_path", str(size_dir / "knn_targets"),
        "--output_dir", str(out), "--num_layers", "2", "--init_lm_head", "False", "--max_train_steps", str(args.train_steps),
        "--per_device_train_batch_size", str(args.train_batch), "--validation_rows", "0", "--checkpointing_steps", "no",
        "--logging_steps", "10", "--disable_tqdm", "True", "--overwrite_output_dir", "True"])
    seconds = time.perf_counter() - start
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["rows_per_second"] for r in logged if "rows_per_second" in r][1:]  # the first interval holds the warm-up
    if not rates:  # too few steps for two logging intervals: the whole run, start-up included
        rates = [args.train_steps * args.train_batch / seconds]
    return {"seconds": seconds, "rows_per_second": float(np.median(rates)), "steps": args.train_steps}


def eval_flags(seed: Path, args: ScaleArguments, out: Path) -> list[str]:
    return ["--model_name_or_path", str(MODEL), "--gguf_file", GGUF, "--dataset_name", str(seed / "dataset"),
            "--eval_subset", "test", "--max_eval_samples", str(args.eval_windows), "--per_device_eval_batch_size", "2",
            "--output_dir", str(out)]


def stage_knnlm(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    from knn_utils import knnlm

    metrics = knnlm.main([*eval_flags(seed, args, size_dir / "eval_knnlm"), "--dstore_dir", str(size_dir / "dstore"),
                          "--k", str(args.k), "--knn_temp", "16", "--lmbda", "0.25", "--probe", str(args.probe)])
    return {"tokens_per_second": metrics["eval_tokens_per_second"], "perplexity": metrics["perplexity"],
            "knn_seconds": metrics.get("knn_seconds")}


def stage_memory(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    import evaluate_joint

    metrics = evaluate_joint.main([*eval_flags(seed, args, size_dir / "eval_joint"),
                                   "--knn_generator_path", str(size_dir / "memory"), "--lmbda", "0.25"])
    return {"tokens_per_second": metrics["joint_tokens_per_second"], "base_tokens_per_second": metrics["base_tokens_per_second"]}


def per_token_costs(size_dir: Path, previous: dict | None = None) -> dict:
    """Seconds per scored token of the base forward, the kNN search and the memory (its forward and the
    interpolation), from the knnlm and evaluate_joint results of one size: the same tokens, so the memory's
    speed-up over the kNN-LM can be compared at one base cost, whatever the machine's load did to each run.
    A stage not run here (``--stages``) keeps its costs from ``previous`` (the same size in --reuse_results)."""
    costs = dict(previous or {})
    if (size_dir / "eval_knnlm" / "knnlm_results.json").is_file():
        knnlm = read_json(size_dir / "eval_knnlm" / "knnlm_results.json")
        costs.update({"tokens": knnlm["eval_tokens"], "knn_search": knnlm["knn_seconds"] / knnlm["eval_tokens"],
                      "base_in_knnlm": (knnlm["eval_seconds"] - knnlm["knn_seconds"]) / knnlm["eval_tokens"]})
    if (size_dir / "eval_joint" / "joint_results.json").is_file():
        joint = read_json(size_dir / "eval_joint" / "joint_results.json")
        costs.update({"base_in_joint": joint["base_seconds"] / joint["eval_tokens"],
                      "memory": (joint["memory_seconds"] + joint["interpolation_seconds"]) / joint["eval_tokens"]})
    return costs


STAGE_FUNCTIONS = {"write": stage_write, "index": stage_index, "search": stage_search, "targets": stage_targets,
                   "train": stage_train, "knnlm": stage_knnlm, "memory": stage_memory}


def run_stage(name: str, args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    """Run one stage here (in the stage's own process) and return its numbers with its peak memory."""
    start = time.perf_counter()
    with PeakMemory() as peak:
        result = STAGE_FUNCTIONS[name](args, seed, size_dir, rows)
    return {**result, "wall_seconds": time.perf_counter() - start, "load_average": os.getloadavg(),
            "peak_anon_bytes": peak.peak["RssAnon"],
            "peak_file_bytes": peak.peak["RssFile"]}


def launch_stage(name: str, args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    """`run_stage` in a new process (its peak memory is the stage's alone); returns its JSON."""
    result_file = size_dir / f"stage_{name}.json"
    if result_file.is_file():
        return read_json(result_file)
    settings = json.dumps(asdict(args))
    subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--_stage", name, "--_settings", settings,
                    "--_seed", str(seed), "--_size_dir", str(size_dir), "--_rows", str(rows)], cwd=REPO, check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return read_json(result_file)


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((ScaleArguments,), argv)
    if unknown := set(args.stages) - set(STAGES):
        raise UsageError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))}; choose among {', '.join(STAGES)}")
    if not (MODEL / GGUF).is_file():
        raise SystemExit(f"{MODEL / GGUF} not found: this benchmark needs ../shared/data (see its README)")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "settings": asdict(args), "sizes": []}
    seed = make_seed(args, work)
    from utils.artifacts.datastore import load_datastore
    results["seed_rows"] = load_datastore(str(seed / "dstore"), verify=False).num_rows
    previous = {r["rows"]: r for r in read_json(args.reuse_results)["sizes"]} if args.reuse_results else {}
    for rows in sorted(args.sizes):
        size_dir = work / f"rows_{rows}"
        size_dir.mkdir(exist_ok=True)
        stages = {}
        for name in STAGES:
            if name not in args.stages:
                if rows not in previous:
                    raise UsageError(f"--stages leaves out {name}, but --reuse_results has no {rows}-row size to take it from")
                stages[name] = previous[rows]["stages"][name]
                continue
            start = time.perf_counter()
            stages[name] = launch_stage(name, args, seed, size_dir, rows)
            logger.info("%d rows, %s: %.1f s, peak anonymous %s GiB, file-backed %s GiB", rows, name,
                        time.perf_counter() - start, gib(stages[name]["peak_anon_bytes"]), gib(stages[name]["peak_file_bytes"]))
        results["sizes"].append({"rows": rows, "stages": stages,
                                 "per_token": per_token_costs(size_dir, previous.get(rows, {}).get("per_token"))})
        if not args.keep:
            for name in ("dstore", "knn_targets", "memory"):
                shutil.rmtree(size_dir / name, ignore_errors=True)
    results["plan"] = plan(results, args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", results)
    (out / f"{args.name}.md").write_text(markdown(results))
    plot(results, out / f"{args.name}.png")
    print(markdown(results))
    return results


def stage_main(argv: list[str]) -> None:
    """``--_stage NAME --_settings JSON --_seed DIR --_size_dir DIR --_rows N``: one stage, its JSON beside the size."""
    opts = dict(zip(argv[::2], argv[1::2]))
    args = ScaleArguments(**json.loads(opts["--_settings"]))
    size_dir = Path(opts["--_size_dir"])
    result = run_stage(opts["--_stage"], args, Path(opts["--_seed"]), size_dir, int(opts["--_rows"]))
    write_json(size_dir / f"stage_{opts['--_stage']}.json", result)


if __name__ == "__main__":
    setup_logging()
    if "--_stage" in sys.argv:
        stage_main(sys.argv[1:])
    else:
        run(main)
