"""Offline memory training I/O (issue 15, sections 3 and 5): rows/s of the loop against a bare forward-and-backward.

    python -m benchmarks.bench_train_io                      # 300k rows x 576 (SmolLM2's width), batch 512
    python -m benchmarks.bench_train_io --rows 1000000 --steps 12

Writes a synthetic datastore (random float16 keys at the real width, random values) and synthetic sparse kNN
targets (``--targets_per_row`` entries a row) to a temporary directory, then trains the same memory (2 SwiGLU blocks
over SmolLM2's shapes: width 576, intermediate 1536, 49,152-way head) for ``--steps`` steps of ``--batch_size``
random rows in four ways, side by side in one run:

- bare: forward, backward and AdamW step on one batch already in RAM (the compute alone);
- old loop, page cache warm: each batch gathered from the memory maps in the training process, then trained;
- prefetching loader, page cache warm: `models.training.loop.train_batches` with ``--workers`` processes;
- old loop and prefetching loader with the files evicted from the page cache first (``posix_fadvise DONTNEED``),
  so every batch reads from disk: the case of a datastore larger than RAM.

It records rows/s (median over steps after ``--warmup`` steps) and the peak resident memory of the training process
and its loader workers, anonymous memory apart from file pages mapped from the datastore (those are page cache,
which the kernel reclaims), sampled every step: anonymous memory must stay flat while the run reads a datastore
hundreds of times the batch working set. Writes benchmarks/results/<name>.json and .md, with the machine and its
load (the 2-core machine is shared with other jobs: medians over steps).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from models import MemoryConfig, build_memory  # noqa: E402
from models.training.checkpoints import Schedule  # noqa: E402
from models.training.loop import train_batches  # noqa: E402
from models.training.losses import memory_loss  # noqa: E402
from models.training.rows import DatastoreRows  # noqa: E402
from utils.artifacts.datastore import Datastore  # noqa: E402
from utils.artifacts.knn_targets import KnnTargets  # noqa: E402
from utils.environment import machine  # noqa: E402
from utils.io import write_json  # noqa: E402

CHUNK_ROWS = 1 << 16


def write_synthetic(directory: Path, rows: int, dim: int, vocab: int, per_row: int, seed: int) -> tuple[Datastore, KnnTargets]:
    """A datastore and kNN targets of ``rows`` random rows, written chunk by chunk (never whole in RAM)."""
    rng = np.random.default_rng(seed)
    (directory / "dstore").mkdir(parents=True)
    (directory / "targets").mkdir()
    keys = np.lib.format.open_memmap(directory / "dstore" / "keys.npy", "w+", np.float16, (rows, dim))
    vals = np.lib.format.open_memmap(directory / "dstore" / "vals.npy", "w+", np.int32, (rows,))
    token_ids = np.lib.format.open_memmap(directory / "targets" / "token_ids.npy", "w+", np.int32, (rows * per_row,))
    probs = np.lib.format.open_memmap(directory / "targets" / "probs.npy", "w+", np.float16, (rows * per_row,))
    for begin in range(0, rows, CHUNK_ROWS):
        end = min(begin + CHUNK_ROWS, rows)
        keys[begin:end] = rng.standard_normal((end - begin, dim), dtype=np.float32)
        vals[begin:end] = rng.integers(0, vocab, end - begin)
        ids = np.sort(rng.integers(0, vocab, (end - begin, per_row)), axis=1)
        token_ids[begin * per_row : end * per_row] = ids.ravel()
        weights = rng.random((end - begin, per_row))
        probs[begin * per_row : end * per_row] = (weights / weights.sum(1, keepdims=True)).ravel()
    np.save(directory / "targets" / "offsets.npy", np.arange(rows + 1, dtype=np.int64) * per_row)
    np.save(directory / "targets" / "labels.npy", np.asarray(vals))
    for array in (keys, vals, token_ids, probs):
        array.flush()
    del keys, vals, token_ids, probs
    meta = {"kind": "knn_targets", "rows": rows, "nnz": rows * per_row}
    write_json(directory / "targets" / "meta.json", meta)
    datastore = Datastore(keys=np.load(directory / "dstore" / "keys.npy", mmap_mode="r"),
                          vals=np.load(directory / "dstore" / "vals.npy", mmap_mode="r"), meta={}, path=directory / "dstore")
    return datastore, KnnTargets(directory / "targets", verify=False)


def evict(directory: Path) -> None:
    """Drop the clean page-cache pages of every file under ``directory`` (no root needed)."""
    for path in directory.rglob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def memory_of(process: psutil.Process) -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) of a process and its loader workers.

    The training process counts ``rss - shared`` as anonymous (file pages mapped from the datastore are shared
    page cache); a forked worker counts only the pages it does not share (its USS), so that the pages it still
    shares with its parent are not counted twice.
    """
    info = process.memory_info()
    rss, anon = info.rss, info.rss - info.shared
    for child in process.children(recursive=True):
        try:
            full = child.memory_full_info()
        except psutil.Error:
            continue
        rss, anon = rss + full.uss, anon + full.uss
    return rss, anon


