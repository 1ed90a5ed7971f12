"""Retrieval: the FAISS index (steps 3), the kNN target search (step 4) and the kNN-LM baseline.

Importing the package sets OpenMP's wait policy (`utils.openmp`) before any of its modules imports torch
or FAISS, so every entry point here (``python -m knn_utils.saveKNNMulti`` ...) gets it.
"""

import utils.openmp  # noqa: F401  (sets OMP_WAIT_POLICY before torch and FAISS load)
