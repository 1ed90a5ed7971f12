"""Where FAISS runs: copies of an index on the GPUs, FAISS-GPU's limits, and FAISS's CPU threads.

Shared by building (knn_utils/index_build.py) and searching (knn_utils/index_search.py). Every function
falls back to the CPU, with a warning, where a GPU was asked for and FAISS cannot use one (pip's
faiss-cpu, or no device).
"""

from __future__ import annotations

import logging
import os

import faiss
import torch

logger = logging.getLogger(__name__)

GPU_MAX_K = 2048  # FAISS-GPU's largest k and nprobe (GPU_MAX_SELECTION_K, faiss/gpu/utils/DeviceDefs.cuh, CUDA builds)
FLOAT32_LOOKUP_LIMIT = 16384  # FAISS-GPU IVFPQ needs float16 lookup tables above code_size x 2^nbits = this (GpuIndexIVFPQConfig)


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


def configure_threads(num_processes: int) -> int:
    """Share the machine's cores between the processes of one machine for FAISS's OpenMP threads.

    ``OMP_NUM_THREADS`` (which ``accelerate launch`` sets from --num_cpu_threads_per_process) wins.
    `utils.openmp` (imported by every knn_utils entry point before torch and FAISS) sets ``OMP_WAIT_POLICY`` to
    PASSIVE: the two OpenMP runtimes otherwise spin-wait for the same cores.
    """
    if num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // num_processes))
    return faiss.omp_get_max_threads()
