"""Shared numerics of the detectors: stable float64 softmax / log-sum-exp and row chunking.

numpy only, so pages that only read the cache never import torch.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Iterator

import numpy as np

EXP_FLOOR = -700.0  # exp(-700) ~ 1e-304: below a sum that holds exp(0) = 1 by ~288 orders of magnitude


def exp_shifted(z: np.ndarray) -> np.ndarray:
    """In place, the exponentials of z = logits less their row max (<= 0) for a *sum* of them, fast.

    numpy's SIMD exp takes a path 8-70x slower for arguments below about -708 (subnormal or zero results),
    which wide logit ranges make the common case (SCALE and ASH-S multiply rows by up to e^30, a small
    temperature divides them).  Arguments are raised to EXP_FLOOR first.  Each row's sum holds its max's
    exp(0) = 1, so terms below 1e-300 cannot change it in float64 (K of them add < 1e-296, far below half
    an ulp of 1): log-sum-exp and every value from these sums are the same as with np.exp.  Not for values
    used one by one (a probability of 1e-310 would become 1e-304): those use np.exp.
    """
    if z.size and z.min() < EXP_FLOOR:  # raising nothing leaves z as it is: the pass is skipped when so
        np.maximum(z, EXP_FLOOR, out=z)
    return np.exp(z, out=z)


LSE_ROWS = 128  # rows per block of the log-sum-exp: 128 x 1000 float64 (1 MB) stay in L2 across its passes


def _lse_rows(x: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(max, logsumexp) per row of one 2-D chunk, float64, with one block-sized temporary: each block of rows is
    widened (and divided by `scale`) into it, then reduced in place."""

    def widen(sl: slice, blk: np.ndarray) -> None:
        np.copyto(blk, x[sl], casting="unsafe")  # as np.array(x, dtype=np.float64)
        if scale is not None:
            blk /= scale

    return _blocked_lse(x, widen)


def logsumexp(x: np.ndarray, axis: int = 1, scale: float | None = None) -> np.ndarray:
    """Stable log-sum-exp in float64 (float32 overflows at ImageNet logit scales / small T) of x (/ scale).

    2-D input along axis 1 is streamed in row chunks with in-place arithmetic: each row's value is
    the same as the whole-array formula's, without ever holding a float64 copy of the whole array
    (52k x 1000 logits: 416 MB, and fresh mappings of that size cost more than the arithmetic).
    """
    x = np.asarray(x)
    if x.ndim == 2 and axis in (1, -1):
        return max_logsumexp(x, scale)[1]
    z = np.asarray(x, dtype=np.float64)
    if scale is not None:
        z = z / scale
    m = z.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def affine_logsumexp(f32: np.ndarray, w_t: np.ndarray, b: np.ndarray) -> np.ndarray:
    """logsumexp(f W^T + b) per row of one chunk: float32 product f @ w_t (w_t = W^T, float32), float64 bias
    and log-sum-exp (= logsumexp(f32 @ w_t + b) exactly, with one float64 temporary)."""
    return bias_logsumexp(f32 @ w_t, b)


def _blocked_lse(x: np.ndarray, widen: Callable[[slice, np.ndarray], None]) -> tuple[np.ndarray, np.ndarray]:
    """(max, logsumexp) per row of a float64 array that `widen(rows, buf)` writes block by block into a block-sized
    buffer (LSE_ROWS rows), each block reduced in place while it is still in cache."""
    m, out = np.empty(len(x)), np.empty(len(x))
    buf = np.empty((min(LSE_ROWS, len(x)), x.shape[1]))
    for start in range(0, len(x), LSE_ROWS):
        blk = buf[: min(LSE_ROWS, len(x) - start)]
        widen(slice(start, start + len(blk)), blk)
        m[start : start + len(blk)], out[start : start + len(blk)] = _block_lse(blk)
    return m, out


def bias_logsumexp(product: np.ndarray, b: np.ndarray) -> np.ndarray:
    """logsumexp(product + b) per row of one chunk: the product widened to float64 with the bias (one pass a block)."""
    b = np.asarray(b, dtype=np.float64)
    return _blocked_lse(product, lambda sl, blk: np.add(product[sl], b, out=blk, dtype=np.float64))[1]


