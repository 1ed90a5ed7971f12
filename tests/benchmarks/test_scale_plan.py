"""benchmarks/scale_plan.py: the capacity plan that bench_scale extrapolates from its measured sizes, on results
written by hand (the benchmark itself takes hours and 30 GB).

The searches follow exact power laws here, so the plan's hours can be checked against the formula: rows over the
rate the fitted law predicts at the target size, times the key width's ratio to the measured 576.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from benchmarks.scale_plan import FAISS_RANKING, STAGES, TARGETS, ScaleArguments, markdown, plan, search_rate

SIZES = [200_000, 2_000_000, 20_000_000]


def exact_rate(rows: float) -> float:
    return 900.0 * (rows / 200_000) ** -0.8


def faiss_rate(rows: float) -> float:
    return 2_600.0 * (rows / 200_000) ** -0.5


def size_results(rows: int, strategies: bool = True, refinement: bool = True, cold: bool = True) -> dict:
    """One size's stages as bench_scale records them (only the fields the plan and the report read); the page cache
    is cold at 20M rows unless ``cold`` is false."""
    stage = {"peak_anon_bytes": 2**30, "peak_file_bytes": 2**29}
    search = {**stage, "queries_per_second": exact_rate(rows) / 2, "keys_bytes": rows * 576 * 2,
              "page_cache": "cold" if rows >= 20_000_000 and cold else "warm"}  # queries_per_second: an older default's
    if strategies:
        search["strategies"] = {"exact ranking": {"queries_per_second": exact_rate(rows), "agreement_with_exact_ranking": 1.0},
                                FAISS_RANKING: {"queries_per_second": faiss_rate(rows), "agreement_with_exact_ranking": 0.92}}
        if refinement:
            search["strategies"]["FAISS refinement, SQ8 codes in RAM"] = {"queries_per_second": 1_000.0,
                                                                          "agreement_with_exact_ranking": 0.998}
    stages = {name: dict(stage) for name in STAGES}
    stages["write"].update(rows_per_second=100_000.0)
    stages["index"].update(add_rows_per_second=10_000.0, train_seconds=50.0)
    stages["search"] = search
    stages["train"].update(rows_per_second=400.0)
    stages["targets"].update(nnz=rows * 100)
    return {"rows": rows, "stages": stages,
            "per_token": {"knn_search": 1e-3, "base_in_knnlm": 3e-3, "base_in_joint": 3e-3, "memory": 1e-3}}


def results_of(sizes: list[dict]) -> dict:
    found = {"machine": {"cpu": "test CPU", "cores": 2}, "settings": asdict(ScaleArguments()), "seed_rows": 100,
             "load_average_at_start": [0.0, 0.0, 0.0], "sizes": sizes}
    found["plan"] = plan(found, ScaleArguments())
    return found


def test_the_search_rate_is_the_exact_rankings_and_an_older_stage_keeps_its_own():
    with_strategies, older = size_results(2_000_000), size_results(2_000_000, strategies=False)
    assert search_rate(with_strategies) == exact_rate(2_000_000)  # not the stage's own queries_per_second
    assert search_rate(with_strategies, FAISS_RANKING) == faiss_rate(2_000_000)
    assert search_rate(older) == exact_rate(2_000_000) / 2


def test_targets_hours_of_both_rankings_follow_the_fitted_laws():
    found = results_of([size_results(rows) for rows in SIZES[:2]] + [size_results(SIZES[2], cold=False)])
    assert found["plan"]["disk_rerank"] is None  # the largest size's keys were in the page cache
    fits = found["plan"]["fits"]
    assert fits["search_queries_per_second"]["b"] == pytest.approx(-0.8)
    assert fits["search_queries_per_second_faiss_ranking"]["b"] == pytest.approx(-0.5)
    for label, (rows, dim) in TARGETS.items():
        hours = found["plan"]["targets"][label]["cpu_hours_2_cores"]
        exact = next(v for k, v in hours.items() if k.startswith("kNN targets") and "exact ranking" in k)
        faiss = next(v for k, v in hours.items() if k.startswith("kNN targets") and "FAISS's ranking" in k)
        assert exact == pytest.approx(rows / exact_rate(rows) * dim / 576 / 3600, rel=1e-6)
        assert faiss == pytest.approx(rows / faiss_rate(rows) * dim / 576 / 3600, rel=1e-6)


def test_without_every_sizes_strategies_only_the_exact_ranking_is_planned():
    found = results_of([size_results(200_000, strategies=False), *(size_results(rows) for rows in SIZES[1:])])
    assert "search_queries_per_second_faiss_ranking" not in found["plan"]["fits"]
    hours = next(iter(found["plan"]["targets"].values()))["cpu_hours_2_cores"]
    assert not any("FAISS's ranking" in k for k in hours)


def test_the_report_marks_a_strategy_a_size_did_not_measure():
    """The refinement is left out where its codes would not fit in memory (20M rows): that size's cells say so."""
    found = results_of([size_results(rows, refinement=rows < 20_000_000) for rows in SIZES])
    report = markdown(found)
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("| rows | keys GB | page cache |"))
    row = next(line for line in lines if line.startswith("| 20,000,000 | 23.0 | cold |"))
    cells = dict(zip((c.strip() for c in header.strip("|").split("|")), (c.strip() for c in row.strip("|").split("|"))))
    assert cells["FAISS ranking: queries/s"] == f"{faiss_rate(2e7):,.1f}"
    assert cells["exact ranking: queries/s"] == f"{exact_rate(2e7):,.1f}"
    assert cells["FAISS refinement, SQ8 codes in RAM: queries/s"] == "-"
    assert f"| 2,000,000 | 100,000 | 50.0 | 10,000 | {exact_rate(2e6):,.1f} |" in report
    assert "FAISS's ranking (--recompute_dists False)" in report


def test_beyond_the_largest_size_the_exact_ranking_is_faiss_search_plus_the_disk_reads():
    """With the largest size's keys on disk, the exact ranking's extra cost per query there (a read per candidate)
    is added to FAISS's own search beyond it, rather than extrapolating a power law across the change of regime
    (the recipes' dry run, scripts/plan.py, calls the same exact_search_seconds)."""
    from benchmarks.scale_plan import exact_search_seconds

    found = results_of([size_results(rows) for rows in SIZES])
    disk = found["plan"]["disk_rerank"]
    assert disk["beyond_rows"] == SIZES[-1]
    assert disk["seconds_per_query"] == pytest.approx(1 / exact_rate(2e7) - 1 / faiss_rate(2e7))
    fits = {name: (fit["a"], fit["b"]) for name, fit in found["plan"]["fits"].items()}
    assert exact_search_seconds(fits, disk, 2e6) == pytest.approx(1 / exact_rate(2e6))  # inside: the power law
    rows = 103_000_000
    assert exact_search_seconds(fits, disk, rows) == pytest.approx(1 / faiss_rate(rows) + disk["seconds_per_query"])
    hours = found["plan"]["targets"]["WikiText-103, SmolLM2-135M (d 576)"]["cpu_hours_2_cores"]
    exact = next(v for k, v in hours.items() if "exact ranking" in k)
    assert exact == pytest.approx(rows * (1 / faiss_rate(rows) + disk["seconds_per_query"]) / 3600)
    assert "plus" in markdown(found) and f"{1e3 * disk['seconds_per_query']:.1f} ms a query" in markdown(found)
