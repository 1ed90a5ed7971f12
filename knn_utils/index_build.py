"""Building the FAISS index over a datastore's keys, resumably (pipeline step 3): settings, training,
adding the keys chunk by chunk, merging, and one index per shard with ``--index_shards``.

The index directory's layout is utils/artifacts/index.py's; knn_utils/index_search.py opens and searches it.

Building happens in ``<index>.partial``: ``trained.faiss`` (the trained, still empty index) is written
once after training, then every chunk of ``--num_keys_to_add_at_a_time`` keys is encoded into its own
small index ``chunks/chunk_000012.faiss`` (written under a temporary name and renamed). A killed build
resumes after its last finished chunk; at the end the chunks are merged in row order into
``index.faiss``, which is the same index as adding all keys in one go.

Keys are float16 on disk and FAISS wants float32: they are converted one chunk at a time, so the
datastore is never loaded whole into memory.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from knn_utils.faiss_devices import faiss_gpu_available, to_cpu, to_device
from utils.artifacts.datastore import Datastore, datastore_summary, open_datastore
from utils.artifacts.index import (FORMAT_VERSION, INDEX_FILE, chunk_file, default_index_path, shard_file, shard_ranges,
                                   write_index_atomically)
from utils.checksums import record_checksums
from utils.cli import UsageError
from utils.io import ArtifactError, atomic_directory, chunk_ranges, reuse_staging, timed, write_json
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "ivfpq", "flat")
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained


@dataclass
class IndexSettings:
    """How to build the index (the released flags of build_index.py, plus --index_type, --train_size and --seed)."""

    index_type: str = field(
        default="auto",
        metadata={"help": "ivfpq (approximate, compressed), flat (exact IndexFlatL2) or auto: flat when the datastore "
                  f"has fewer than {MIN_POINTS_PER_CENTROID} keys per centroid, ivfpq otherwise.",
                  "choices": list(INDEX_TYPES)},
    )
    ncentroids: int = field(default=4096, metadata={"help": "IVF lists (k-means centroids of the coarse quantizer)."})
    code_size: int = field(
        default=32, metadata={"help": "PQ sub-quantizers (bytes per key at 8 bits); must divide the key dimension."}
    )
    nbits: int = field(default=8, metadata={"help": "Bits per PQ sub-quantizer code (1-16)."})
    train_size: int = field(default=1_000_000, metadata={"help": "Keys sampled (without replacement) to train the index."})
    num_keys_to_add_at_a_time: int = field(
        default=1_000_000, metadata={"help": "Keys encoded per chunk; a killed build resumes after the last finished chunk."}
    )
    probe: int = field(default=32, metadata={"help": "Default nprobe (IVF lists visited per query) recorded for searches."})
    seed: int = field(default=1, metadata={"help": "Seed of the training sample and of FAISS's k-means."})
    index_shards: int = field(
        default=1,
        metadata={"help": "Build one index per contiguous range of datastore rows (ids stay the global row numbers), to be "
                  "searched by as many processes, each holding one shard, or by one process shard after shard; the "
                  "neighbours are the same (docs/distributed.md). --ncentroids and --train_size apply to each shard."},
    )

    def __post_init__(self):
        for flag in ("ncentroids", "code_size", "train_size", "num_keys_to_add_at_a_time", "probe", "index_shards"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if not 1 <= self.nbits <= 16:
            raise UsageError(f"--nbits must be between 1 and 16, got {self.nbits}")
        if self.index_type not in INDEX_TYPES:
            raise UsageError(f"--index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")


def resolve_settings(settings: IndexSettings, rows: int, dim: int) -> tuple[IndexSettings, list[str]]:
    """Settings that fit a datastore of ``rows`` keys of dimension ``dim`` (of each of its shards, with
    ``--index_shards``), and the adjustments made.

    Impossible settings raise a `UsageError` that names the flag; harmless ones (a training sample
    larger than the datastore, nprobe above the number of lists) are adjusted and explained.
    """
    notes: list[str] = []
    resolved = IndexSettings(**asdict(settings))
    if resolved.index_shards > rows:
        raise UsageError(f"--index_shards {resolved.index_shards} is more than the datastore's {rows} keys")
    if resolved.index_shards > 1:  # every shard is built with the same settings, resolved for the smallest one
        rows = min(end - begin for begin, end in shard_ranges(rows, resolved.index_shards))
        notes.append(f"--index_shards {resolved.index_shards}: the settings are resolved for the smallest shard, {rows} keys")
    if resolved.index_type == "auto":
        enough = rows >= MIN_POINTS_PER_CENTROID * resolved.ncentroids
        resolved.index_type = "ivfpq" if enough else "flat"
        notes.append(f"--index_type auto chose {resolved.index_type}: the datastore has {rows} keys, "
                     f"{'at least' if enough else 'fewer than'} {MIN_POINTS_PER_CENTROID} x --ncentroids {resolved.ncentroids}")
    if resolved.index_type == "flat":
        return resolved, notes
    if resolved.ncentroids > rows:
        raise UsageError(f"--ncentroids {resolved.ncentroids} is more than the datastore's {rows} keys; "
                         "use fewer centroids or --index_type flat")
    if dim % resolved.code_size:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 128]
        raise UsageError(f"--code_size {resolved.code_size} does not divide the key dimension {dim}; "
                         f"choose one of {divisors}")
    if resolved.train_size > rows:
        notes.append(f"--train_size {resolved.train_size} lowered to the datastore's {rows} keys")
        resolved.train_size = rows
    if resolved.train_size < resolved.ncentroids:
        raise UsageError(f"--train_size {resolved.train_size} is smaller than --ncentroids {resolved.ncentroids}: "
                         "k-means needs at least one training key per centroid")
    if resolved.train_size < 2 ** resolved.nbits:
        raise UsageError(f"--train_size {resolved.train_size} is smaller than the 2^{resolved.nbits} codes of each PQ "
                         f"sub-quantizer (--nbits {resolved.nbits}); lower --nbits or use --index_type flat")
    if resolved.train_size < MIN_POINTS_PER_CENTROID * resolved.ncentroids:
        notes.append(f"only {resolved.train_size} training keys for {resolved.ncentroids} centroids (FAISS advises "
                     f"{MIN_POINTS_PER_CENTROID} per centroid): the index will be under-trained, recall lower")
    if resolved.probe > resolved.ncentroids:
        notes.append(f"--probe {resolved.probe} lowered to --ncentroids {resolved.ncentroids}")
        resolved.probe = resolved.ncentroids
    return resolved, notes


def new_index(settings: IndexSettings, dim: int) -> faiss.Index:
    """An empty, untrained index of the resolved ``settings``."""
    if settings.index_type == "flat":
        return faiss.IndexFlatL2(dim)
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, settings.ncentroids, settings.code_size, settings.nbits)
    index.cp.seed = settings.seed
    index.pq.cp.seed = settings.seed
    index.cp.min_points_per_centroid = 1  # under-training is checked and logged by resolve_settings
    index.pq.cp.min_points_per_centroid = 1
    return index


def read_keys(datastore: Datastore, begin: int, end: int) -> np.ndarray:
    """Keys ``[begin, end)`` as contiguous float32, (end - begin, d)."""
    return np.ascontiguousarray(datastore.keys[begin:end], dtype=np.float32)


def training_sample(datastore: Datastore, size: int, seed: int, chunk_rows: int = 65536,
                    rows: tuple[int, int] | None = None) -> np.ndarray:
    """``size`` keys of the row range ``rows`` (default: all) drawn without replacement (all of them if ``size`` is
    the range's length), float32 (size, d)."""
    begin, end = rows or (0, datastore.num_rows)
    if size >= end - begin:
        picked = np.arange(begin, end)
    else:
        picked = begin + np.sort(np.random.default_rng(seed).choice(end - begin, size=size, replace=False))
    sample = np.empty((len(picked), datastore.dim), dtype=np.float32)
    for start in range(0, len(picked), chunk_rows):
        sample[start : start + chunk_rows] = datastore.keys[picked[start : start + chunk_rows]]
    return sample


def train_coarse_quantizer(index: faiss.IndexIVFPQ, sample: np.ndarray, use_gpu: bool) -> None:
    """k-means on ``sample``; the centroids become the IVF lists of ``index``."""
    clustering = faiss.Clustering(index.d, index.nlist, index.cp)
    clustering.train(sample, to_device(faiss.IndexFlatL2(index.d), use_gpu))
    index.quantizer.add(faiss.vector_to_array(clustering.centroids).reshape(index.nlist, index.d))  # (nlist, d)


def train(settings: IndexSettings, datastore: Datastore, use_gpu: bool, show_progress: bool,
          rows: tuple[int, int] | None = None) -> faiss.Index:
    """A trained, empty index (flat indexes need no training) for the row range ``rows`` (default: all)."""
    index = new_index(settings, datastore.dim)
    if settings.index_type == "flat":
        return index
    with timed(f"Reading {settings.train_size} training keys", logger):
        sample = training_sample(datastore, settings.train_size, settings.seed, rows=rows)
    with tqdm(total=2, desc="Training", unit="stage", disable=not show_progress) as progress:
        with timed(f"Coarse k-means ({settings.ncentroids} centroids, {len(sample)} keys)", logger):
            train_coarse_quantizer(index, sample, use_gpu)
        progress.update()
        with timed(f"Product quantizer training ({settings.code_size} x {settings.nbits} bits, on the residuals)", logger):
            device_index = to_device(index, use_gpu)
            device_index.train(sample)  # the quantizer is trained already: this trains the PQ only
            index = to_cpu(device_index)
        progress.update()
    return index


def encode_chunk(trained: faiss.Index, keys: np.ndarray, first_id: int, use_gpu: bool) -> faiss.Index:
    """A copy of ``trained`` holding only ``keys``, with ids ``first_id, first_id + 1, ...``."""
    index = to_device(faiss.clone_index(trained), use_gpu)
    if isinstance(trained, faiss.IndexFlat):
        index.add(keys)  # flat ids are positions in the (shard's) index; its meta records the offset to the rows
    else:
        index.add_with_ids(keys, np.arange(first_id, first_id + len(keys), dtype=np.int64))
    return to_cpu(index)


def add_chunks(staging: Path, trained: faiss.Index, datastore: Datastore, chunk_rows: int, use_gpu: bool,
               show_progress: bool, rows: tuple[int, int] | None = None) -> int:
    """Encode every chunk of the row range ``rows`` (default: all) that is not on disk yet; return the number of chunks."""
    begin_rows, end_rows = rows or (0, datastore.num_rows)
    ranges = [(begin_rows + b, begin_rows + e) for b, e in chunk_ranges(end_rows - begin_rows, chunk_rows)]
    (staging / "chunks").mkdir(exist_ok=True)
    todo = [c for c in range(len(ranges)) if not chunk_file(staging, c).exists()]
    if len(todo) < len(ranges):
        logger.info("Resuming: %d of %d chunks already added", len(ranges) - len(todo), len(ranges))
    total = end_rows - begin_rows
    with timed(f"Adding {total} keys in {len(ranges)} chunks", logger), \
            tqdm(total=total, initial=total - sum(ranges[c][1] - ranges[c][0] for c in todo),
                 desc="Adding keys", unit="key", unit_scale=True, disable=not show_progress) as progress:
        for c in todo:
            begin, end = ranges[c]
            write_index_atomically(encode_chunk(trained, read_keys(datastore, begin, end), begin, use_gpu),
                                   chunk_file(staging, c))
            progress.update(end - begin)
    return len(ranges)


def merge_chunks(staging: Path, trained: faiss.Index, num_chunks: int) -> faiss.Index:
    """All chunk indexes merged in row order into one copy of ``trained``."""
    index = faiss.clone_index(trained)
    with timed(f"Merging {num_chunks} chunks", logger):
        for c in range(num_chunks):
            index.merge_from(faiss.read_index(str(chunk_file(staging, c))), 0)
    return index


def build_index(dstore_path: str, index_path: str | None = None, settings: IndexSettings | None = None,
                use_gpu: bool = False, show_progress: bool = True, verify: bool = True,
                allow_unverified: bool = False) -> dict:
    """Build the index of a datastore (its files verified first, with ``verify``) and return its meta (the
    contents of ``meta.json``), holding the index's lock.

    The datastore is opened (unverified) before the lock is taken: the default index lives inside it, and the
    lock must not create a missing datastore's directory. It is verified once the lock is held."""
    open_datastore(dstore_path, "--dstore_path", verify=False)
    index_path = Path(index_path) if index_path else default_index_path(dstore_path)
    with artifact_lock(index_path, "--index_path"):
        datastore = open_datastore(dstore_path, "--dstore_path", verify, allow_unverified)
        return build_locked(datastore, index_path, settings, use_gpu, show_progress)


def build_part(work: Path, settings: IndexSettings, datastore: Datastore, rows: tuple[int, int], use_gpu: bool,
               show_progress: bool) -> tuple[faiss.Index, dict]:
    """The index of the rows ``rows`` (the whole datastore, or one shard), built resumably in ``work``: its trained
    index, then its chunks; returns it with the seconds spent training and adding."""
    work.mkdir(exist_ok=True)
    trained_file = work / "trained.faiss"
    with timed("Training", logger) as train_time:
        if trained_file.exists():
            trained = faiss.read_index(str(trained_file))
            logger.info("Reusing the trained index %s", trained_file)
        else:
            trained = train(settings, datastore, use_gpu, show_progress, rows)
            write_index_atomically(trained, trained_file)
    with timed("Adding", logger) as add_time:
        num_chunks = add_chunks(work, trained, datastore, settings.num_keys_to_add_at_a_time, use_gpu, show_progress, rows)
        index = merge_chunks(work, trained, num_chunks)
    if index.ntotal != rows[1] - rows[0]:
        raise ArtifactError(f"{work}: the merged index holds {index.ntotal} keys, expected {rows[1] - rows[0]}")
    return index, {"train": train_time["seconds"], "add": add_time["seconds"]}


def build_locked(datastore: Datastore, index_path: Path, settings: IndexSettings | None, use_gpu: bool,
                 show_progress: bool) -> dict:
    """`build_index` once its lock is held.

    Unsharded, the index is built in the staging directory itself (the layout of utils/artifacts/index.py);
    with ``--index_shards N``, shard ``s`` is built in ``shard_00s.partial/`` and written to ``shard_00s.faiss``
    when complete, so a rerun skips the finished shards and resumes the unfinished one after its last chunk.
    """
    if index_path.exists():
        raise ArtifactError(f"--index_path {index_path} already exists; delete it or choose another path")
    resolved, notes = resolve_settings(settings or IndexSettings(), datastore.num_rows, datastore.dim)
    for note in notes:
        logger.warning("%s", note)
    logger.info("Building a %s index over %s (%d keys of dimension %d) with %s; FAISS %s, %d threads",
                resolved.index_type, datastore.path, datastore.num_rows, datastore.dim, resolved,
                faiss.__version__, faiss.omp_get_max_threads())
    identity = {"datastore": datastore_summary(datastore), "settings": asdict(resolved)}
    sharded = resolved.index_shards > 1
    ranges = shard_ranges(datastore.num_rows, resolved.index_shards)
    seconds = {"train": 0.0, "add": 0.0}
    with atomic_directory(index_path, resume=True) as staging:
        if reuse_staging(staging, identity):
            logger.info("Resuming the interrupted build in %s", staging)
        files = [shard_file(s) if sharded else INDEX_FILE for s in range(len(ranges))]
        for s, (begin, end) in enumerate(ranges):
            if (staging / files[s]).exists():
                logger.info("Shard %d (rows %d-%d) is built already", s, begin, end)
                continue
            if sharded:
                logger.info("Shard %d of %d: rows %d-%d", s, len(ranges), begin, end)
            work = staging / (files[s].removesuffix(".faiss") + ".partial") if sharded else staging
            index, part_seconds = build_part(work, resolved, datastore, (begin, end), use_gpu, show_progress)
            with timed(f"Writing {index_path / files[s]}", logger):
                write_index_atomically(index, staging / files[s])
            seconds = {name: seconds[name] + part_seconds[name] for name in seconds}
            if sharded:
                shutil.rmtree(work)
            else:
                shutil.rmtree(staging / "chunks")
                (staging / "trained.faiss").unlink()
        meta = {
            "kind": "index", "format_version": FORMAT_VERSION, "metric": "l2", "rows": datastore.num_rows,
            "dim": datastore.dim, **identity, "index_type": resolved.index_type, "probe": resolved.probe,
            "adjustments": notes, "faiss_version": faiss.__version__,
            "built_on": "gpu" if use_gpu and faiss_gpu_available() else "cpu",
            "seconds": {name: round(value, 3) for name, value in seconds.items()},
            "index_bytes": sum((staging / name).stat().st_size for name in files),
            "checksums": record_checksums(staging, files),
        }
        if sharded:  # flat shards number their rows from 0, IVFPQ shards hold the global row ids
            meta["shards"] = [{"file": name, "begin": begin, "end": end,
                               "id_offset": begin if resolved.index_type == "flat" else 0}
                              for name, (begin, end) in zip(files, ranges)]
        (staging / "progress.json").unlink()
        write_json(staging / "meta.json", meta)
    logger.info("Index written to %s (%.1f MB)", index_path, meta["index_bytes"] / 1e6)
    return meta
