"""Artifact directories: atomic writes, `meta.json`, checksums.

Every stage writes its artifact into ``<dir>.partial`` and renames it to ``<dir>`` only once it is
complete, so a directory without the suffix is always finished; while it does, it holds the artifact's lock
(`utils.locking`), so no other run writes the same artifact. The ``meta.json`` inside records what
produced the artifact; the next stage reads it instead of asking the user to repeat sizes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from utils.cli import UsageError

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
PARTIAL_SUFFIX = ".partial"


class ArtifactError(UsageError):
    """An artifact on disk is missing, incomplete or does not match what the caller expects."""


class DiskFullError(ArtifactError):
    """The file system an artifact is written to has no room for it."""


def output_directory(path: str | os.PathLike) -> Path:
    """Where the artifact named ``path`` is written: through a symbolic link (dangling or not), the directory it
    names, so that its staging directory sits beside that one, the rename stays on one file system, and a
    replacement removes the directory, never the link (the policy `atomic_directory` and training follow)."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def partial_path(path: str | os.PathLike) -> Path:
    """The staging directory where ``path`` is built before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a link planted there is removed, not followed
    with open(tmp, "x") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail before any computation when the artifact ``path`` (a file or a directory, which may not exist yet)
    could not be written: it, if it exists, and the nearest existing directory above it must be writable."""
    path = Path(path).absolute()
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ArtifactError(f"{flag} {path}: cannot be written, {above} is a file, not a directory")
    for place in (path, above) if path.exists() else (above,):
        if not os.access(place, os.W_OK | (os.X_OK if place.is_dir() else 0)):
            raise ArtifactError(f"{flag} {path}: cannot be written, {place} is not writable by this user")


