"""What verifying an artifact's block checksums costs, next to the stage that reads the artifact.

    python -m benchmarks.bench_verify                       # 300k x 576 float16 datastore, about 4 minutes on 2 cores
    python -m benchmarks.bench_verify --rows 1000000 --dim 768

A synthetic datastore of realistic width (576: SmolLM2-135M) is written by the real `DatastoreWriter`
(keys like hidden states: bench_knn's generator). In the same run, each measured as the median of
``--repeats``:

- writing the checksums: the one read of ``finish()`` (block checksums and the SHA-256 identity
  together) against the SHA-256 alone that ``finish()`` computed before block checksums existed;
- verifying: what ``load_datastore`` (and ``read_index_file``) check before a stage reads them, with the
  files in the page cache (warm) and evicted from it first (cold, ``posix_fadvise``);
- the stages that consume the datastore, with verification off: building an exact and an IVFPQ index
  (``build_index``), and computing kNN targets (``search_rows``, exact k 64 and IVFPQ k 1024 at nprobe 32).
  Targets are timed over the first ``--target_rows`` query rows and scaled to all rows (each row is one
  independent search, so the cost is linear in the rows).

The ratio is the verification a stage runs at start (the datastore; for the targets also the index file)
over the stage's own time. Writes ``verify.json`` and ``verify.md`` (``--name``) with the machine.
"""

from __future__ import annotations

import utils.openmp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch and FAISS load)

# isort: split

import logging
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.bench_knn import machine_info, write_synthetic_datastore
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import load_index
from knn_utils.knn_targets import SearchJob, TargetSettings, search_rows
from utils import checksums
from utils.artifacts.datastore import DATA_FILES, load_datastore
from utils.artifacts.index import INDEX_FILE
from utils.artifacts.meta import read_meta
from utils.cli import parse_args, run, setup_logging
from utils.io import array_sha256, write_json

logger = logging.getLogger(__name__)


