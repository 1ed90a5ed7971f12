"""The ``reranking`` stage of `benchmarks.gpu_run` (issue 25, item 3): the exact ranking where the search runs.

``rerank_queries`` train rows as queries, each with ``k + max(8, k / 8)`` candidate rows drawn at random from
the datastore (the index's candidates are spread over it at least as evenly), ranked by
`knn_utils.exact_ranking.exact_nearest` on the GPU with the keys there: queries/s, whether a query's neighbours
depend on the batch (an eighth of it), and how many neighbours differ from the CPU kernel's (`rank_candidates`)
on ``rerank_cpu_queries`` of them (float32 near-ties only). With an IVFPQ index (FAISS on the GPU; the dry run's
CPU), the kNN targets of those rows with the exact ranking against FAISS's own, time ratio and byte-identity at
an eighth of the batch; with the exact fallback (torch's exact search ranks exactly already) that part is left
out and says why.

The plan takes the run's sizes and the run the run itself (`benchmarks.gpu_run`'s ``RunSizes`` and ``Run``:
sizes, paths, device), which lists this stage among the others.
"""

from __future__ import annotations

import time

from utils.distributed import synchronize
from utils.io import read_json

RERANK_RATES = {  # (value, unit, source), merged into gpu_run.RATES
    "rerank_queries_per_second": (50_000.0, "queries/s", "estimate: 1,152 float16 keys of width 576 gathered per "
                                  "query (1.3 MB) at a tenth of an H100's memory bandwidth"),
    "numba_compile_seconds": (8.0, "s", "estimate: the CPU kernel's first call compiles it (about 5 s on 2 cores)"),
}


