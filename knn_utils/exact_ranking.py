"""The exact ranking: of each query's candidate rows, the ``k`` nearest by exact float32 distance to the stored keys,
equal distances to the lower row.

The distance of a query ``q`` (float32) to a stored key (float16) is, in float32,

    d = torch.sum((float32(key) - q) ** 2, dim=-1)

The conversion, difference and square are exact IEEE operations on each element, so they give the same bits
in any order, on any device; the sum is torch's row sum, whose order depends only on the key width and the
device. A distance is therefore a function of its key and its query alone: the neighbours, and the kNN targets,
are the same for any batch size and number of processes. Ties then go to the lower row.

On the CPU (`rank_candidates`) the cost is memory traffic, not arithmetic: each query reads ``c`` candidate keys
(1152 rows of 1.1 KB at k 1024, d 576). A block of queries is ranked at a time:

1. each query's candidate rows are sorted, so its keys are read in ascending row order;
2. a numba kernel (`_squared_differences`) reads each candidate key once and writes its squared differences to
   the query, converting float16 to float32 on the fly (F16C's vcvtph2ps where the CPU has it), into a float32
   block that stays in the caches; threads share the block's queries;
3. ``torch.sum`` adds up each row of the block (torch's own reduction, so the bits are those of the formula);
4. the ``k`` smallest (distance, row) pairs of each query are kept, with one sort of 64-bit keys (the distance's
   bits above the candidate's position in row order).

The torch version of the same arithmetic (`exact_nearest`) ranks on any device: the GPU when the search runs
there, and the CPU reference that the tests compare the kernel with.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

BLOCK_BYTES = 1 << 23  # float32 squared differences per block of queries (CPU): about the L3 share of two cores
PREFETCH_AHEAD = 8  # the CPU kernel asks for the key of the candidate this many places ahead while it works on one
CACHE_LINE = 64
TORCH_BLOCK_BYTES = 2 << 30  # `exact_nearest`: gathered keys per block of queries
GPU_BLOCK_QUERIES = 64  # `exact_nearest` on a GPU: queries per block (at most), the same for every block


# ---------------------------------------------------------------------------------------------------
# The CPU kernel


@intrinsic
def _half_bits_to_float(typingctx, bits):
    """The float16 whose bits are ``bits`` (uint16), as float32: LLVM's fpext, exact (F16C's vcvtph2ps where the CPU
    has it; numba has no float16 type of its own)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _prefetch_row(typingctx, array, row):
    """Ask the CPU to bring row ``row`` of the C-contiguous 2-d ``array`` into its caches (``llvm.prefetch``, one per
    cache line): a candidate's key is a random read, and asking early overlaps the wait with the work on the
    candidates before it. No effect on any result."""
    if not isinstance(array, types.Array) or array.ndim != 2 or not isinstance(row, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        int64, byte_pointer = ir.IntType(64), ir.PointerType(ir.IntType(8))
        view = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        row_bytes = builder.extract_value(view.strides, 0)
        start = builder.add(builder.ptrtoint(view.data, int64), builder.mul(builder.sext(args[1], int64), row_bytes))
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer] + [ir.IntType(32)] * 3), "llvm.prefetch.p0i8")
        lines = builder.udiv(builder.add(row_bytes, ir.Constant(int64, CACHE_LINE - 1)), ir.Constant(int64, CACHE_LINE))
        with cgutils.for_range(builder, lines) as loop:  # read (0), keep in all cache levels (3), data (1)
            address = builder.add(start, builder.mul(loop.index, ir.Constant(int64, CACHE_LINE)))
            builder.call(prefetch, [builder.inttoptr(address, byte_pointer)] + [ir.Constant(ir.IntType(32), v) for v in (0, 3, 1)])
        return context.get_dummy_value()

    return types.none(array, row), codegen


def _as_float32(value):
    """A stored key element as float32 (float16 bits, or float32 already)."""


@overload(_as_float32)
def _as_float32_impl(value):
    if value == types.uint16:
        return lambda value: _half_bits_to_float(value)
    if value == types.float32:
        return lambda value: value
    return None