@dataclass
class BenchArguments:
    """The datastore to build and how often to measure."""

    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where the results go."})
    name: str = field(default="verify", metadata={"help": "Base name of the result files: NAME.json, NAME.md."})
    work_dir: str | None = field(default=None, metadata={"help": "Scratch directory (default: a temporary one, deleted)."})
    rows: int = field(default=300_000, metadata={"help": "Rows of the synthetic datastore."})
    dim: int = field(default=576, metadata={"help": "Key dimension (576: SmolLM2-135M; 768: GPT-2)."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic keys and values."})
    repeats: int = field(default=3, metadata={"help": "Timed repetitions of each measurement (the median is reported)."})
    ivfpq_repeats: int = field(default=1, metadata={"help": "Repetitions of the IVFPQ build (about a minute each on 2 cores)."})
    ncentroids: int = field(default=1024, metadata={"help": "IVF lists of the IVFPQ index."})
    code_size: int = field(default=64, metadata={"help": "PQ sub-quantizers of the IVFPQ index."})
    train_size: int = field(default=100_000, metadata={"help": "Training sample of the IVFPQ index."})
    target_rows: int = field(default=1_000, metadata={"help": "Query rows timed per kNN-target measurement."})


def median_seconds(action: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    """Median wall time of ``action`` over ``repeats`` calls; ``before`` runs untimed ahead of each."""
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) would stay cached
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sha256_alone(dstore: Path) -> tuple[str, str]:
    """What ``finish()`` computed before block checksums existed (the memory maps are closed on return: mapped
    pages would not be evicted for the cold measurements)."""
    datastore = load_datastore(str(dstore), verify=False)
    return array_sha256(datastore.keys), array_sha256(datastore.vals)


def timed_index_build(dstore: Path, index_path: Path, settings: IndexSettings, repeats: int) -> tuple[float, dict]:
    """Median seconds of building the index without verification (the stage's own cost), and its meta."""
    def remove():
        shutil.rmtree(index_path, ignore_errors=True)

    seconds = median_seconds(lambda: build_index(str(dstore), str(index_path), settings, show_progress=False, verify=False),
                             repeats, before=remove)
    return seconds, read_meta(index_path, "index")


def timed_targets(dstore: Path, index_path: Path, settings: TargetSettings, rows: int, repeats: int) -> float:
    """Median seconds of computing the kNN targets of the first ``rows`` rows."""
    datastore = load_datastore(str(dstore), verify=False)
    job = SearchJob(index=load_index(index_path, datastore, settings.probe, verify=False), datastore=datastore,
                    queries=datastore, settings=settings, exclude_self=True)
    return median_seconds(lambda: search_rows(job, 0, rows), repeats)


def bench(args: BenchArguments, work: Path) -> dict:
    dstore = work / "dstore"
    start = time.perf_counter()
    write_synthetic_datastore(dstore, args.rows, args.dim, args.seed)
    write_seconds = time.perf_counter() - start
    meta = read_meta(dstore, "datastore")
    files = [dstore / name for name in DATA_FILES]
    size = sum(path.stat().st_size for path in files)
    logger.info("Datastore of %d x %d (%.2f GB) written in %.1f s", args.rows, args.dim, size / 1e9, write_seconds)

    def verify_datastore():
        checksums.verify_files(dstore, meta, list(DATA_FILES))

    writing = {
        "finish_one_pass_seconds": median_seconds(lambda: [checksums.checksum_npy(path) for path in files], args.repeats),
        "sha256_alone_seconds": median_seconds(lambda: sha256_alone(dstore), args.repeats),
    }
    verifying = {"warm_seconds": median_seconds(verify_datastore, args.repeats),
                 "cold_seconds": median_seconds(verify_datastore, args.repeats, before=lambda: evict(files))}
    logger.info("Verifying the datastore: %.3f s warm, %.3f s cold", verifying["warm_seconds"], verifying["cold_seconds"])

    stages = []
    indexes = {"flat": (IndexSettings(index_type="flat"), args.repeats),
               "ivfpq": (IndexSettings(index_type="ivfpq", ncentroids=args.ncentroids, code_size=args.code_size,
                                       train_size=args.train_size), args.ivfpq_repeats)}
    index_verify = {}
    for kind, (settings, repeats) in indexes.items():
        seconds, index_meta = timed_index_build(dstore, work / kind, settings, repeats)
        stages.append({"stage": f"build_index, {'exact (IndexFlatL2)' if kind == 'flat' else 'IVFPQ'}", "seconds": seconds,
                       "repeats": repeats, "verified_bytes": size, "verify_warm_seconds": verifying["warm_seconds"],
                       "verify_cold_seconds": verifying["cold_seconds"]})
        index_file = [work / kind / INDEX_FILE]
        index_verify[kind] = {
            "bytes": index_meta["index_bytes"],
            "warm_seconds": median_seconds(lambda: checksums.verify_files(work / kind, index_meta, [INDEX_FILE]), args.repeats),
            "cold_seconds": median_seconds(lambda: checksums.verify_files(work / kind, index_meta, [INDEX_FILE]), args.repeats,
                                           before=lambda: evict(index_file)),
        }
        logger.info("%s: built in %.1f s; its %d-byte file verifies in %.3f s warm", kind, seconds,
                    index_meta["index_bytes"], index_verify[kind]["warm_seconds"])

    rows = min(args.target_rows, args.rows)
    for kind, settings in (("flat", TargetSettings(k=64, batch_size=rows)),
                           ("ivfpq", TargetSettings(k=1024, probe=32, batch_size=rows))):
        seconds = timed_targets(dstore, work / kind, settings, rows, args.repeats) * args.rows / rows
        stages.append({"stage": f"kNN targets, {'exact' if kind == 'flat' else 'IVFPQ nprobe 32'}, k {settings.k}",
                       "seconds": seconds, "repeats": args.repeats, "timed_rows": rows,
                       "verified_bytes": size + index_verify[kind]["bytes"],
                       "verify_warm_seconds": verifying["warm_seconds"] + index_verify[kind]["warm_seconds"],
                       "verify_cold_seconds": verifying["cold_seconds"] + index_verify[kind]["cold_seconds"]})
        logger.info("%s: %.1f s for all %d rows (from %d timed)", stages[-1]["stage"], seconds, args.rows, rows)
    for stage in stages:
        stage["ratio_warm"] = stage["verify_warm_seconds"] / stage["seconds"]
        stage["ratio_cold"] = stage["verify_cold_seconds"] / stage["seconds"]
    return {"datastore": {"rows": args.rows, "dim": args.dim, "key_dtype": meta["key_dtype"], "bytes": size,
                          "write_seconds": round(write_seconds, 2)},
            "checksums": {"algorithm": checksums.ALGORITHM, "block_bytes": checksums.BLOCK_BYTES,
                          "read_bytes": checksums.READ_BYTES},
            "writing": writing, "verifying_datastore": verifying, "verifying_index": index_verify, "stages": stages}


def markdown(results: dict) -> str:
    m, d, c = results["machine"], results["datastore"], results["checksums"]
    w, v = results["writing"], results["verifying_datastore"]
    lines = [
        "# Verifying artifacts against their block checksums", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['faiss_threads']} FAISS threads), load average at start "
        f"{m['load_average_at_start']}; FAISS {m['faiss']}, torch {m['torch']}.", "",
        f"Datastore: synthetic, {d['rows']:,} x {d['dim']} {d['key_dtype']} keys ({d['bytes'] / 1e9:.2f} GB), written by "
        f"`DatastoreWriter` in {d['write_seconds']} s. Checksums: {c['algorithm']}, blocks of {c['block_bytes'] >> 20} MiB, "
        f"read in {c['read_bytes'] >> 20} MiB pieces. Medians of {results['args']['repeats']} runs "
        f"(IVFPQ build: {results['args']['ivfpq_repeats']}).", "",
        f"- Writing: `finish()` reads the arrays once for the block checksums and the SHA-256 identity: "
        f"{w['finish_one_pass_seconds']:.2f} s, against {w['sha256_alone_seconds']:.2f} s for the SHA-256 alone before.",
        f"- Verifying the datastore (what `load_datastore` does): {v['warm_seconds']:.3f} s with the files in the page "
        f"cache ({d['bytes'] / 1e9 / v['warm_seconds']:.1f} GB/s), {v['cold_seconds']:.3f} s evicted first "
        f"({d['bytes'] / 1e9 / v['cold_seconds']:.1f} GB/s).", "",
        "| stage (verification off) | stage s | verified at its start | verify s, warm | verify s, cold | ratio warm | ratio cold |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in results["stages"]:
        what = "datastore" if s["verified_bytes"] == d["bytes"] else "datastore + index.faiss"
        timed = f" (timed on {s['timed_rows']:,} rows, scaled to all)" if "timed_rows" in s else ""
        lines.append(f"| {s['stage']}{timed} | {s['seconds']:.1f} | {what}, {s['verified_bytes'] / 1e9:.2f} GB | "
                     f"{s['verify_warm_seconds']:.3f} | {s['verify_cold_seconds']:.3f} | {100 * s['ratio_warm']:.2f}% | "
                     f"{100 * s['ratio_cold']:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    logging.getLogger("utils.checksums").setLevel(logging.WARNING)  # one line per repetition otherwise
    (args,) = parse_args((BenchArguments,), argv)
    logger.info("Arguments: %s", args)
    machine = machine_info()
    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_verify_"))
    try:
        results = {"machine": machine, "args": asdict(args), **bench(args, work_root)}
    finally:
        if not args.work_dir:
            shutil.rmtree(work_root, ignore_errors=True)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(Path(args.output_dir) / f"{args.name}.json", results)
    (Path(args.output_dir) / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    run(main)