def difference_logsumexp(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """logsumexp(a - c) per row of one chunk, both widened to float64 and subtracted in one pass a block."""
    return _blocked_lse(a, lambda sl, blk: np.subtract(a[sl], c[sl], out=blk, dtype=np.float64))[1]


def row_logsumexp(x: np.ndarray) -> np.ndarray:
    """logsumexp per row of one chunk in float64, in the calling thread (for code already running in row chunks)."""
    return _lse_rows(x)[1]


def _block_lse(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, logsumexp) per row of a float64 block, z overwritten: every pass runs on data still in cache."""
    m = z.max(axis=1, keepdims=True)
    z -= m
    exp_shifted(z)
    return m[:, 0], m[:, 0] + np.log(z.sum(axis=1))


def rescaled_logsumexp(logits: np.ndarray, factor: np.ndarray, b: np.ndarray) -> np.ndarray:
    """logsumexp(factor (z - b) + b) per row of one chunk of a linear head's outputs z = f W^T + b (float64):
    the log-sum-exp of the head on the rows' features scaled by `factor`, without the product."""
    factor = np.asarray(factor, dtype=np.float64)[:, None]

    def widen(sl: slice, blk: np.ndarray) -> None:
        np.copyto(blk, logits[sl], casting="unsafe")
        blk -= b
        blk *= factor[sl]
        blk += b

    return _blocked_lse(logits, widen)[1]


def max_logsumexp(logits: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(max, logsumexp) per row of logits (/ scale) in float64, row chunks on all cores: -logsumexp is the energy
    at T = 1 and exp(max - logsumexp) the maximum softmax probability (`logsumexp`, `max_softmax`)."""
    x = np.asarray(logits)
    m, lse = np.empty(len(x)), np.empty(len(x))

    def rows(sl: slice) -> None:
        m[sl], lse[sl] = _lse_rows(x[sl], scale)

    map_row_chunks(len(x), x.shape[1], rows)
    return m, lse


def max_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """max_k softmax(logits / T)_k, computed as exp(max - logsumexp) for stability (row chunks, float64)."""
    m, lse = max_logsumexp(logits, temperature)
    return np.exp(m - lse)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# Bytes per temporary: small enough that the allocator reuses it (64 MB temporaries cost a fresh page-faulted
# mapping each, 5x slower).
CHUNK_BYTES = 4 << 20


# Rows per chunk around a matrix product with the head (52k x 1280 by 1280 x 1000 at ImageNet scale): a
# one-thread float32 GEMM per chunk runs ~10% faster at 1024 rows than at 256 (measured here), for 8 MB temporaries.
PRODUCT_ROWS = 1024


def row_chunks(n: int, row_elems: int, itemsize: int = 8, min_rows: int = 1) -> Iterator[slice]:
    """Slices of at most ~CHUNK_BYTES for temporaries of `row_elems` elements per row (at least `min_rows` rows:
    loops around big matrix products take PRODUCT_ROWS, where BLAS runs near its peak)."""
    step = max(1, min_rows, CHUNK_BYTES // max(1, row_elems * itemsize))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


_WORKERS = max(1, min(4, os.cpu_count() or 1))


def map_row_chunks(n: int, row_elems: int, fn: Callable[[slice], None], itemsize: int = 8, min_rows: int = 1) -> None:
    """`fn(sl)` for every row chunk (see `row_chunks`), on all cores: numpy's element-wise work is single-threaded,
    so chunks run side by side in threads (numpy releases the GIL), each with a one-thread BLAS (threadpoolctl,
    when installed; else one chunk after another).  `fn` writes its own rows only, so the result is the same
    as a sequential loop's, row for row."""
    chunks = list(row_chunks(n, row_elems, itemsize, min_rows))
    workers = min(len(chunks), _WORKERS)
    limits = None
    if workers > 1:
        try:
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(1, user_api="blas")
        except ImportError:  # the light core runs without it
            workers = 1
    if workers <= 1:
        for sl in chunks:
            fn(sl)
        return
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fn, chunks))
    finally:
        limits.restore_original_limits()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (exact where exp would underflow)."""
    z = np.asarray(logits, dtype=np.float64)
    return z - logsumexp(z)[:, None]


def softmax_parts(z: np.ndarray, full: bool = True) -> dict:
    """One exp pass over float64 logits z (n, k): everything the softmax methods need, exactly.

    top: argmax; lse: logsumexp(z); p: softmax(z); lp: log softmax(z) (these two (n, k) arrays only
    with `full`); log_rest: log(1 - p_top) = log sum_{j != top} p_j, computed from the sum of the
    *other* exponentials, so it stays exact (and finite) when p_top rounds to 1.0.
    """
    rows = np.arange(len(z))
    top = z.argmax(axis=1)
    m = z[rows, top]
    e = np.exp(z - m[:, None])
    e[rows, top] = 0.0
    rest = e.sum(axis=1)
    e[rows, top] = 1.0
    lse = m + np.log1p(rest)
    with np.errstate(divide="ignore"):
        log_rest = np.log(rest) - np.log1p(rest)
    lost = np.flatnonzero((rest < 1e-300) & (z.shape[1] > 1))
    if len(lost):  # every other exp underflowed (a logit gap above ~690): the same sum in log space
        others = z[lost].copy()
        others[np.arange(len(lost)), top[lost]] = -np.inf
        log_rest[lost] = logsumexp(others) - m[lost]
    parts = {"top": top, "lse": lse, "log_rest": log_rest}
    if full:
        parts["p"] = np.divide(e, (1.0 + rest)[:, None], out=e)
        parts["lp"] = z - lse[:, None]
    return parts


def ladder(low: float, high: float, extra: Iterable[float] = ()) -> list[float]:
    """1-2-5 values per decade within [low, high], plus `extra` (e.g. the default), sorted."""
    values = set(float(v) for v in extra)
    for decade in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for m in (1.0, 2.0, 5.0):
            v = float(f"{m * 10.0**decade:.6g}")
            if low * (1 - 1e-9) <= v <= high * (1 + 1e-9):
                values.add(v)
    values.update({float(low), float(high)})
    return sorted(values)


def slider_values(param) -> list[float]:
    """The values the app's slider offers for a log-scale parameter (a 1-2-5 ladder plus the default): what a
    detector precomputes per split so that a slider move is a column read."""
    return ladder(param.low, param.high, [param.default])


def slider_step(param) -> float | None:
    """The step of the app's plain slider for a linear parameter: 1/100 of its range, a whole number for
    integral parameters (counts, percentiles, dimensions); None for an empty range."""
    if not param.high > param.low:
        return None
    step = (param.high - param.low) / 100
    if all(float(v).is_integer() for v in (param.low, param.high, param.default)):
        step = float(max(1, round(step)))
    return step


def linear_slider_values(param) -> list[float]:
    """Every value the app's plain slider offers for a linear parameter (low, low + step, ..., high) and the
    default: what a detector precomputes per split so that a slider move is a column read."""
    step = slider_step(param)
    if step is None:
        return [float(param.default)]
    n = int(math.floor((param.high - param.low) / step + 1e-9))
    values = {float(param.low + i * step) for i in range(n + 1)} | {float(param.high), float(param.default)}
    return sorted(values)


def _sortable(x32: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (negative floats: all bits flipped; others: the sign bit)."""
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32)
    return np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000))


