"""The run ledger: one JSON file per run recording what produced its numbers, and the comparison of two runs.

``OUT/ledger.json`` (rewritten atomically after every stage by `scripts.pipeline`)::

    {"format": 1,
     "recipe": {"path", "name", "text", "overrides", "shared"},       # the recipe as read, and its shared values
     "environment": {...},                                             # utils.environment.machine(): CPU, GPU, versions
     "runs": {"knn_targets": {"stage", "module", "argv", "settings",   # settings: flag -> value, run paths as {out}/...
                              "inputs": {name: {"path", "fingerprint"}}, "outputs": {...},
                              "metrics": {...}, "wall_seconds", "peak_rss_bytes", "finished"}, ...},
     "started", "updated"}

`compare` (``python -m scripts.pipeline compare RUN_A RUN_B``) lists what differs between two ledgers: the
settings (each changed flag once, with the runs it reached), the library versions and the machine, the
artifacts (by fingerprint) and the results (each metric with its change). A fingerprint is the hash of an
artifact's ``meta.json``, which holds the block checksums of every file it describes (`utils.checksums`),
so no large file is read again: the hash of those checksums, which two runs that wrote the same bytes share
(timings and paths in ``meta.json`` do not count). A directory without checksums is hashed file by file (files
over 64 MiB by their size and first and last MiB); results directories are compared by their numbers instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from utils.io import META_NAME, read_json, write_json

FORMAT = 1
SAMPLED_FILE_BYTES = 64 << 20  # larger files are fingerprinted by size and their first and last MiB
EDGE_BYTES = 1 << 20
TIMING_WORDS = ("second", "runtime", "time", "took", "steps_per", "samples_per")


# ---------------------------------------------------------------------------------------------------
# Fingerprints


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= SAMPLED_FILE_BYTES:
            for piece in iter(lambda: f.read(EDGE_BYTES), b""):
                digest.update(piece)
        else:
            digest.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            digest.update(f.read(EDGE_BYTES))


def has_checksums(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an artifact whose ``meta.json`` records the block checksums of its files."""
    meta = Path(path) / META_NAME
    return meta.is_file() and bool(read_json(meta).get("checksums"))


def fingerprint(path: str | os.PathLike) -> str | None:
    """A short hash identifying an artifact (file or directory) as it is now; None when it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    if path.is_file():
        _file_digest(path, digest)
    elif (path / META_NAME).is_file():
        meta = read_json(path / META_NAME)
        recorded = meta.get("checksums") if isinstance(meta, dict) else None
        digest.update(json.dumps(recorded, sort_keys=True).encode() if recorded else (path / META_NAME).read_bytes())
    else:
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            _file_digest(file, digest)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Metrics and resources of a stage


def is_timing(key: str) -> bool:
    return any(word in key for word in TIMING_WORDS)


def flat_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a results file as ``{"a/b": value}``, without timings (seconds, tokens/s, ...), which
    move from run to run and are recorded as the stage's wall time instead. A list of entries with a ``lmbda``
    (a sweep) is keyed by it: ``lmbda_sweep/lmbda=0.5/perplexity``."""
    flat = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if is_timing(str(key)):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) and "lmbda" in v for v in value):
            value = {f"lmbda={entry['lmbda']:g}": {k: v for k, v in entry.items() if k != "lmbda"} for entry in value}
        if isinstance(value, dict):
            flat.update(flat_metrics(value, name + "/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            flat[name] = value
    return flat


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants, from /proc (0 where /proc is missing)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for children in Path(f"/proc/{current}/task").glob("*/children"):
                todo += [int(child) for child in children.read_text().split()]
        except (OSError, ValueError):
            continue
    return total


@contextmanager
def measured(interval: float = 0.1) -> Iterator[dict]:
    """Time a block and sample the peak resident memory of this process and its children meanwhile; the dict it
    yields receives ``wall_seconds`` and ``peak_rss_bytes`` (resource.getrusage where /proc is missing)."""
    record: dict = {}
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes(os.getpid()))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record["wall_seconds"] = round(time.perf_counter() - start, 2)
        if not peak[0]:  # no /proc: the peaks so far (kilobytes on Linux)
            usage = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
            peak[0] = usage * 1024
        record["peak_rss_bytes"] = peak[0]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------
# The ledger file


class Ledger:
    """``OUT/ledger.json``: created on a run's first stage, updated (atomically) after every stage."""

    def __init__(self, path: str | os.PathLike, recipe: dict, environment: dict):
        self.path = Path(path)
        previous = read_json(self.path) if self.path.is_file() else {}
        self.data = {"format": FORMAT, "started": previous.get("started", now()), "recipe": recipe,
                     "environment": environment, "runs": previous.get("runs", {}), "updated": now()}
        if previous.get("environment") not in (None, environment):
            self.data["earlier_environments"] = [*previous.get("earlier_environments", []), previous["environment"]]

    @property
    def runs(self) -> dict:
        return self.data["runs"]

    def record(self, name: str, entry: dict) -> None:
        self.runs[name] = {**entry, "finished": now()}
        self.save()

    def save(self) -> None:
        self.data["updated"] = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.data)


