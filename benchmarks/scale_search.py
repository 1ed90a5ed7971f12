"""The search stage of benchmarks/bench_scale.py: the kNN search at each datastore size, with each way of ranking
the IVFPQ index's candidates when the keys do or do not fit in memory.

- ``exact ranking``: the default; candidates re-ranked by exact distance to the keys, read through the memory map
  (from the page cache, or at a page fault from disk).
- ``exact ranking, read ahead``: the same, after `knn_utils.exact_ranking.ReadAhead` has queued the reads of every
  page the batch's candidates lie on (``load_index(read_ahead=True)``; measured slower than the plain memory map
  at 20M rows on a cold page cache, so not a default).
- ``FAISS ranking``: IVFPQ's own distances, equal ones to the lower row (``--recompute_dists False``); no keys read.
- ``FAISS refinement, SQ8 codes in RAM``: ``faiss.IndexRefine`` over 8-bit scalar-quantized copies of the keys.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from benchmarks.scale_plan import ScaleArguments

logger = logging.getLogger(__name__)


def set_page_cache(path: Path, warm: bool) -> None:
    """Start a measurement from a known page cache: ``path`` read through once (``warm``), or dropped from the cache
    (``posix_fadvise(DONTNEED)`` on this file only; the machine's other files stay cached)."""
    with open(path, "rb") as f:
        if warm:
            while f.read(1 << 24):
                pass
        else:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


SEARCH_STRATEGIES = {  # name: (KnnIndex.search's exact, load_index's read_ahead)
    "exact ranking": (True, False),
    "exact ranking, read ahead": (True, True),
    "FAISS ranking": (False, False),
}


REFINE = "FAISS refinement, SQ8 codes in RAM"


def refinement_search(args: ScaleArguments, datastore, index, queries: np.ndarray, query_rows: np.ndarray,
                      available: int) -> tuple[dict, np.ndarray] | None:
    """FAISS's own refinement: the IVFPQ index's `candidate_count` candidates re-ranked by distances to 8-bit
    scalar-quantized copies of the keys held in RAM (``faiss.IndexRefine``; d bytes per row), in batches of 500;
    None when those codes would take more than a quarter of the memory available."""
    import faiss

    from knn_utils.index_search import candidate_count, select_neighbours

    rows, dim = datastore.keys.shape
    if rows * dim > available / 4:
        logger.info("%d rows: no %s (%.1f GB of codes)", rows, REFINE, rows * dim / 1e9)
        return None
    start = time.perf_counter()
    codes = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
    codes.train(np.asarray(datastore.keys[:: max(1, rows // args.train_size)], dtype=np.float32))
    for begin in range(0, rows, 1 << 18):
        codes.add(np.asarray(datastore.keys[begin : begin + (1 << 18)], dtype=np.float32))
    build_seconds = time.perf_counter() - start
    refined = faiss.IndexRefine(index.index, codes)
    refined.k_factor = candidate_count(args.k) / args.k
    start, ids = time.perf_counter(), []
    for b in range(0, len(queries), 500):
        dists, found = refined.search(queries[b : b + 500], args.k + 1)
        ids.append(select_neighbours(dists, found, args.k, query_rows[b : b + 500], lower_row_first=True).ids)
    return {"queries_per_second": len(queries) / (time.perf_counter() - start), "build_seconds": build_seconds,
            "codes_bytes": rows * dim}, np.concatenate(ids)


def stage_search(args: ScaleArguments, seed: Path, size_dir: Path, rows: int) -> dict:
    """Queries/s of `KnnIndex.search` over --num_queries datastore rows in batches of 500, with each strategy of
    `SEARCH_STRATEGIES`, each started from the same page cache: the keys read through once when they fit in half
    the memory available, else dropped from the cache (a cold start; a full run over all rows would find some of
    its candidates cached). Also how many of the exact ranking's neighbours each strategy finds."""
    from knn_utils.index_search import load_index, memory_available
    from utils.artifacts.datastore import load_datastore

    datastore = load_datastore(str(size_dir / "dstore"), verify=False)
    query_rows = np.sort(np.random.default_rng(1).choice(rows, size=min(args.num_queries, rows), replace=False))
    queries = np.asarray(datastore.keys[query_rows], dtype=np.float32)
    available = memory_available() or 0
    warm = datastore.keys.nbytes <= available / 2
    results, found = {}, {}
    for name, (exact, read_ahead) in SEARCH_STRATEGIES.items():
        index = load_index(size_dir / "dstore" / "index", datastore, probe=args.probe, verify=False, read_ahead=read_ahead)
        set_page_cache(size_dir / "dstore" / "keys.npy", warm)
        start, ids = time.perf_counter(), []
        for b in range(0, len(queries), 500):
            ids.append(index.search(queries[b : b + 500], args.k, query_rows[b : b + 500], exact=exact).ids)
        results[name] = {"queries_per_second": len(queries) / (time.perf_counter() - start)}
        found[name] = np.concatenate(ids)
        logger.info("%d rows, search with %s: %.1f queries/s", rows, name, results[name]["queries_per_second"])
    refine = refinement_search(args, datastore, load_index(size_dir / "dstore" / "index", datastore, probe=args.probe,
                                                           verify=False, read_ahead=False), queries, query_rows, available)
    if refine is not None:
        results[REFINE], found[REFINE] = refine
    for name in results:
        results[name]["agreement_with_exact_ranking"] = float(np.mean(
            [len(np.intersect1d(f[f >= 0], e[e >= 0])) / max(1, (e >= 0).sum())
             for f, e in zip(found[name], found["exact ranking"])]))
    default = "exact ranking"  # what load_index does unless asked to read ahead
    return {"queries_per_second": results[default]["queries_per_second"], "default_strategy": default,
            "queries_per_second_faiss_ranking": results["FAISS ranking"]["queries_per_second"], "strategies": results,
            "num_queries": len(queries), "keys_bytes": int(datastore.keys.nbytes), "memory_available_bytes": available,
            "page_cache": "warm" if warm else "cold"}
