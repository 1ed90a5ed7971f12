"""Block checksums of an artifact's files: recorded in its ``meta.json`` when it is written, checked before a
stage reads it.

Each file is hashed in blocks of `BLOCK_BYTES` bytes with XXH3-128 (xxHash), and ``meta.json`` records,
per file (named relative to the artifact directory)::

    "checksums": {"keys.npy": {"algorithm": "xxh3_128", "block_bytes": 67108864, "bytes": 1536000128,
                               "blocks": ["9f2c...", ...]}}

XXH3 (in the ``xxhash`` package) hashes page-cached data at 7-13 GB/s on one core of the project's 2-core
machine, against 1.6 GB/s for SHA-256 and 0.9 GB/s for BLAKE2b: faster than a disk delivers it, so
verifying a file costs about one sequential read of it (benchmarks/bench_verify.py). The SHA-256 of the
arrays stays in ``meta.json`` as their identity (other artifacts refer to it); writers compute it in the
same read as the block checksums (`checksum_npy`). A datastore is
memory-mapped and read in random order (training shuffles its rows), so a file cannot be checked block by
block as it is used: `verify_files` reads it once, streamed in `READ_BYTES` pieces with bounded memory,
when the artifact is opened. A mismatch names the first bad block, its bytes and, for a ``.npy`` file, its
rows. Blocks of 64 MiB keep ``meta.json`` small (about 8,000 digests for 500 GB) while still saying where
a file was damaged.

A record cannot switch verification off: it must list every file the reader names, and each file's block
list must cover the whole file (``ceil(bytes / block_bytes)`` digests). An artifact with no ``checksums``
at all (written before they were recorded, or with the record removed) is refused unless the caller
accepts unverified input (``allow_unverified``, the ``--allow_unverified`` flag): then it is read with one
warning. The whole-array SHA-256 identities beside the blocks (``keys_sha256`` ...) are checked by
``python -m utils.verify`` (`check_file`'s ``data_sha256``), in the same read as the blocks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash
from tqdm.auto import tqdm

from utils.io import META_NAME, ArtifactError

logger = logging.getLogger(__name__)

ALGORITHM = "xxh3_128"
HASHES: dict[str, Callable] = {"xxh3_128": xxhash.xxh3_128, "xxh3_64": xxhash.xxh3_64, "sha256": hashlib.sha256}
BLOCK_BYTES = 64 << 20  # read at call time, so tests can make blocks small
READ_BYTES = 1 << 20  # pieces of about this size hash fastest from the page cache (measured: 1 MiB > 16 MiB)
PROGRESS_BYTES = 1 << 30  # reading more than this shows a progress bar
MODEL_INDEX = "model.safetensors.index.json"

_warned_unverifiable: set[Path] = set()


def _digests(path: Path, algorithm: str, block_bytes: int, progress: tqdm | None = None,
             sha256=None, sha256_from: int = 0) -> Iterator[str]:
    """The digest of each ``block_bytes`` block of the file, in order, read in `READ_BYTES` pieces.

    ``sha256`` (a hashlib object), when given, also receives the bytes from offset ``sha256_from`` on.
    """
    new_hash = HASHES[algorithm]
    buffer = memoryview(bytearray(min(READ_BYTES, block_bytes)))
    position, filled, block = 0, 0, new_hash()
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer[: min(len(buffer), block_bytes - filled)]):
            piece = buffer[:size]
            block.update(piece)
            if sha256 is not None and position + size > sha256_from:
                sha256.update(piece[max(0, sha256_from - position):])
            position, filled = position + size, filled + size
            if progress is not None:
                progress.update(size)
            if filled == block_bytes:
                yield block.hexdigest()
                filled, block = 0, new_hash()
    if filled:
        yield block.hexdigest()


def progress_bar(total: int, what: str) -> tqdm:
    """A byte counter for reading ``total`` bytes, shown only when that is more than `PROGRESS_BYTES`."""
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=total < PROGRESS_BYTES)


def checksum_file(path: str | os.PathLike, block_bytes: int | None = None) -> dict:
    """The block checksums of a file, as recorded in ``meta.json``."""
    path = Path(path)
    return _checksum(path, block_bytes or BLOCK_BYTES)


def _checksum(path: Path, block_bytes: int, sha256=None, sha256_from: int = 0) -> dict:
    size = path.stat().st_size
    with progress_bar(size, f"Checksumming {path.name}") as progress:
        blocks = list(_digests(path, ALGORITHM, block_bytes, progress, sha256, sha256_from))
    return {"algorithm": ALGORITHM, "block_bytes": block_bytes, "bytes": size, "blocks": blocks}


def checksum_npy(path: str | os.PathLike, block_bytes: int | None = None) -> tuple[dict, str]:
    """The block checksums of a ``.npy`` file and, from the same read, the SHA-256 of its array's data.

    The SHA-256 equals `utils.io.array_sha256` of the array (the artifacts' identity in ``meta.json``).
    """
    path = Path(path)
    layout = npy_layout(path)
    if layout is None or layout[2]:
        raise ValueError(f"{path} is not a C-ordered .npy file")
    sha256 = hashlib.sha256()
    record = _checksum(path, block_bytes or BLOCK_BYTES, sha256, sha256_from=layout[0])
    return record, sha256.hexdigest()


def record_checksums(directory: str | os.PathLike, names: list[str], block_bytes: int | None = None) -> dict:
    """``meta.json``'s ``checksums``: the block checksums of each file ``names`` lists under ``directory``."""
    with _timed_pass(Path(directory), names, "Checksummed"):
        return {name: checksum_file(Path(directory) / name, block_bytes) for name in names}


def model_files(directory: str | os.PathLike) -> list[str]:
    """What ``from_pretrained`` reads from a directory written by ``save_pretrained``: config and weights."""
    directory = Path(directory)
    names = ["config.json", MODEL_INDEX] + sorted(p.name for p in directory.glob("*.safetensors"))
    return [name for name in names if (directory / name).is_file()]


# ---------------------------------------------------------------------------------------------------
# Checking


def npy_layout(path: Path) -> tuple[int, int, bool] | None:
    """Where a ``.npy`` file's data starts, the bytes of one row, and whether it is Fortran-ordered (None: no
    readable header)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran_order, dtype = read_header[version](f)
            offset = f.tell()
    except (ValueError, KeyError, OSError, SyntaxError):
        return None
    return offset, dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)), fortran_order


def _block_range(path: Path, block: int, block_bytes: int, size: int) -> str:
    """"bytes a-b" of a block (inclusive), and its rows for a ``.npy`` file."""
    begin, end = block * block_bytes, min((block + 1) * block_bytes, size)
    where = f"bytes {begin:,}-{end - 1:,}"
    layout = npy_layout(path) if path.suffix == ".npy" else None
    if layout is not None and not layout[2] and layout[1] > 0:
        offset, row_bytes, _ = layout
        if end <= offset:
            return f"{where}, the .npy header"
        first, last = max(begin - offset, 0) // row_bytes, (end - 1 - offset) // row_bytes
        where += f", rows {first:,}-{last:,}"
    return where


def record_problem(record) -> str | None:
    """What makes a file's checksum record unusable (a missing field, a block list that does not cover the whole
    file), or None. A record that lists fewer blocks than the file has would verify only part of it."""
    if not isinstance(record, dict):
        return f"has a checksum record that is not a JSON object ({record!r})"
    if record.get("algorithm") not in HASHES:
        return f"was recorded with the hash {record.get('algorithm')!r}, which this version cannot compute"
    size, block_bytes, blocks = record.get("bytes"), record.get("block_bytes"), record.get("blocks")
    if not isinstance(size, int) or size < 0 or not isinstance(block_bytes, int) or block_bytes < 1 \
            or not isinstance(blocks, list) or not all(isinstance(block, str) for block in blocks):
        return ("has a checksum record without a valid bytes, block_bytes or blocks list in meta.json: the record was "
                "edited or is corrupt")
    if len(blocks) != -(-size // block_bytes):
        return (f"has {len(blocks)} block checksums in meta.json, but {size:,} bytes in blocks of {block_bytes:,} make "
                f"{-(-size // block_bytes)}: the record does not cover the whole file (edited or corrupt)")
    return None


def check_file(path: str | os.PathLike, record: dict, progress: tqdm | None = None,
               data_sha256: str | None = None) -> str | None:
    """What is wrong with a file against its recorded block checksums, or None when it matches.

    Stops at the first block that differs. ``data_sha256``, for a ``.npy`` file, is the SHA-256 its artifact
    records for the array's data (its identity, e.g. ``keys_sha256``): it is computed in the same read and compared
    too.
    """
    path = Path(path)
    if problem := record_problem(record):
        return problem
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"is {size:,} bytes, meta.json records {record['bytes']:,}: the file changed or was cut short"
    layout = npy_layout(path) if data_sha256 is not None else None
    if data_sha256 is not None and (layout is None or layout[2]):
        return "is not a C-ordered .npy file, but meta.json records the SHA-256 of its array"
    sha256 = hashlib.sha256() if data_sha256 is not None else None
    digests = _digests(path, record["algorithm"], record["block_bytes"], progress, sha256,
                       layout[0] if layout else 0)
    for block, (found, expected) in enumerate(zip(digests, record["blocks"])):
        if found != expected:
            where = _block_range(path, block, record["block_bytes"], size)
            return f"block {block} ({where}) does not match meta.json: the file changed or is corrupt"
    if sha256 is not None and sha256.hexdigest() != data_sha256:
        return (f"matches its block checksums, but its array's SHA-256 {sha256.hexdigest()[:16]}... differs from the "
                f"identity meta.json records ({data_sha256[:16]}...): the file and its block record were replaced")
    return None


UNVERIFIED_HINT = ("pass --allow_unverified (allow_unverified=True) to read it unverified, or rebuild it to record them")


def warn_unverifiable(directory: Path) -> None:
    """Warn, once per directory and process, that an artifact has no block checksums to verify."""
    if directory.resolve() not in _warned_unverifiable:
        _warned_unverifiable.add(directory.resolve())
        logger.warning("%s records no block checksums (written before they were recorded, or the record was removed): "
                       "its files are read unverified (--allow_unverified)", directory)


def refuse_unverifiable(directory: Path, what: str, allow_unverified: bool) -> bool:
    """An artifact without checksums: an `ArtifactError` naming ``what`` is missing, unless ``allow_unverified``
    (then one warning). Returns False (nothing was verified)."""
    if not allow_unverified:
        raise ArtifactError(f"{directory}: {what}, so its files cannot be verified (written before block checksums "
                            f"were recorded, or the record was removed); {UNVERIFIED_HINT}")
    warn_unverifiable(directory)
    return False


def verify_files(directory: str | os.PathLike, meta: dict, names: list[str] | None = None,
                 allow_unverified: bool = False) -> bool:
    """Check the files ``names`` (default: all recorded) of an artifact against ``meta``'s block checksums.

    Raises `ArtifactError` naming the file and its first bad block, or the record's defect. An artifact with no
    ``checksums`` (written before block checksums were recorded, or the record removed) is an `ArtifactError` too,
    unless ``allow_unverified``: then it is read after one warning and False is returned. True when every file
    was checked.
    """
    directory = Path(directory)
    recorded = meta.get("checksums")
    if not recorded:
        return refuse_unverifiable(directory, f"its {META_NAME} records no block checksums", allow_unverified)
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{directory}/{META_NAME}: its checksums are not a JSON object: the record is corrupt")
    names = list(recorded) if names is None else names
    if missing := [name for name in names if name not in recorded]:
        refuse_unverifiable(directory, f"its {META_NAME} records no checksums for {', '.join(missing)}",
                            allow_unverified)
        names = [name for name in names if name in recorded]
    for name in names:
        if problem := record_problem(recorded[name]):
            raise ArtifactError(f"{directory / name} {problem}")
    total = sum(recorded[name]["bytes"] for name in names)
    with _timed_pass(directory, names, "Verified"), progress_bar(total, f"Verifying {directory.name}") as progress:
        for name in names:
            if problem := check_file(directory / name, recorded[name], progress):
                raise ArtifactError(f"{directory / name} {problem}")
    return not missing


@contextmanager
def _timed_pass(directory: Path, names: list[str], verb: str) -> Iterator[None]:
    """Log one line for a pass over some files of an artifact: how many bytes, how long, how fast."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    size = sum((directory / name).stat().st_size for name in names)
    logger.info("%s %s (%s): %.2f GB in %.2f s (%.2f GB/s)", verb, directory, ", ".join(names), size / 1e9, seconds,
                size / 1e9 / max(seconds, 1e-9))