def read_ledger(path: str | os.PathLike) -> dict:
    """A ledger from its file or from a run directory holding ``ledger.json``."""
    from utils.cli import UsageError

    path = Path(path)
    file = path / "ledger.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path}: no ledger.json (a run directory written by scripts/pipeline.sh, or its ledger.json)")
    ledger = read_json(file)
    if ledger.get("format") != FORMAT:
        raise UsageError(f"{file} is not a run ledger of format {FORMAT}")
    return ledger


# ---------------------------------------------------------------------------------------------------
# Comparing two runs


def _setting_changes(a: dict, b: dict) -> list[dict]:
    """Each changed (flag, before, after) once, with the runs it reached; runs present in one ledger only aside."""
    grouped: dict[tuple, list[str]] = {}
    for run in sorted(set(a["runs"]) & set(b["runs"])):
        before, after = a["runs"][run].get("settings", {}), b["runs"][run].get("settings", {})
        for flag in sorted(set(before) | set(after)):
            if before.get(flag) != after.get(flag):
                key = (flag, repr(before.get(flag)), repr(after.get(flag)))
                grouped.setdefault(key, []).append(run)
    return [{"setting": flag, "a": before, "b": after, "runs": runs} for (flag, before, after), runs in grouped.items()]


def _dict_changes(a: dict, b: dict) -> list[dict]:
    return [{"name": k, "a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _artifacts(ledger: dict) -> dict[str, dict]:
    """The checksummed artifacts a run read or wrote (results directories are compared by their numbers)."""
    found = {}
    for entry in ledger["runs"].values():
        for name, artifact in {**entry.get("inputs", {}), **entry.get("outputs", {})}.items():
            if artifact.get("checksummed"):
                found[name] = artifact
    return found


def compare(a: dict, b: dict) -> dict:
    """What differs between two ledgers: settings, versions and machine, artifacts, results, stages run."""
    results = []
    for run in sorted(set(a["runs"]) & set(b["runs"])):
        before, after = a["runs"][run].get("metrics", {}), b["runs"][run].get("metrics", {})
        for name in sorted(set(before) | set(after)):
            x, y = before.get(name), after.get(name)
            if x != y:
                results.append({"run": run, "metric": name, "a": x, "b": y})
    artifacts_a, artifacts_b = _artifacts(a), _artifacts(b)
    artifacts = [{"name": name, "a": artifacts_a.get(name, {}).get("fingerprint"),
                  "b": artifacts_b.get(name, {}).get("fingerprint")}
                 for name in sorted(set(artifacts_a) | set(artifacts_b))
                 if artifacts_a.get(name, {}).get("fingerprint") != artifacts_b.get(name, {}).get("fingerprint")]
    env_a, env_b = a.get("environment", {}), b.get("environment", {})
    return {
        "recipe": _dict_changes({"name": a["recipe"].get("name"), **a["recipe"].get("shared", {})},
                                {"name": b["recipe"].get("name"), **b["recipe"].get("shared", {})}),
        "settings": _setting_changes(a, b),
        "environment": _dict_changes(env_a, env_b),
        "artifacts": artifacts,
        "results": results,
        "runs_only_in_a": sorted(set(a["runs"]) - set(b["runs"])),
        "runs_only_in_b": sorted(set(b["runs"]) - set(a["runs"])),
        "wall_seconds": [sum(r.get("wall_seconds", 0) for r in ledger["runs"].values()) for ledger in (a, b)],
    }


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _change(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        relative = f", {100 * (b - a) / abs(a):+.2f}%" if a else ""
        return f"{_number(a)} -> {_number(b)} ({b - a:+.6g}{relative})"
    return f"{_number(a)} -> {_number(b)}"


def format_comparison(diff: dict, name_a: str, name_b: str) -> str:
    """The comparison as text, one section per kind of difference; empty sections say so."""
    lines = [f"A: {name_a}", f"B: {name_b}", ""]

    def section(title: str, rows: list[str]) -> None:
        lines.append(f"{title}:" if rows else f"{title}: none differ")
        lines.extend(f"  {row}" for row in rows)

    section("recipe (shared values)", [f"{c['name']}: {_change(c['a'], c['b'])}" for c in diff["recipe"]])
    section("settings", [f"{c['setting']}: {c['a']} -> {c['b']}  ({', '.join(c['runs'])})" for c in diff["settings"]])
    section("versions and machine", [f"{c['name']}: {_change(c['a'], c['b'])}" for c in diff["environment"]])
    section("artifacts", [f"{c['name']}: {c['a'] or 'absent'} -> {c['b'] or 'absent'}" for c in diff["artifacts"]])
    section("results", [f"{c['run']} {c['metric']}: {_change(c['a'], c['b'])}" for c in diff["results"]])
    for side, runs in (("A", diff["runs_only_in_a"]), ("B", diff["runs_only_in_b"])):
        if runs:
            lines.append(f"stages run only in {side}: {', '.join(runs)}")
    lines.append(f"wall time of the stages: A {diff['wall_seconds'][0]:.0f} s, B {diff['wall_seconds'][1]:.0f} s")
    return "\n".join(lines)
