"""OpenMP's wait policy for processes that search with FAISS: import this module before torch and FAISS.

torch and FAISS each load an OpenMP runtime. By default their idle threads spin-wait, and on a machine with
few cores the two runtimes spin for the same cores: FAISS's search ran several times slower on 2 cores.
``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep instead. A runtime reads the variable once, when it
loads, so it must be set before ``import torch`` / ``import faiss``: importing this module does that (unless
the variable is set already, which wins).

``knn_utils/__init__.py`` imports it, so every ``python -m knn_utils.<entry point>`` sets the policy before
its own imports run. A script outside ``knn_utils`` that searches imports it as its first import, followed
by ``# isort: split`` so that sorting the imports keeps it first (benchmarks/bench_knn.py).
`knn_utils.faiss_devices.configure_threads` shares the cores between processes.
"""

import os

WAIT_POLICY = "PASSIVE"

os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
