"""The FAISS index over a datastore's keys: building it (resumably), opening it, searching it.

The index directory's layout is utils/artifacts/index.py's.

Building happens in ``<index>.partial``: ``trained.faiss`` (the trained, still empty index) is written
once after training, then every chunk of ``--num_keys_to_add_at_a_time`` keys is encoded into its own
small index ``chunks/chunk_000012.faiss`` (written under a temporary name and renamed). A killed build
resumes after its last finished chunk; at the end the chunks are merged in row order into
``index.faiss``, which is the same index as adding all keys in one go.

Keys are float16 on disk and FAISS wants float32: they are converted one chunk at a time, so the
datastore is never loaded whole into memory.

Searching an exact (flat) index on a GPU needs faiss-gpu, which pip does not ship; with faiss-cpu,
`knn_utils.torch_search.TorchExactSearch` searches the datastore's keys on the GPU with torch instead and
gives the same neighbours.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from knn_utils.sharded import GatheredQueries, ShardExchange, distributed_world, merge_neighbours, shards_of_process
from knn_utils.torch_search import TorchExactSearch, exact_nearest
from utils.artifacts.datastore import Datastore, datastore_summary, open_datastore
from utils.artifacts.index import (FORMAT_VERSION, INDEX_FILE, chunk_file, default_index_path, index_parts,
                                   read_index_file, read_index_meta, shard_file, shard_ranges, write_index_atomically)
from utils.checksums import record_checksums
from utils.cli import UsageError
from utils.io import ArtifactError, atomic_directory, chunk_ranges, reuse_staging, timed, write_json
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "ivfpq", "flat")
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained
GPU_MAX_K = 2048  # FAISS-GPU's largest k and nprobe (GPU_MAX_SELECTION_K, faiss/gpu/utils/DeviceDefs.cuh, CUDA builds)
FLOAT32_LOOKUP_LIMIT = 16384  # FAISS-GPU IVFPQ needs float16 lookup tables above code_size x 2^nbits = this (GpuIndexIVFPQConfig)
RERANK_BYTES = 1 << 22  # the exact ranking on the CPU works in blocks of this size, which stay in the caches (4x faster than 64 MB)
KNN_GPU_HELP = ("Search on the GPU: with faiss-gpu, FAISS's GPU index on this process's GPU (one process and several "
                "GPUs: sharded over all of them); with faiss-cpu and an exact (flat) index, an exact torch search on the "
                "CUDA device; otherwise (an IVFPQ index, or no GPU) the CPU.")


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


def faiss_gpu_available() -> bool:
    """Whether this FAISS build can use a GPU and sees one."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def needs_float16_lookup_tables(index: faiss.Index) -> bool:
    """Whether FAISS-GPU can search this IVFPQ index only with float16 lookup tables (more than
    `FLOAT32_LOOKUP_LIMIT` = code_size x 2^nbits entries per table); float32 tables are used below that."""
    return isinstance(index, faiss.IndexIVFPQ) and index.pq.M * index.pq.ksub > FLOAT32_LOOKUP_LIMIT


def gpu_options(index: faiss.Index, all_gpus: bool = False):
    """FAISS's options to clone ``index`` to one GPU (or, ``all_gpus``, sharded over all of them)."""
    options = faiss.GpuMultipleClonerOptions() if all_gpus else faiss.GpuClonerOptions()
    options.useFloat16 = needs_float16_lookup_tables(index)  # for an IVFPQ index: useFloat16LookupTables
    if all_gpus:
        options.shard = True  # each GPU holds a part of the rows (faiss.IndexShards), not a copy
    return options


def process_gpu() -> int:
    """The GPU of this process: torch's current CUDA device (accelerate sets it to the local rank), else 0."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def to_device(index: faiss.Index, use_gpu: bool, gpu: int | None = None, all_gpus: bool = False) -> faiss.Index:
    """``index`` on a GPU when asked and possible, else unchanged (with a warning if a GPU was asked for).

    The GPU is ``gpu``, by default this process's (`process_gpu`). ``all_gpus`` (one process driving every
    GPU of its machine) shards the index's rows over all the GPUs FAISS sees, through
    ``faiss.index_cpu_to_all_gpus``: an index too large for one GPU's memory is searched by all of them.
    """
    if not use_gpu:
        return index
    if not faiss_gpu_available():
        logger.warning("A GPU was asked for (--knn_gpu/--use_gpu) but FAISS sees none (faiss-cpu or no device): using the CPU")
        return index
    all_gpus = all_gpus and faiss.get_num_gpus() > 1
    try:
        if all_gpus:
            gpu_index = faiss.index_cpu_to_all_gpus(index, gpu_options(index, all_gpus=True))
            logger.info("The index is sharded over %d GPUs", faiss.get_num_gpus())
        else:
            resources = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(resources, process_gpu() if gpu is None else gpu, index, gpu_options(index))
            gpu_index.referenced_objects = [resources]
    except RuntimeError as err:
        logger.warning("FAISS could not move the index to the GPU (%s); using the CPU", str(err).splitlines()[0])
        return index
    return gpu_index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (CPU indexes are returned unchanged)."""
    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


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