def train(memory, optimizer, batches, steps: int, warmup: int, process: psutil.Process) -> dict:
    """``steps`` optimizer steps over ``batches``; seconds per step and the peak memory, sampled every step."""
    seconds, peak_rss, peak_anon, anon_after_warmup = [], 0, 0, None
    start = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        loss = memory_loss(memory(batch.inputs), batch.targets, batch.labels, alpha=0.5).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        seconds.append(now - start)
        start = now
        rss, anon = memory_of(process)
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        if step == warmup:
            anon_after_warmup = anon
    per_step = statistics.median(seconds[warmup:])
    return {"seconds_per_step": round(per_step, 4), "rows_per_second": round(len(batch.labels) / per_step, 1),
            "peak_rss_mb": round(peak_rss / 2**20, 1), "peak_anon_mb": round(peak_anon / 2**20, 1),
            "anon_after_warmup_mb": round((anon_after_warmup or 0) / 2**20, 1),
            "seconds_all": [round(s, 4) for s in seconds]}


def repeat(batch):
    while True:
        yield batch


def old_loop(source: DatastoreRows, schedule: Schedule, seed: int):
    """Before issue 15: each micro-batch gathered in the training process, just before it trains."""
    for step in range(schedule.total_steps):
        for micro in range(schedule.accumulation):
            yield source.train_batch(schedule.units(seed, step, micro, 0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=576, help="Key width (SmolLM2-135M: 576).")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--intermediate_size", type=int, default=1536)
    parser.add_argument("--targets_per_row", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work_dir", default=None, help="Where the synthetic files go (default: a temporary dir).")
    parser.add_argument("--name", default="train_io")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_train_io_", dir=args.work_dir))
    process = psutil.Process()
    results = {"machine": {**machine(), "note": "2-core machine shared with other jobs while this ran; medians over "
                           "steps"}, "rows": args.rows, "dim": args.dim, "vocab": args.vocab,
               "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "workers": args.workers,
               "targets_per_row": args.targets_per_row, "threads": torch.get_num_threads(), "runs": {}}
    try:
        start = time.perf_counter()
        datastore, targets = write_synthetic(work, args.rows, args.dim, args.vocab, args.targets_per_row, 0)
        results["write_seconds"] = round(time.perf_counter() - start, 1)
        results["datastore_mb"] = round(sum(p.stat().st_size for p in work.rglob("*.npy")) / 2**20, 1)
        results["batch_working_set_mb"] = round(args.batch_size * (args.dim * 2 + args.targets_per_row * 6 + 12) / 2**20, 3)
        base = LlamaConfig(hidden_size=args.dim, intermediate_size=args.intermediate_size, vocab_size=args.vocab,
                           num_hidden_layers=1, num_attention_heads=1)
        schedule = Schedule(args.rows, args.batch_size, 1, 1, 1, args.steps)
        runs = [("bare", 0, False), ("old_loop_warm", 0, False), ("prefetch_warm", args.workers, False),
                ("old_loop_cold", 0, True), ("prefetch_cold", args.workers, True)]
        for name, workers, cold in runs:
            torch.manual_seed(0)
            memory = build_memory(MemoryConfig.from_base(base, num_layers=2, layer=0, dropout=0.0)).train()
            optimizer = torch.optim.AdamW(memory.parameters(), lr=1e-4)
            source = DatastoreRows(datastore, targets, args.rows, args.vocab, args.batch_size, args.batch_size,
                                   loader_workers=workers)
            if cold:
                evict(work)
            else:  # warm the page cache: one streamed read of every file
                for path in work.rglob("*.npy"):
                    with open(path, "rb") as f:
                        while f.read(1 << 24):
                            pass
            if name == "bare":
                batches = repeat(source.train_batch(schedule.units(0, 0, 0, 0)))
            elif workers:
                batches = train_batches(source, schedule, 0, 0, 0, pin_memory=False)
            else:
                batches = old_loop(source, schedule, 0)
            results["runs"][name] = train(memory, optimizer, batches, args.steps, args.warmup, process)
            del batches
            print(name, {k: v for k, v in results["runs"][name].items() if k != "seconds_all"}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    write_outputs(results, REPO / "benchmarks" / "results", args.name)
    return results


def write_outputs(results: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", results)
    m, runs = results["machine"], results["runs"]
    bare = runs["bare"]["rows_per_second"]
    described = {"bare": "bare forward + backward + step (batch in RAM)",
                 "old_loop_warm": "old loop (gather in the training process), page cache warm",
                 "prefetch_warm": f"prefetching loader ({results['workers']} worker), page cache warm",
                 "old_loop_cold": "old loop, files evicted from the page cache",
                 "prefetch_cold": f"prefetching loader ({results['workers']} worker), files evicted from the page cache"}
    lines = [f"# {name}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, {results['threads']} threads. {m['note']} "
             f"(load average at the end: {', '.join(f'{x:.2f}' for x in m['load_average_at_end'])}).",
             f"Synthetic datastore + kNN targets: {results['rows']} rows x {results['dim']} float16 keys, "
             f"{results['targets_per_row']} targets a row, {results['datastore_mb']} MB on disk; a batch of "
             f"{results['batch_size']} rows reads {results['batch_working_set_mb']} MB. Memory: 2 SwiGLU blocks, "
             f"vocabulary {results['vocab']}. {results['steps']} steps, medians after {results['warmup']}.", "",
             "| run | rows/s | of bare | peak RSS (MB) | peak anonymous (MB) | anonymous after warm-up (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, text in described.items():
        run = runs[key]
        lines.append(f"| {text} | {run['rows_per_second']} | {run['rows_per_second'] / bare:.1%} | {run['peak_rss_mb']} | "
                     f"{run['peak_anon_mb']} | {run['anon_after_warmup_mb']} |")
    lines.append("")
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
