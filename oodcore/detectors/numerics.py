"""Shared numerics of the detectors: stable float64 softmax / log-sum-exp and row chunking.

numpy only, so pages that only read the cache never import torch.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np


def logsumexp(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Stable log-sum-exp in float64 (float32 overflows at ImageNet logit scales / small T)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def max_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """max_k softmax(logits / T)_k, computed as exp(max - logsumexp) for stability."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(z.max(axis=1) - logsumexp(z))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


CHUNK_BYTES = 64 << 20  # per temporary; every method streams rows in chunks of about this size


def row_chunks(n: int, row_elems: int, itemsize: int = 8) -> Iterator[slice]:
    """Slices of at most ~CHUNK_BYTES for temporaries of `row_elems` elements per row."""
    step = max(1, CHUNK_BYTES // max(1, row_elems * itemsize))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (exact where exp would underflow)."""
    z = np.asarray(logits, dtype=np.float64)
    return z - logsumexp(z)[:, None]


def softmax_parts(z: np.ndarray) -> dict:
    """One exp pass over float64 logits z (n, k): everything the softmax methods need, exactly.

    top: argmax; lse: logsumexp(z); p: softmax(z); lp: log softmax(z);
    log_rest: log(1 - p_top) = log sum_{j != top} p_j, computed from the sum of the
    *other* exponentials, so it stays exact (and finite) when p_top rounds to 1.0.
    """
    rows = np.arange(len(z))
    top = z.argmax(axis=1)
    m = z[rows, top]
    e = np.exp(z - m[:, None])
    e[rows, top] = 0.0
    rest = e.sum(axis=1)
    e[rows, top] = 1.0
    total = 1.0 + rest
    lse = m + np.log1p(rest)
    with np.errstate(divide="ignore"):
        log_rest = np.log(rest) - np.log1p(rest)
    lost = np.flatnonzero((rest < 1e-300) & (z.shape[1] > 1))
    if len(lost):  # every other exp underflowed (a logit gap above ~690): the same sum in log space
        others = z[lost].copy()
        others[np.arange(len(lost)), top[lost]] = -np.inf
        log_rest[lost] = logsumexp(others) - m[lost]
    return {"top": top, "lse": lse, "p": e / total[:, None], "lp": z - lse[:, None], "log_rest": log_rest}


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