def rerank_plan(s, search_queries_per_second: float) -> dict:
    """Queries, candidates and seconds expected at the run's sizes ``s`` (FAISS's search at the given rate)."""
    candidates = s.k + max(8, s.k // 8)  # knn_utils.index_search.candidate_count
    rankings = 2 * s.rerank_repeats + 1  # each repeat ranks with both rankings' targets; then an eighth of the batch
    return {"queries": s.rerank_queries, "candidates": candidates, "k": s.k, "repeats": s.rerank_repeats,
            "cpu_reference_queries": s.rerank_cpu_queries,
            "seconds": RERANK_RATES["numba_compile_seconds"][0] + rankings * s.rerank_queries * (
                1 / RERANK_RATES["rerank_queries_per_second"][0] + 1 / search_queries_per_second)}


def run_reranking(r) -> dict:
    import os
    import statistics

    import numpy as np
    import torch

    from knn_utils.exact_ranking import exact_nearest, rank_candidates
    from utils.artifacts.datastore import load_datastore

    s = r.sizes
    datastore = load_datastore(r.path("dstore"))
    keys = datastore.keys  # (N, d) float16, memory-mapped
    rng = np.random.default_rng(0)
    n = min(s.rerank_queries, datastore.num_rows)
    query_rows = np.sort(rng.choice(datastore.num_rows, size=n, replace=False))
    candidates = rng.integers(0, datastore.num_rows, size=(n, s.k + max(8, s.k // 8)))
    queries = np.asarray(keys[query_rows], dtype=np.float32)
    device_keys = torch.from_numpy(np.asarray(keys)).to(r.device)
    device_queries, device_rows = torch.from_numpy(queries).to(r.device), torch.from_numpy(candidates).to(r.device)

    def rank(batch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        synchronize(torch.device(r.device))
        start = time.perf_counter()
        parts = [exact_nearest(device_keys, device_queries[b:b + batch], device_rows[b:b + batch], s.k)
                 for b in range(0, n, batch)]
        synchronize(torch.device(r.device))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), time.perf_counter() - start

    rank(s.rerank_batch)  # warm-up
    timed = [rank(s.rerank_batch) for _ in range(s.rerank_repeats)]
    dists, rows, _ = timed[-1]
    small_dists, small_rows, _ = rank(max(1, s.rerank_batch // 8))
    seconds = statistics.median(t[2] for t in timed)
    m = min(s.rerank_cpu_queries, n)
    cpu_dists, cpu_rows = rank_candidates(np.asarray(keys), queries[:m], candidates[:m], s.k,
                                          threads=os.cpu_count() or 1)
    here_dists, here_rows = dists[:m].cpu().numpy(), rows[:m].cpu().numpy()
    differ = cpu_rows != here_rows
    found = {"device": r.device, "queries": n, "candidates": candidates.shape[1], "k": s.k, "batch": s.rerank_batch,
             "queries_per_second": n / seconds,
             "gathered_gb_per_second": candidates.size * keys.shape[1] * 2 / seconds / 1e9,
             "identical_at_an_eighth_of_the_batch": bool(torch.equal(rows, small_rows)
                                                         and torch.equal(dists, small_dists)),
             "cpu_reference_queries": m, "neighbours_differing_from_the_cpu_kernel": int(differ.sum()),
             "largest_distance_difference_from_the_cpu_kernel": float(np.abs(cpu_dists - here_dists).max()),
             "differing_neighbours_are_near_ties": bool(np.allclose(cpu_dists[differ], here_dists[differ], rtol=1e-5))}
    found["targets"] = _rerank_targets(r, datastore)
    return found


def _rerank_targets(r, datastore) -> dict:
    """kNN targets of the first ``rerank_queries`` train rows with the exact ranking (on the search's device) and
    with FAISS's own, alternated (medians), and the exact ranking's bytes at an eighth of the batch."""
    import statistics

    import torch

    from knn_utils.index_search import load_index
    from knn_utils.knn_targets import SearchJob, TargetSettings, search_rows

    s = r.sizes
    meta = read_json(r.path("dstore/index/meta.json"))
    if meta["index_type"] != "ivfpq":
        return {"skipped": f"the {meta['index_type']} index is searched exactly (torch on the GPU where FAISS has "
                           "none): "
                           "no candidates to re-rank; faiss-gpu (conda) gives the IVFPQ comparison"}
    index = load_index(r.path("dstore/index"), datastore, probe=s.probe, use_gpu=r.device == "cuda",
                       rerank_device=r.device if r.device == "cuda" else None)
    rows = min(s.rerank_queries, datastore.num_rows)

    def targets(recompute_dists: bool, batch: int = rows):
        settings = TargetSettings(k=s.k, probe=s.probe, knn_temp=s.knn_temp, batch_size=batch,
                                  recompute_dists=recompute_dists)
        job = SearchJob(index=index, datastore=datastore, queries=datastore, settings=settings, exclude_self=True)
        synchronize(torch.device(r.device))
        start = time.perf_counter()
        found = search_rows(job, 0, rows)
        synchronize(torch.device(r.device))
        return found, time.perf_counter() - start

    seconds, found = {True: [], False: []}, {}
    for _ in range(s.rerank_repeats):
        for recompute_dists in (False, True):
            found[recompute_dists], spent = targets(recompute_dists)
            seconds[recompute_dists].append(spent)
    smaller = targets(True, max(1, rows // 8))[0]
    identical = all(getattr(smaller, name).tobytes() == getattr(found[True], name).tobytes()
                    for name in ("counts", "token_ids", "probs"))
    faiss_s, exact_s = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {"rows": rows, "rows_per_second_faiss_ranking": rows / faiss_s,
            "rows_per_second_exact_ranking": rows / exact_s,
            "time_ratio_exact_over_faiss": exact_s / faiss_s, "identical_at_an_eighth_of_the_batch": identical}


def rerank_summary(rerank: dict) -> str:
    """The stage's results in one sentence of the run's report."""
    targets = rerank["targets"]
    ratio = (f"kNN targets with the exact ranking take {targets['time_ratio_exact_over_faiss']:.2f}x FAISS's ranking's "
             f"time (byte-identical at an eighth of the batch: {targets['identical_at_an_eighth_of_the_batch']})"
             if "skipped" not in targets else f"targets comparison skipped: {targets['skipped']}")
    return (f"Exact re-ranking on {rerank['device']}: {rerank['queries_per_second']:,.0f} queries/s of "
            f"{rerank['candidates']:,} candidates; the same at an eighth of the batch: "
            f"{rerank['identical_at_an_eighth_of_the_batch']}; neighbours differing from the CPU kernel: "
            f"{rerank['neighbours_differing_from_the_cpu_kernel']} of "
            f"{rerank['cpu_reference_queries'] * rerank['k']:,}; "
            f"{ratio}.")
