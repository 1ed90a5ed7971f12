"""A FAISS index over a datastore on disk: its directory layout, read, written and checked.

Layout of an index directory (by default ``<dstore_dir>/index``)::

    index.faiss   the FAISS index, L2 distance, ids 0..N-1 = datastore rows:
                  IndexIVFPQ (approximate) or IndexFlatL2 (exact)
    meta.json     kind "index": its type and settings, the default nprobe, the datastore it indexes
                  (path, rows, dim, keys/vals checksums), the adjustments made to the settings, timings,
                  the block checksums of index.faiss (utils/checksums.py: checked when it is read)

A sharded index (``build_index --index_shards N``) holds, instead of ``index.faiss``, one index per contiguous
range of datastore rows::

    shard_000.faiss ...   shard s indexes rows [begin_s, end_s) (the ranges of `shard_ranges`)
    meta.json             as above, plus "shards": [{"file", "begin", "end", "id_offset"}, ...]; a search result
                          id i of a shard is the datastore row i + id_offset (flat shards number their rows from 0,
                          IVFPQ shards store the global row ids: offset 0); block checksums of every shard file

While it is built (knn_utils/index_build.py), ``<index>.partial`` holds ``trained.faiss`` and one small index per
chunk of keys, ``chunks/chunk_000012.faiss`` (sharded: the same inside ``shard_000.partial/`` until
``shard_000.faiss`` is written); each file is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from utils.artifacts.datastore import Datastore
from utils.checksums import verify_files
from utils.io import ArtifactError, check_free_space, read_meta

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
DEFAULT_INDEX_NAME = "index"
META_FIELDS = ("rows", "dim", "index_type", "settings", "datastore.rows", "datastore.dim", "datastore.keys_sha256")


def default_index_path(dstore_path: str | os.PathLike) -> Path:
    """Where build_index puts the index of a datastore when --index_path is not given."""
    return Path(dstore_path) / DEFAULT_INDEX_NAME


def shard_ranges(rows: int, num_shards: int) -> list[tuple[int, int]]:
    """The contiguous row ranges ``[begin, end)`` of ``num_shards`` shards of a datastore of ``rows`` rows, sizes
    within one of each other."""
    bounds = np.linspace(0, rows, num_shards + 1).round().astype(int)
    return [(int(bounds[s]), int(bounds[s + 1])) for s in range(num_shards)]


def shard_file(shard: int) -> str:
    return f"shard_{shard:03d}.faiss"


def index_parts(meta: dict) -> list[dict]:
    """The index files of an index and the rows each holds: ``{"file", "begin", "end", "id_offset"}``, one for an
    unsharded index."""
    return meta.get("shards") or [{"file": INDEX_FILE, "begin": 0, "end": meta["rows"], "id_offset": 0}]


def check_parts(index_path: Path, meta: dict) -> None:
    """A sharded index's meta.json must name shard files inside the index directory (plain ``*.faiss`` names, no
    path: an edited name could make a reader map, or a rebuild overwrite, a file elsewhere) covering its rows in
    order."""
    shards = meta.get("shards")
    if shards is None:
        return
    where = f"{index_path / 'meta.json'}"
    if not isinstance(shards, list) or not shards:
        raise ArtifactError(f"{where}: its shards are not a list of files: the record is corrupt")
    begin = 0
    for part in shards:
        name = part.get("file") if isinstance(part, dict) else None
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or not name.endswith(".faiss"):
            raise ArtifactError(f"{where}: shard file {name!r} is not a .faiss file inside the index directory (a plain "
                                "file name); the record was edited or is corrupt")
        if not all(isinstance(part.get(key), int) for key in ("begin", "end", "id_offset")) or part["begin"] != begin \
                or part["end"] < begin:
            raise ArtifactError(f"{where}: shard {name} does not cover the rows that follow the previous shard's "
                                f"(from {begin}); the record was edited or is corrupt")
        begin = part["end"]
    if begin != meta["rows"]:
        raise ArtifactError(f"{where}: its shards cover {begin} rows, the index has {meta['rows']}; the record was "
                            "edited or is corrupt")


def chunk_file(staging: Path, chunk: int) -> Path:
    return staging / "chunks" / f"chunk_{chunk:06d}.faiss"


def write_index_atomically(index: faiss.Index, path: Path) -> None:
    """Write ``index`` under a temporary name and rename it; its size is checked against the free space first, and a
    file cut short by a full disk is removed."""
    tmp = path.with_name(path.name + ".tmp")
    check_free_space(path.parent, estimated_bytes(index), f"Writing the index {path}")
    try:
        faiss.write_index(index, str(tmp))
    except RuntimeError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def estimated_bytes(index: faiss.Index) -> int:
    """A lower bound of the size of ``index``'s file: its codes, and the ids of an IVF index."""
    return index.ntotal * (getattr(index, "code_size", 0) + (8 if hasattr(index, "nlist") else 0))


def check_index_matches(meta: dict, datastore: Datastore, index_path: Path) -> None:
    """Fail clearly when an index was built over another datastore than ``datastore``."""
    built_over = meta["datastore"]
    if built_over["dim"] != datastore.dim:
        raise ArtifactError(f"--index_path {index_path} indexes keys of dimension {built_over['dim']}, but the datastore "
                            f"{datastore.path} has dimension {datastore.dim}")
    if built_over["rows"] != datastore.num_rows or built_over["keys_sha256"] != datastore.meta["keys_sha256"]:
        raise ArtifactError(f"--index_path {index_path} was built over the datastore {built_over['path']} "
                            f"({built_over['rows']} rows), not over {datastore.path} ({datastore.num_rows} rows, "
                            "other keys checksum); rebuild the index with knn_utils.build_index")


def read_index_meta(index_path: Path, datastore: Datastore) -> dict:
    """The ``meta.json`` of the index at ``index_path``, checked to index ``datastore``."""
    try:
        meta = read_meta(index_path, "index", META_FIELDS)
        check_parts(index_path, meta)
    except ArtifactError as err:
        raise ArtifactError(f"--index_path {index_path}: {err} Build it with knn_utils.build_index.") from None
    check_index_matches(meta, datastore, index_path)
    return meta


def read_index_file(index_path: Path, meta: dict, mmap: bool = True, verify: bool = True,
                    part: dict | None = None, allow_unverified: bool = False) -> faiss.Index:
    """The FAISS index of ``index_path`` (of a sharded index: the shard ``part``, one of `index_parts`), read-only;
    memory-mapped (shared between processes) when ``mmap``; with ``verify``, checked against its block checksums
    first (an index without them is refused unless ``allow_unverified``)."""
    check_parts(index_path, meta)
    part = part or index_parts(meta)[0]
    path, rows = index_path / part["file"], part["end"] - part["begin"]
    if verify:
        verify_files(index_path, meta, [part["file"]], allow_unverified)
    flags = faiss.IO_FLAG_MMAP_IFC if meta["index_type"] == "flat" else faiss.IO_FLAG_MMAP
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY | (flags if mmap else 0))
    except RuntimeError as err:  # FAISS reports a missing, truncated or corrupt file as a RuntimeError
        raise ArtifactError(f"{path} is missing, truncated or corrupt (expected a {meta['index_type']} "
                            f"index of {rows} keys): {str(err).splitlines()[0]}. Rebuild it with "
                            "knn_utils.build_index") from None
    if index.ntotal != rows or index.d != meta["dim"]:
        raise ArtifactError(f"{path} holds {index.ntotal} keys of dimension {index.d}, "
                            f"meta.json says {rows} of dimension {meta['dim']}")
    return index