@njit(nogil=True, cache=True, error_model="numpy")
def _squared_differences(keys, queries, rows, first, out):
    """``out[(i - first) * c + j] = (float32(keys[rows[i, j]]) - queries[i]) ** 2`` for the queries ``i`` of the block
    that starts at ``first`` (``out`` holds ``m * c`` rows of width d); zeros where ``rows[i, j] < 0``."""
    c = rows.shape[1]
    d = keys.shape[1]
    for block_row in range(out.shape[0]):
        ahead = block_row + PREFETCH_AHEAD
        if ahead < out.shape[0] and rows[first + ahead // c, ahead % c] >= 0:
            _prefetch_row(keys, rows[first + ahead // c, ahead % c])
        i = first + block_row // c
        row = rows[i, block_row % c]
        target = out[block_row]
        if row < 0:
            for t in range(d):
                target[t] = 0
            continue
        key = keys[row]
        query = queries[i]
        for t in range(d):
            diff = _as_float32(key[t]) - query[t]
            target[t] = diff * diff


def _sort_keys(dists: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as (distance, position): the float32 bits of the distance (non-negative, or +inf/NaN,
    so they order as unsigned integers) above the position in the row."""
    positions = np.arange(dists.shape[1], dtype=np.uint64)
    return (dists.view(np.uint32).astype(np.uint64) << np.uint64(32)) | positions


@lru_cache(maxsize=None)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` threads (keyed by ``pid``: a forked child gets its own)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="exact-ranking")


def _parts(n: int, threads: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into at most ``threads`` contiguous parts."""
    bounds = np.linspace(0, n, min(threads, max(n, 1)) + 1).round().astype(int)
    return [(int(b), int(e)) for b, e in zip(bounds[:-1], bounds[1:]) if e > b]


def _in_threads(threads: int, function, n: int) -> None:
    """``function(begin, end)`` over ``[0, n)`` in ``threads`` parts at once (numba and numpy release the GIL)."""
    parts = _parts(n, threads)
    if len(parts) <= 1:
        for begin, end in parts:
            function(begin, end)
        return
    for future in [_pool(threads, os.getpid()).submit(function, begin, end) for begin, end in parts]:
        future.result()


def rank_candidates(keys: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int, threads: int = 1,
                    block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` of the candidate ``rows`` (n, c; -1 for none) nearest each query (n, d) by exact distance, on the CPU:
    float32 distances and rows, (n, k) each, nearest first, equal distances to the lower row; row -1 with distance
    inf where there are fewer than ``k`` candidates.

    ``keys`` (N, d) are the stored keys, float16 (a memory-mapped datastore) or float32. ``threads`` share the work;
    a block of squared differences stays under ``block_bytes``. The result does not depend on either.
    """
    n, c = rows.shape
    d = keys.shape[1]
    kernel_keys = keys.view(np.uint16) if keys.dtype == np.float16 else np.ascontiguousarray(keys, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.sort(rows, axis=1)  # (n, c): keys read in ascending row order; equal distances keep the lower row
    dists = np.empty((n, c), dtype=np.float32)
    block = max(1, min(n, block_bytes // max(1, 4 * c * d)))  # queries per block
    squares = np.empty((block * c, d), dtype=np.float32)
    for first in range(0, n, block):
        m = min(block, n - first)
        target = squares[: m * c]

        def fill(begin: int, end: int) -> None:  # the block's queries [begin, end)
            _squared_differences(kernel_keys, queries, rows, first + begin, target[begin * c : end * c])

        _in_threads(threads, fill, m)
        torch.sum(torch.from_numpy(target), dim=1, out=torch.from_numpy(dists[first : first + m].reshape(-1)))
    dists[rows < 0] = np.inf
    order = np.empty((n, min(k, c)), dtype=np.int64)

    def select(begin: int, end: int) -> None:
        order[begin:end] = (np.sort(_sort_keys(dists[begin:end]), axis=1)[:, :k] & np.uint64(0xFFFFFFFF)).astype(np.int64)

    _in_threads(threads, select, n)
    found_dists, found_rows = np.take_along_axis(dists, order, axis=1), np.take_along_axis(rows, order, axis=1)
    if c < k:  # fewer candidates than k: pad with "no neighbour"
        pad = ((0, 0), (0, k - c))
        found_dists = np.pad(found_dists, pad, constant_values=np.inf)
        found_rows = np.pad(found_rows, pad, constant_values=-1)
    return found_dists, found_rows


# ---------------------------------------------------------------------------------------------------
# Keys that do not fit in memory


class ReadAhead:
    """Asks the kernel to read a batch's candidate keys from disk before they are ranked: the pages they lie on,
    each once, in ascending order, many at a time (``posix_fadvise(WILLNEED)`` from ``threads`` threads, which
    returns once the reads are queued). Ranking then finds them in the page cache instead of stopping at every
    page fault for one random read. Worth it only when the keys do not fit in the page cache: a page already
    there still costs a system call.
    """

    def __init__(self, keys: np.memmap, threads: int = 16):
        self.fd = os.open(keys.filename, os.O_RDONLY)
        self.close = weakref.finalize(self, os.close, self.fd)  # closed with the object, or by calling close()
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # a page fault brings its page, not 128 KB around it
        self.offset, self.row_bytes, self.threads = int(keys.offset), keys.shape[1] * keys.itemsize, threads
        self.page = os.sysconf("SC_PAGE_SIZE")

    def page_runs(self, rows: np.ndarray) -> np.ndarray:
        """(first page, number of pages) of each run of consecutive pages that the rows lie on, ascending, (r, 2)."""
        rows = np.unique(rows[rows >= 0])
        starts = (self.offset + rows * self.row_bytes) // self.page
        ends = (self.offset + (rows + 1) * self.row_bytes - 1) // self.page  # inclusive
        span = starts[:, None] + np.arange(-(-self.row_bytes // self.page) + 1)  # (rows, pages a row can touch)
        pages = np.unique(span[span <= ends[:, None]])
        if len(pages) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        breaks = np.flatnonzero(np.diff(pages) > 1) + 1
        first = pages[np.concatenate([[0], breaks])]
        last = pages[np.concatenate([breaks - 1, [len(pages) - 1]])]
        return np.stack([first, last - first + 1], axis=1)

    def __call__(self, rows: np.ndarray) -> None:
        """Queue the reads of the pages of ``rows`` (any shape; -1 for none)."""
        runs = self.page_runs(rows)

        def advise(begin: int, end: int) -> None:
            for first, count in runs[begin:end].tolist():
                os.posix_fadvise(self.fd, first * self.page, count * self.page, os.POSIX_FADV_WILLNEED)

        _in_threads(self.threads, advise, len(runs))


# ---------------------------------------------------------------------------------------------------
# The same arithmetic in torch, on any device


def exact_nearest(keys: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, k: int,
                  max_bytes: int = TORCH_BLOCK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """`rank_candidates` in torch, on the device of ``queries`` (b, d) and ``keys`` (N, d): the ``k`` of the candidate
    ``rows`` (b, c) nearest each query, distances and rows, (b, k) each, equal distances to the lower row.

    On the CPU, the same distances as `rank_candidates`. On a GPU, every block has the same number of queries
    (`GPU_BLOCK_QUERIES`, the last block padded), so that the GPU lays out its reduction the same way for every
    block and a query's distances do not depend on the others. A block of gathered keys stays under ``max_bytes``.
    """
    rows = rows.sort(dim=1).values  # equal distances keep the lower row first
    b, c = rows.shape
    step = max(1, max_bytes // (6 * max(c, 1) * keys.shape[1]))  # queries per (step, c, d) block
    pad = 0
    if queries.device.type != "cpu":
        step = min(step, GPU_BLOCK_QUERIES)
        pad = (-b) % step
    padded_rows = torch.cat([rows, rows[:1].expand(pad, c)]) if pad else rows
    padded_queries = torch.cat([queries, queries[:1].expand(pad, -1)]) if pad else queries
    dists = torch.empty(padded_rows.shape, dtype=torch.float32, device=queries.device)  # (b + pad, c)
    for begin in range(0, len(padded_rows), step):
        block = padded_rows[begin : begin + step]
        stored = keys.index_select(0, block.clamp(min=0).reshape(-1)).view(*block.shape, -1).float()  # (step, c, d)
        dists[begin : begin + step] = stored.sub_(padded_queries[begin : begin + step, None, :]).square_().sum(dim=2)
    dists = dists[:b].masked_fill_(rows < 0, float("inf"))
    dists, order = dists.sort(dim=1, stable=True)
    return dists[:, :k], rows.gather(1, order[:, :k])
