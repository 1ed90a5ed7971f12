"""The run ledger (utils/ledger.py): fingerprints, metrics, resources, and the comparison of two runs."""

from __future__ import annotations

import json

import numpy as np

from utils.ledger import compare, fingerprint, flat_metrics, format_comparison, measured


def test_fingerprint_follows_the_recorded_checksums_not_timings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for directory, seconds in ((a, 1.5), (b, 7.25)):
        directory.mkdir()
        (directory / "meta.json").write_text(json.dumps({"kind": "datastore", "seconds": seconds,
                                                          "path": str(directory),
                                                          "checksums": {"keys.npy": {"blocks": ["ab12"]}}}))
    assert fingerprint(a) == fingerprint(b)  # the same bytes, written at other speeds into other places
    (b / "meta.json").write_text(json.dumps({"kind": "datastore", "checksums": {"keys.npy": {"blocks": ["ff00"]}}}))
    assert fingerprint(a) != fingerprint(b)
    plain = tmp_path / "results"
    plain.mkdir()
    (plain / "eval_results.json").write_text('{"perplexity": 3.0}')
    first = fingerprint(plain)
    (plain / "eval_results.json").write_text('{"perplexity": 3.5}')
    assert fingerprint(plain) != first and fingerprint(tmp_path / "absent") is None


def test_flat_metrics_keep_numbers_key_sweeps_by_lmbda_and_drop_timings():
    results = {"perplexity": 12.5, "eval_tokens_per_second": 900.0, "eval_seconds": 3.0, "exclude_self": True,
               "lmbda_sweep": [{"lmbda": 0.25, "perplexity": 11.0}, {"lmbda": 0.5, "perplexity": 10.5}],
               "lmbda_choice": {"lmbda": 0.5, "rule": "lowest perplexity"}, "index_type": "flat"}
    assert flat_metrics(results) == {"perplexity": 12.5, "lmbda_sweep/lmbda=0.25/perplexity": 11.0,
                                     "lmbda_sweep/lmbda=0.5/perplexity": 10.5, "lmbda_choice/lmbda": 0.5}


def test_measured_records_wall_time_and_peak_memory():
    with measured(interval=0.01) as record:
        block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB held for a while
        block.sum()
    assert record["wall_seconds"] >= 0 and record["peak_rss_bytes"] > 64 << 20


def ledger(k: int, knn_temp: float, ppl: float, torch: str = "2.13.0") -> dict:
    def run(settings: dict, metrics: dict, fp: str) -> dict:
        return {"settings": settings, "metrics": metrics, "wall_seconds": 1.0,
                "outputs": {fp[0]: {"path": "{out}/x", "fingerprint": fp, "checksummed": True}}}

    return {"format": 1, "recipe": {"name": "r", "shared": {"k": k, "knn_temp": knn_temp}},
            "environment": {"torch": torch, "cpu": "AMD EPYC"},
            "runs": {"knn_targets": run({"k": k, "knn_temp": knn_temp}, {"nnz": 10 * k}, f"t{k}"),
                     "knnlm_test": run({"k": k, "knn_temp": knn_temp, "lmbda": [0.25]}, {"perplexity": ppl}, "l"),
                     "eval_base_test": run({"model": "m"}, {"perplexity": 20.0}, "b")}}


def test_compare_names_each_changed_setting_once_with_the_runs_and_results_it_moved():
    diff = compare(ledger(64, 10.0, 15.0), ledger(128, 10.0, 14.5, torch="2.14.0"))
    assert [(c["setting"], c["a"], c["b"], c["runs"]) for c in diff["settings"]] == [
        ("k", "64", "128", ["knn_targets", "knnlm_test"])]
    assert [(c["name"], c["a"], c["b"]) for c in diff["recipe"]] == [("k", 64, 128)]
    assert diff["environment"] == [{"name": "torch", "a": "2.13.0", "b": "2.14.0"}]
    assert [c["name"] for c in diff["artifacts"]] == ["t"]  # the kNN targets; the others are the same bytes
    assert {(c["run"], c["metric"], c["a"], c["b"]) for c in diff["results"]} == {
        ("knn_targets", "nnz", 640, 1280), ("knnlm_test", "perplexity", 15.0, 14.5)}
    text = format_comparison(diff, "A", "B")
    assert "k: 64 -> 128  (knn_targets, knnlm_test)" in text
    assert "knnlm_test perplexity: 15 -> 14.5 (-0.5, -3.33%)" in text and "torch: 2.13.0 -> 2.14.0" in text
    same = compare(ledger(64, 10.0, 15.0), ledger(64, 10.0, 15.0))
    assert not any(same[key] for key in ("recipe", "settings", "environment", "artifacts", "results"))
