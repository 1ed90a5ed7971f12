"""What a number was measured on: the machine and the versions of the libraries that can move it.

Benchmarks and the quickstart's summary record `machine()` next to every number they write.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

LIBRARIES = ("torch", "transformers", "tokenizers", "accelerate", "datasets", "safetensors", "numpy", "gguf")
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict:
    """Installed versions of the libraries the results depend on (FAISS under the distribution that provides it)."""
    versions = {name: _version(name) for name in LIBRARIES}
    faiss = next(((d, v) for d in FAISS_DISTRIBUTIONS if (v := _version(d))), (None, None))
    versions["faiss"] = f"{faiss[0]}=={faiss[1]}" if faiss[0] else None
    return versions


def machine() -> dict:
    """CPU model, core count, the vector instructions torch's CPU kernels use (``cpu_capability``: AVX2, AVX512, ...;
    float sums, and so the last digits of a result, can differ between them), GPU, Python and library versions."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), **library_versions()}