def load_array(path: str | os.PathLike, expected: str, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one array of an artifact; a missing, truncated or corrupt file is an `ArtifactError` naming the
    file and ``expected`` (what it should hold, e.g. "float16 keys of shape (N, d)"), not a traceback from numpy."""
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing (expected {expected})") from None
    except (ValueError, OSError, EOFError) as err:
        raise ArtifactError(f"{path} is truncated or corrupt (expected {expected}): {err}") from None


def read_meta_file(path: Path, expected: str) -> dict:
    """A JSON object from ``path``; a truncated file, other bytes or another JSON value is an `ArtifactError`."""
    try:
        meta = read_json(path)
    except ValueError as err:  # a truncated file, or not UTF-8
        raise ArtifactError(f"{path} is truncated or corrupt (expected {expected}): {err}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} holds a JSON {type(meta).__name__}, not an object (expected {expected})")
    return meta


def check_fields(record: dict, fields: Iterable[str], where: str | os.PathLike) -> None:
    """``record`` (read from ``where``) must hold every entry of ``fields``; ``a.b`` names an entry of a nested
    object. A missing one is an `ArtifactError` naming the file and the entries."""
    missing = []
    for name in fields:
        value = record
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            missing.append(name)
    if missing:
        raise ArtifactError(f"{where} lacks {', '.join(repr(name) for name in missing)}: it was edited or is corrupt "
                            "(rebuild the artifact)")


@contextmanager
def atomic_directory(path: str | os.PathLike, resume: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` when the block succeeds.

    With ``resume=True`` an existing staging directory from an interrupted run is reused (the caller
    decides what in it can be kept); otherwise it is wiped first. ``path`` itself must not exist.
    """
    path = Path(path).resolve()  # through a link: built beside the directory it names (where its lock is)
    if path.exists():
        raise ArtifactError(f"{path} already exists; refusing to overwrite it.")
    staging = partial_path(path)
    if staging.exists() and not resume:
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    yield staging
    os.replace(staging, path)


def reuse_staging(staging: Path, identity: dict, initialise: Callable[[Path], None] | None = None) -> bool:
    """Keep a staging directory left by an interrupted run with the same ``identity``; start any other afresh.

    Returns True when the directory is kept (the caller resumes from what it holds). Otherwise the
    directory is emptied, ``initialise(staging)`` lays out what the run needs, and only then is
    ``progress.json`` (the identity) written, so a crash during the set-up is never mistaken for a run
    that can be resumed. The caller holds the artifact's lock (`utils.locking`): without it, a second run
    would empty a staging directory that another run is still filling.
    """
    progress = staging / "progress.json"
    if progress.is_file() and read_json(progress) == identity:
        return True
    if staging.exists() and any(staging.iterdir()):
        logger.warning("Discarding %s: it was started with other settings or inputs", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if initialise is not None:
        initialise(staging)
    write_json(progress, identity)
    return False


# ---------------------------------------------------------------------------------------------------
# A full disk: checked up front where the size is known, one clear error where it is not

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NPY_HEADER_BYTES = 128  # what a .npy file adds to its array's bytes (at most, for the arrays written here)
NO_SPACE_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def existing_directory(path: str | os.PathLike) -> Path:
    """``path``, or the nearest directory above it that exists (where a new file's bytes would go)."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for ordinary users on the file system of ``path`` (which may not exist yet): `shutil.disk_usage`."""
    return shutil.disk_usage(existing_directory(path)).free


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Fail before writing ``needed`` bytes to ``path`` when its file system has not that much free (a
    `DiskFullError` naming ``what``, the path and both sizes)."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(f"{what}: not enough space for {path}: it needs {needed:,} bytes, the file system of "
                            f"{existing_directory(path)} has {free:,} free. Free some space or write it elsewhere.")


def preallocate(path: str | os.PathLike, what: str) -> None:
    """Reserve the disk blocks of a file that will be written through a memory map (`np.lib.format.open_memmap`
    creates it sparse): on a full disk, a write into a sparse map kills the process with SIGBUS, with no message;
    reserved first, it is an `OSError` here, reported as a `DiskFullError` naming the file and its size."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise DiskFullError(f"{what}: not enough space for {path}: it needs {size:,} bytes, the file system of "
                                f"{existing_directory(Path(path).parent)} has {free_bytes(path):,} free. Free some "
                                "space or write it elsewhere.") from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: mapped as before
            raise
    finally:
        os.close(fd)


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception (OSError, FAISS's RuntimeError, a SafetensorError ...) reports a full disk or quota."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    return any(message in str(err) for message in NO_SPACE_MESSAGES)


@contextmanager
def reporting_full_disk(paths: list[tuple[str | os.PathLike, str]]) -> Iterator[None]:
    """Turn a full disk met inside the block, whatever library met it, into a `DiskFullError` naming the file (when
    the error says which) or the artifact being written (``paths``: ``(path, flag)`` pairs), and the free space."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:  # noqa: BLE001 -- FAISS and safetensors report a full disk in their own types
        if not is_disk_full(err) or not paths:
            raise
        path, flag = paths[0]
        written = getattr(err, "filename", None) or path
        raise DiskFullError(f"{flag} {path}: the disk is full: writing {written} failed ({str(err).splitlines()[0]}); "
                            f"the file system of {existing_directory(written)} has {free_bytes(written):,} bytes free. "
                            "Free some space and rerun the same command (it resumes), or write elsewhere.") from None


def array_sha256(array: np.ndarray, chunk_rows: int = 1 << 16) -> str:
    """SHA-256 of an array's contents, row chunk by row chunk (works on memory maps)."""
    digest = hashlib.sha256()
    for start in range(0, len(array), chunk_rows):
        digest.update(np.ascontiguousarray(array[start : start + chunk_rows]).tobytes())
    return digest.hexdigest()


@contextmanager
def timed(what: str, log: logging.Logger = logger) -> Iterator[dict]:
    """Log how long a block took; the dict it yields receives ``seconds`` at the end."""
    record: dict = {}
    start = time.perf_counter()
    yield record
    record["seconds"] = time.perf_counter() - start
    log.info("%s took %.2f s", what, record["seconds"])


def save_metrics(output_dir: str, name: str, metrics: dict) -> None:
    """Write ``<name>_results.json`` and merge the metrics into ``all_results.json`` (as run_clm does)."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, f"{name}_results.json"), metrics)
    all_path = os.path.join(output_dir, "all_results.json")
    combined = read_json(all_path) if os.path.exists(all_path) else {}
    write_json(all_path, {**combined, **metrics})


def chunk_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Consecutive ``[begin, end)`` row ranges of at most ``chunk_rows`` rows covering ``[0, rows)``."""
    return [(begin, min(begin + chunk_rows, rows)) for begin in range(0, rows, chunk_rows)]