@dataclass
class Neighbours:
    """The ``k`` nearest datastore rows of each query, nearest first; id -1 (distance inf) where none was found."""

    ids: np.ndarray  # int64 (n, k)
    dists: np.ndarray  # float32 (n, k) squared L2 distances (exact ones, unless searched with exact=False)

    @property
    def valid(self) -> np.ndarray:
        return self.ids >= 0  # bool (n, k)


def select_neighbours(dists: np.ndarray, ids: np.ndarray, k: int, exclude_rows: np.ndarray | None = None) -> Neighbours:
    """The ``k`` nearest valid results of a FAISS search, sorted by distance, leaving out ``exclude_rows``.

    ``exclude_rows`` (n,) gives, per query, a datastore row to drop (the query's own row) -- matched by
    id, so an exact duplicate of the query stored under another row is kept. Results are sorted here
    because not every FAISS build returns them sorted; ``-1`` results (fewer hits than asked) are kept
    at the end as id -1 with an infinite distance.
    """
    invalid = ids < 0
    if exclude_rows is not None:
        invalid |= ids == np.asarray(exclude_rows, dtype=np.int64)[:, None]
    order = np.argsort(np.where(invalid, np.inf, dists), axis=1, kind="stable")[:, :k]  # (n, k)
    keep_invalid = np.take_along_axis(invalid, order, axis=1)
    return Neighbours(
        ids=np.where(keep_invalid, -1, np.take_along_axis(ids, order, axis=1)),
        dists=np.where(keep_invalid, np.inf, np.take_along_axis(dists, order, axis=1)).astype(np.float32),
    )


