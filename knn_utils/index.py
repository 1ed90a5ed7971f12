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

from knn_utils.torch_search import TorchExactSearch, exact_nearest
from utils.artifacts.datastore import Datastore, datastore_summary, open_datastore
from utils.artifacts.index import (FORMAT_VERSION, INDEX_FILE, chunk_file, default_index_path, read_index_file,
                                   read_index_meta, write_index_atomically)
from utils.checksums import record_checksums
from utils.cli import UsageError
from utils.io import ArtifactError, atomic_directory, chunk_ranges, reuse_staging, timed, write_json
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "ivfpq", "flat")
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained
GPU_MAX_K = 2048  # GPU FAISS returns at most this many neighbours
RERANK_BYTES = 1 << 22  # the exact ranking on the CPU works in blocks of this size, which stay in the caches (4x faster than 64 MB)
KNN_GPU_HELP = ("Search on the GPU: with faiss-gpu, FAISS's GPU index on GPU 0; with faiss-cpu and an exact (flat) "
                "index, an exact torch search on the CUDA device; otherwise (an IVFPQ index, or no GPU) the CPU.")


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

    def __post_init__(self):
        for flag in ("ncentroids", "code_size", "train_size", "num_keys_to_add_at_a_time", "probe"):
            if getattr(self, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if not 1 <= self.nbits <= 16:
            raise UsageError(f"--nbits must be between 1 and 16, got {self.nbits}")
        if self.index_type not in INDEX_TYPES:
            raise UsageError(f"--index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")


def resolve_settings(settings: IndexSettings, rows: int, dim: int) -> tuple[IndexSettings, list[str]]:
    """Settings that fit a datastore of ``rows`` keys of dimension ``dim``, and the adjustments made.

    Impossible settings raise a `UsageError` that names the flag; harmless ones (a training sample
    larger than the datastore, nprobe above the number of lists) are adjusted and explained.
    """
    notes: list[str] = []
    resolved = IndexSettings(**asdict(settings))
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


def to_device(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """``index`` on GPU 0 when asked and possible, else unchanged (with a warning if a GPU was asked for)."""
    if not use_gpu:
        return index
    if not faiss_gpu_available():
        logger.warning("A GPU was asked for (--knn_gpu/--use_gpu) but FAISS sees none (faiss-cpu or no device): using the CPU")
        return index
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # IVFPQ lookup tables in float16: needed for large code sizes on GPU
    try:
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index, options)
    except RuntimeError as err:
        logger.warning("FAISS could not move the index to the GPU (%s); using the CPU", str(err).splitlines()[0])
        return index
    gpu_index.referenced_objects = [resources]
    return gpu_index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (CPU indexes are returned unchanged)."""
    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def read_keys(datastore: Datastore, begin: int, end: int) -> np.ndarray:
    """Keys ``[begin, end)`` as contiguous float32, (end - begin, d)."""
    return np.ascontiguousarray(datastore.keys[begin:end], dtype=np.float32)


def training_sample(datastore: Datastore, size: int, seed: int, chunk_rows: int = 65536) -> np.ndarray:
    """``size`` keys drawn without replacement (all keys if ``size`` is the row count), float32 (size, d)."""
    if size >= datastore.num_rows:
        rows = np.arange(datastore.num_rows)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(datastore.num_rows, size=size, replace=False))
    sample = np.empty((len(rows), datastore.dim), dtype=np.float32)
    for start in range(0, len(rows), chunk_rows):
        sample[start : start + chunk_rows] = datastore.keys[rows[start : start + chunk_rows]]
    return sample


def train_coarse_quantizer(index: faiss.IndexIVFPQ, sample: np.ndarray, use_gpu: bool) -> None:
    """k-means on ``sample``; the centroids become the IVF lists of ``index``."""
    clustering = faiss.Clustering(index.d, index.nlist, index.cp)
    clustering.train(sample, to_device(faiss.IndexFlatL2(index.d), use_gpu))
    index.quantizer.add(faiss.vector_to_array(clustering.centroids).reshape(index.nlist, index.d))  # (nlist, d)


def train(settings: IndexSettings, datastore: Datastore, use_gpu: bool, show_progress: bool) -> faiss.Index:
    """A trained, empty index (flat indexes need no training)."""
    index = new_index(settings, datastore.dim)
    if settings.index_type == "flat":
        return index
    with timed(f"Reading {settings.train_size} training keys", logger):
        sample = training_sample(datastore, settings.train_size, settings.seed)
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
        index.add(keys)  # flat ids are positions; merging the chunks in order makes them global
    else:
        index.add_with_ids(keys, np.arange(first_id, first_id + len(keys), dtype=np.int64))
    return to_cpu(index)


def add_chunks(staging: Path, trained: faiss.Index, datastore: Datastore, chunk_rows: int, use_gpu: bool,
               show_progress: bool) -> int:
    """Encode every chunk that is not on disk yet; return the number of chunks."""
    ranges = chunk_ranges(datastore.num_rows, chunk_rows)
    (staging / "chunks").mkdir(exist_ok=True)
    todo = [c for c in range(len(ranges)) if not chunk_file(staging, c).exists()]
    if len(todo) < len(ranges):
        logger.info("Resuming: %d of %d chunks already added", len(ranges) - len(todo), len(ranges))
    with timed(f"Adding {datastore.num_rows} keys in {len(ranges)} chunks", logger), \
            tqdm(total=datastore.num_rows, initial=datastore.num_rows - sum(ranges[c][1] - ranges[c][0] for c in todo),
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
                use_gpu: bool = False, show_progress: bool = True, verify: bool = True) -> dict:
    """Build the index of a datastore (its files verified first, with ``verify``) and return its meta (the
    contents of ``meta.json``), holding the index's lock.

    The datastore is opened (unverified) before the lock is taken: the default index lives inside it, and the
    lock must not create a missing datastore's directory. It is verified once the lock is held."""
    open_datastore(dstore_path, "--dstore_path", verify=False)
    index_path = Path(index_path) if index_path else default_index_path(dstore_path)
    with artifact_lock(index_path, "--index_path"):
        datastore = open_datastore(dstore_path, "--dstore_path", verify)
        return build_locked(datastore, index_path, settings, use_gpu, show_progress)


def build_locked(datastore: Datastore, index_path: Path, settings: IndexSettings | None, use_gpu: bool,
                 show_progress: bool) -> dict:
    """`build_index` once its lock is held."""
    if index_path.exists():
        raise ArtifactError(f"--index_path {index_path} already exists; delete it or choose another path")
    resolved, notes = resolve_settings(settings or IndexSettings(), datastore.num_rows, datastore.dim)
    for note in notes:
        logger.warning("%s", note)
    logger.info("Building a %s index over %s (%d keys of dimension %d) with %s; FAISS %s, %d threads",
                resolved.index_type, datastore.path, datastore.num_rows, datastore.dim, resolved,
                faiss.__version__, faiss.omp_get_max_threads())
    identity = {"datastore": datastore_summary(datastore), "settings": asdict(resolved)}
    with atomic_directory(index_path, resume=True) as staging:
        if reuse_staging(staging, identity):
            logger.info("Resuming the interrupted build in %s", staging)
        trained_file = staging / "trained.faiss"
        with timed("Training", logger) as train_time:
            if trained_file.exists():
                trained = faiss.read_index(str(trained_file))
                logger.info("Reusing the trained index %s", trained_file)
            else:
                trained = train(resolved, datastore, use_gpu, show_progress)
                write_index_atomically(trained, trained_file)
        with timed("Adding", logger) as add_time:
            num_chunks = add_chunks(staging, trained, datastore, resolved.num_keys_to_add_at_a_time, use_gpu, show_progress)
            index = merge_chunks(staging, trained, num_chunks)
        if index.ntotal != datastore.num_rows:
            raise ArtifactError(f"{staging}: the merged index holds {index.ntotal} keys, expected {datastore.num_rows}")
        with timed(f"Writing {index_path / INDEX_FILE}", logger):
            faiss.write_index(index, str(staging / INDEX_FILE))
        meta = {
            "kind": "index", "format_version": FORMAT_VERSION, "metric": "l2", "rows": int(index.ntotal),
            "dim": datastore.dim, **identity, "index_type": resolved.index_type, "probe": resolved.probe,
            "adjustments": notes, "faiss_version": faiss.__version__,
            "built_on": "gpu" if use_gpu and faiss_gpu_available() else "cpu",
            "seconds": {"train": round(train_time["seconds"], 3), "add": round(add_time["seconds"], 3)},
            "index_bytes": (staging / INDEX_FILE).stat().st_size,
            "checksums": record_checksums(staging, [INDEX_FILE]),
        }
        shutil.rmtree(staging / "chunks")
        for name in ("trained.faiss", "progress.json"):
            (staging / name).unlink()
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
class KnnIndex:
    """An opened index, its meta, and the datastore keys it indexes (for the exact ranking)."""

    index: faiss.Index | TorchExactSearch
    meta: dict
    path: Path
    keys: torch.Tensor  # (N, d) in the stored dtype: a view of the memory-mapped datastore, nothing is loaded

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query; None for an exact index."""
        return int(self.index.nprobe) if hasattr(self.index, "nprobe") else None

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
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        rerank = exact and not isinstance(self.index, TorchExactSearch)
        wanted = candidate_count(k) if rerank else k
        asked = min(wanted + (exclude_rows is not None), self.rows)
        dists, ids = self.index.search(queries, asked)  # (n, asked) each
        if asked < wanted:  # a datastore smaller than k: pad with "no neighbour"
            pad = ((0, 0), (0, wanted - asked))
            dists, ids = np.pad(dists, pad, constant_values=np.inf), np.pad(ids, pad, constant_values=-1)
        candidates = select_neighbours(dists, ids, wanted, exclude_rows)
        return nearest_exact(self.keys, queries, candidates.ids, k) if rerank else candidates


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
               use_gpu: bool = False, torch_device: str | None = None, verify: bool = True) -> KnnIndex:
    """Open the index of ``datastore`` for searching, with ``probe`` lists per query (default: the one it was built with).

    On the CPU the index file is memory-mapped read-only, so processes on one machine share one copy.
    An exact index asked for on a GPU (``use_gpu``) that FAISS cannot use is searched by `TorchExactSearch`
    on CUDA over the datastore's keys; ``torch_device`` ("cpu", "cuda:1" ...) forces that backend (the index
    file is not read then). With ``verify``, the index file is checked against its block checksums first.
    """
    index_path = Path(index_path)
    meta = read_index_meta(index_path, datastore)
    if meta["index_type"] == "flat" and probe is not None:
        logger.info("--probe %d does not apply: %s is an exact (flat) index", probe, index_path)
    device = torch_device or torch_search_device(meta["index_type"], use_gpu)
    if device is not None:
        if meta["index_type"] != "flat":
            raise ValueError(f"torch_device {device!r}: the torch search is exact, but {index_path} is an "
                             f"{meta['index_type']} index")
        logger.info("Exact search of %s runs in torch on %s, over the datastore's keys%s", index_path, device,
                    "" if torch_device else " (FAISS has no GPU here: faiss-cpu)")
        with timed(f"Loading {datastore.num_rows} keys onto {device}", logger):
            index = TorchExactSearch(datastore.keys, device)
        return KnnIndex(index=index, meta=meta, path=index_path, keys=index.keys)
    index = read_index_file(index_path, meta, mmap=not use_gpu, verify=verify)
    if meta["index_type"] == "ivfpq":
        if probe is not None and not 1 <= probe <= index.nlist:
            raise UsageError(f"--probe must be between 1 and the index's {index.nlist} lists, got {probe}")
        index.nprobe = probe or meta["probe"]
    index = to_device(index, use_gpu)
    return KnnIndex(index=index, meta=meta, path=index_path, keys=key_tensor(datastore))


def check_gpu_k(k: int, use_gpu: bool, exact: bool = True) -> None:
    """GPU FAISS returns at most `GPU_MAX_K` rows per query: the ``k`` neighbours (with the margin of an exact
    ranking, `candidate_count`) and the query's own row."""
    asked = candidate_count(k) if exact else k
    if use_gpu and faiss_gpu_available() and asked + 1 > GPU_MAX_K:
        raise UsageError(f"--k {k}: GPU FAISS returns at most {GPU_MAX_K} rows per query, and --k {k} asks for {asked + 1} "
                         f"({k} neighbours, a margin of {asked - k} for the exact ranking, the query's own row)")


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
