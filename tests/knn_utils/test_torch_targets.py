"""knn_utils.torch_targets: the kNN targets built in torch are the NumPy path's, entry for entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knn_utils.index_search import select_neighbours
from knn_utils.knn_targets import sparse_targets
from knn_utils.torch_targets import torch_sparse_targets


@pytest.mark.parametrize("n, candidates, k, datastore, vocab, knn_temp, max_targets", [
    (300, 40, 32, 5000, 20, 2.0, None),  # many repeated tokens per row
    (200, 70, 64, 100_000, 3000, 16.0, 5),  # max_targets cuts rows
    (100, 20, 16, 50, 5, 0.05, None),  # peaked weights: most entries fall under the threshold
])
@pytest.mark.parametrize("lower_row_first", [False, True])  # ties in the index's order, or to the lower row
def test_same_targets_as_numpy(n, candidates, k, datastore, vocab, knn_temp, max_targets, lower_row_first):
    rng = np.random.default_rng(k)
    dists = np.sort(rng.random((n, candidates)).astype(np.float32) * 10, axis=1)
    dists[:, 5] = dists[:, 4]  # equal distances: the order must be the stable one
    ids = rng.integers(0, datastore, (n, candidates))
    ids[rng.random((n, candidates)) < 0.05] = -1  # "no neighbour" slots
    ids[0] = -1  # a row with nothing found gets an empty target
    exclude = ids[np.arange(n), rng.integers(0, candidates, n)].copy()  # the query's own row, somewhere in its list
    vals = rng.integers(0, vocab, datastore).astype(np.int32)
    expected = sparse_targets(select_neighbours(dists, ids, k, exclude, lower_row_first), vals, knn_temp,
                              max_targets=max_targets)
    found = torch_sparse_targets(dists, ids, k, torch.from_numpy(vals), knn_temp, exclude, max_targets=max_targets,
                                 lower_row_first=lower_row_first)
    assert found.counts[0] == 0 and expected.counts.sum() > n
    np.testing.assert_array_equal(found.counts, expected.counts)
    np.testing.assert_array_equal(found.token_ids, expected.token_ids)
    np.testing.assert_array_equal(found.probs, expected.probs)
    assert found.token_ids.dtype == expected.token_ids.dtype and found.probs.dtype == expected.probs.dtype