def candidate_count(k: int) -> int:
    """Rows asked of the index for ``k`` exact neighbours: ``k`` plus a margin (k / 8, at least 8) for the rounding
    of the index's own distances, which changes with the number of queries per search call."""
    return k + max(8, k // 8)


def nearest_exact(keys: torch.Tensor, queries: np.ndarray, ids: np.ndarray, k: int) -> Neighbours:
    """Of the candidate rows ``ids`` (n, c >= k; -1 for none), the ``k`` nearest each query (n, d) by exact float32
    distance to the stored ``keys``, equal distances to the lower row: `TorchExactSearch`'s ranking, on the CPU."""
    dists, rows = exact_nearest(keys, torch.from_numpy(queries), torch.from_numpy(ids), k, max_bytes=RERANK_BYTES)
    return Neighbours(ids=rows.numpy(), dists=dists.numpy())


@dataclass
class Shard:
    """One searchable part of an index: a FAISS index (or `TorchExactSearch`) over the datastore rows
    ``[begin, end)``, whose result id ``i`` is the row ``i + id_offset``."""

    searcher: faiss.Index | TorchExactSearch
    begin: int
    end: int
    id_offset: int = 0

    def search(self, keys: torch.Tensor, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None,
               exact: bool) -> Neighbours:
        """The ``k`` nearest rows of this shard to each query (global row ids): see `KnnIndex.search`."""
        rerank = exact and not isinstance(self.searcher, TorchExactSearch)
        wanted = candidate_count(k) if rerank else k
        asked = min(wanted + (exclude_rows is not None), self.end - self.begin)
        dists, ids = self.searcher.search(queries, asked)  # (n, asked) each
        if self.id_offset:
            ids = np.where(ids >= 0, ids + self.id_offset, -1)
        if asked < wanted:  # a datastore (shard) smaller than k: pad with "no neighbour"
            pad = ((0, 0), (0, wanted - asked))
            dists, ids = np.pad(dists, pad, constant_values=np.inf), np.pad(ids, pad, constant_values=-1)
        candidates = select_neighbours(dists, ids, wanted, exclude_rows)
        return nearest_exact(keys, queries, candidates.ids, k) if rerank else candidates


@dataclass
class KnnIndex:
    """An opened index, its meta, and the datastore keys it indexes (for the exact ranking).

    ``shards`` are the parts this process searches: the whole index, or, for an index built with
    ``--index_shards``, the shards this process holds (all of them in a single process). ``collective``: the
    shards are spread over the processes of a ``torch.distributed`` group, so every search is a collective
    step that every process must take (knn_utils/sharded.py), and a process out of queries calls `finish`.
    """

    shards: list[Shard]
    meta: dict
    path: Path
    keys: torch.Tensor  # (N, d) in the stored dtype: a view of the memory-mapped datastore, nothing is loaded
    nprobe: int | None = None  # IVF lists visited per query; None for an exact index
    collective: bool = False
    exchange: ShardExchange | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def index(self) -> faiss.Index | TorchExactSearch:
        """The searcher of the (first) shard this process holds."""
        return self.shards[0].searcher

    def search(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None = None, exact: bool = True) -> Neighbours:
        """The ``k`` nearest rows of each query (n, d), leaving out ``exclude_rows`` (see `select_neighbours`).

        ``exact`` (the default): the index proposes `candidate_count` rows (one more when ``exclude_rows`` is
        given), and the ``k`` nearest of them by exact float32 distance to the stored keys are kept, equal
        distances to the lower row (`nearest_exact`). The result then depends on each query alone, not on the
        other queries of the call: with an exact index it is the exact ``k`` nearest rows, for any batching.
        With IVFPQ it is the exact ``k`` nearest among the index's best candidates by PQ distance, which are
        themselves computed per query; only when the query's probed lists or the candidates at the margin's
        edge hang on a near-tie in FAISS's float32 arithmetic can the batching still change them.
        `TorchExactSearch` ranks this way already and is not re-ranked.
        ``exact=False``: the index's own ``k`` nearest and its distances (PQ approximations for IVFPQ), whose
        rounding and near-ties change with the number of queries per call; no keys are read.

        A sharded index does this in every shard and merges the shards' lists by distance, equal distances to
        the lower row (`knn_utils.sharded.merge_neighbours`), across processes when ``collective``.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.collective:
            return self.search_local(queries, k, exclude_rows, exact)
        step = self.exchange.gather_queries(queries, exclude_rows, k, exact)
        return self.answer(step, k)

    def search_local(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None, exact: bool) -> Neighbours:
        """`search` over the shards this process holds, one after another, merged."""
        found = [shard.search(self.keys, queries, k, exclude_rows, exact) for shard in self.shards]
        if len(found) == 1:
            return found[0]
        if not found:  # a process of a group with more processes than shards
            return Neighbours(ids=np.full((len(queries), k), -1, dtype=np.int64),
                              dists=np.full((len(queries), k), np.inf, dtype=np.float32))
        dists, ids = merge_neighbours([f.dists for f in found], [f.ids for f in found], k)
        return Neighbours(ids=ids, dists=dists)

    def answer(self, step: GatheredQueries, k: int) -> Neighbours:
        """Search this process's shards for every process's queries of ``step``, and merge everyone's lists of ours."""
        found = self.search_local(step.queries, step.k, step.exclude_rows, step.exact)  # (N, step.k)
        dists, ids = self.exchange.merge_results(found.dists, found.ids, step.mine, k)
        return Neighbours(ids=ids, dists=dists)

    def finish(self) -> None:
        """A collective index: answer the other processes' searches until every process has called this."""
        if not self.collective:
            return
        empty = np.zeros((0, self.meta["dim"]), dtype=np.float32)
        while not (step := self.exchange.gather_queries(empty, None, 0, False, done=True)).all_done:
            self.answer(step, 0)


def key_tensor(datastore: Datastore) -> torch.Tensor:
    """The datastore's keys as a CPU tensor sharing the read-only memory map (it is only ever read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(datastore.keys))


def torch_search_device(index_type: str, use_gpu: bool) -> str | None:
    """"cuda" when an exact index is wanted on a GPU that FAISS cannot use (faiss-cpu) but torch can, else None."""
    if index_type == "flat" and use_gpu and not faiss_gpu_available() and torch.cuda.is_available():
        return "cuda"
    return None


def load_index(index_path: str | os.PathLike, datastore: Datastore, probe: int | None = None,
               use_gpu: bool = False, torch_device: str | None = None, verify: bool = True,
               allow_unverified: bool = False) -> KnnIndex:
    """Open the index of ``datastore`` for searching, with ``probe`` lists per query (default: the one it was built with).

    On the CPU the index file is memory-mapped read-only, so processes on one machine share one copy.
    An exact index asked for on a GPU (``use_gpu``) that FAISS cannot use is searched by `TorchExactSearch`
    on CUDA over the datastore's keys; ``torch_device`` ("cpu", "cuda:1" ...) forces that backend (the index
    file is not read then). With ``verify``, the index file is checked against its block checksums first (an index
    without them is refused unless ``allow_unverified``).

    A sharded index (``--index_shards``) under a ``torch.distributed`` group of several processes: this process
    opens only its shards (`knn_utils.sharded.shards_of_process`) and searches collectively; in one process,
    all the shards. With faiss-gpu and one process, the index is spread over all the GPUs FAISS sees (an
    unsharded one through FAISS's own sharding, shard ``s`` of a sharded one on GPU ``s`` mod their number).
    """
    index_path = Path(index_path)
    meta = read_index_meta(index_path, datastore)
    if meta["index_type"] == "flat" and probe is not None:
        logger.info("--probe %d does not apply: %s is an exact (flat) index", probe, index_path)
    rank, world_size = distributed_world()
    parts = index_parts(meta)
    sharded = len(parts) > 1
    held = [parts[s] for s in shards_of_process(len(parts), rank, world_size)] if sharded else parts
    if sharded:
        logger.info("%s has %d shards; process %d of %d searches %s", index_path, len(parts), rank, world_size,
                    ", ".join(part["file"] for part in held) or "none (more processes than shards)")
    device = torch_device or torch_search_device(meta["index_type"], use_gpu)
    common = {"meta": meta, "path": index_path, "collective": sharded and world_size > 1}
    if common["collective"]:
        common["exchange"] = ShardExchange()
    if device is not None:
        if meta["index_type"] != "flat":
            raise ValueError(f"torch_device {device!r}: the torch search is exact, but {index_path} is an "
                             f"{meta['index_type']} index")
        logger.info("Exact search of %s runs in torch on %s, over the datastore's keys%s", index_path, device,
                    "" if torch_device else " (FAISS has no GPU here: faiss-cpu)")
        with timed(f"Loading {sum(p['end'] - p['begin'] for p in held)} keys onto {device}", logger):
            shards = [Shard(TorchExactSearch(datastore.keys[p["begin"] : p["end"]], device), p["begin"], p["end"], p["begin"])
                      for p in held]
        keys = shards[0].searcher.keys if not sharded else key_tensor(datastore)
        return KnnIndex(shards=shards, keys=keys, **common)
    nprobe, num_gpus = None, faiss.get_num_gpus() if use_gpu and faiss_gpu_available() else 0
    shards = []
    for position, part in enumerate(held):
        index = read_index_file(index_path, meta, mmap=not use_gpu, verify=verify, part=part,
                                allow_unverified=allow_unverified)
        if meta["index_type"] == "ivfpq":
            if probe is not None and not 1 <= probe <= index.nlist:
                raise UsageError(f"--probe must be between 1 and the index's {index.nlist} lists, got {probe}")
            index.nprobe = nprobe = probe or meta["probe"]
            check_gpu_probe(nprobe, use_gpu)
        if num_gpus > 1 and world_size == 1:  # one process drives every GPU
            index = to_device(index, use_gpu, all_gpus=True) if not sharded else to_device(index, use_gpu, position % num_gpus)
        else:
            index = to_device(index, use_gpu)
        shards.append(Shard(index, part["begin"], part["end"], part["id_offset"]))
    return KnnIndex(shards=shards, keys=key_tensor(datastore), nprobe=nprobe, **common)


def check_gpu_k(k: int, use_gpu: bool, exact: bool = True) -> None:
    """FAISS-GPU returns at most `GPU_MAX_K` rows per query: the ``k`` neighbours (with the margin of an exact
    ranking, `candidate_count`) and the query's own row."""
    asked = candidate_count(k) if exact else k
    if use_gpu and faiss_gpu_available() and asked + 1 > GPU_MAX_K:
        raise UsageError(f"--k {k}: FAISS-GPU returns at most {GPU_MAX_K} rows per query, and --k {k} asks for {asked + 1} "
                         f"({k} neighbours, a margin of {asked - k} for the exact ranking, the query's own row); "
                         f"use --k {max_gpu_k(exact)} or less, or search on the CPU")


def max_gpu_k(exact: bool = True) -> int:
    """The largest ``--k`` `check_gpu_k` lets through."""
    return max(k for k in range(1, GPU_MAX_K) if (candidate_count(k) if exact else k) + 1 <= GPU_MAX_K)


def check_gpu_probe(probe: int, use_gpu: bool) -> None:
    """FAISS-GPU visits at most `GPU_MAX_K` IVF lists per query."""
    if use_gpu and faiss_gpu_available() and probe > GPU_MAX_K:
        raise UsageError(f"--probe {probe}: FAISS-GPU visits at most {GPU_MAX_K} lists per query; use --probe "
                         f"{GPU_MAX_K} or less, or search on the CPU")


def configure_threads(num_processes: int) -> int:
    """Share the machine's cores between the processes of one machine for FAISS's OpenMP threads.

    ``OMP_NUM_THREADS`` (which ``accelerate launch`` sets from --num_cpu_threads_per_process) wins.
    Entry points also default ``OMP_WAIT_POLICY`` to PASSIVE before torch and FAISS load: their two
    OpenMP runtimes otherwise spin-wait for the same cores, which made FAISS several times slower on a
    2-core machine.
    """
    if num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))
    return faiss.omp_get_max_threads()