def _from_sortable(key: int) -> np.float32:
    key = np.uint32(key)
    u = key & np.uint32(0x7FFFFFFF) if key >> np.uint32(31) == 1 else ~key
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


def _order_statistics(x: np.ndarray, ranks: list[int]) -> list[np.float32]:
    """The values at 0-based `ranks` of the sorted float32 elements of `x`, by a two-pass radix select over row
    chunks (16-bit histograms of order-preserving keys): exact, and memory bounded by the chunk size."""
    rows = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    hi = np.zeros(1 << 16, dtype=np.int64)
    for sl in row_chunks(len(rows), rows.shape[1], 4):
        hi += np.bincount((_sortable(np.asarray(rows[sl], dtype=np.float32)) >> 16).ravel(), minlength=1 << 16)
    cum = np.cumsum(hi)
    out = []
    for r in ranks:
        b = int(np.searchsorted(cum, r, side="right"))
        before = int(cum[b - 1]) if b else 0
        lo = np.zeros(1 << 16, dtype=np.int64)
        for sl in row_chunks(len(rows), rows.shape[1], 4):
            keys = _sortable(np.asarray(rows[sl], dtype=np.float32)).ravel()
            lo += np.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=1 << 16)
        low = int(np.searchsorted(np.cumsum(lo), r - before, side="right"))
        out.append(_from_sortable((b << 16) | low))
    return out


def chunked_percentile(x: np.ndarray, q: float) -> np.float32:
    """np.percentile(x, q) ('linear') of a float32 array (other dtypes: np.percentile itself), without a copy of it: the two order statistics come
    from `_order_statistics` (chunked) and are interpolated as numpy's `_lerp` does, cast back to float32.
    (A fit split of ImageNet-train size has billions of activations; np.percentile would copy them all.)"""
    if np.asarray(x[:0]).dtype != np.float32:  # the radix select is for float32 (the cache's dtype)
        return np.percentile(x, q)
    n = int(np.prod(x.shape))
    if n == 0:
        raise ValueError("percentile of an empty array")
    virtual = (n - 1) * (float(q) / 100.0)
    below = int(np.floor(virtual))
    above = min(below + 1, n - 1)
    if above == below:
        return np.float32(_order_statistics(x, [below])[0])
    a, b = _order_statistics(x, [below, above])
    gamma = virtual - below  # numpy's _lerp with a Python-float weight: float32 arithmetic throughout
    a32, b32 = np.float32(a), np.float32(b)
    diff = b32 - a32
    if gamma >= 0.5:
        return np.float32(b32 - diff * np.float32(1 - gamma))
    return np.float32(a32 + diff * np.float32(gamma))
