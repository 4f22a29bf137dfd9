"""Resampling and search helpers of the metrics (numpy only, no dependency on the metrics module).

The bootstrap's draws depend only on the class sizes, the replicate and the seed, so they are
made once and shared by every score vector (`bootstrap_counts`); `first_true` is the vectorised
binary search behind both FPR@95 operating points.
"""

from __future__ import annotations

import functools

import numpy as np

TPR_LEVEL = 0.95  # the operating point of both FPR@95 metrics (the core's and the bootstrap's replicate path)


def first_true(pred, b: int, n: int) -> np.ndarray:
    """Per row r < b: the first column j < n where pred(r, j) holds, for a predicate that, along a row,
    is False then True (monotone); 0 where it never holds (np.argmax's answer on an all-False row).

    A vectorised binary search: log2(n) evaluations of the predicate on b elements, instead of
    evaluating it on every column (the same answer as np.argmax over the full boolean matrix).
    """
    rows = np.arange(b)
    lo = np.zeros(b, dtype=np.int64)
    hi = np.full(b, n, dtype=np.int64)  # answer in [lo, hi]; hi = n means "never"
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        r, m = rows[active], mid[active]
        ok = pred(r, m)
        hi[r[ok]] = m[ok]
        lo[r[~ok]] = m[~ok] + 1
    return np.where(lo >= n, 0, lo)


def bootstrap_indices(n_id: int, n_ood: int, replicate: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Resampling indices (with replacement, per class) of one bootstrap replicate.

    Each replicate has its own stream, ``SeedSequence(seed, spawn_key=(replicate,))``,
    so a replicate's draw does not depend on chunking or on ``n_boot``.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(int(replicate),)))
    return rng.integers(0, n_id, size=n_id), rng.integers(0, n_ood, size=n_ood)


def bootstrap_weights(
    n_id: int, n_ood: int, n_boot: int, seed: int = 0, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Count (multinomial) weights of replicates ``start..stop`` in original sample order.

    Returns ``(W_id, W_ood)`` of shapes (k, n_id), (k, n_ood): how many times each
    sample was drawn by :func:`bootstrap_indices`.  Weights instead of resampled
    copies let all replicates share one sort.
    """
    stop = n_boot if stop is None else min(stop, n_boot)
    k = max(stop - start, 0)
    w_id = np.empty((k, n_id))
    w_ood = np.empty((k, n_ood))
    for r, b in enumerate(range(start, stop)):
        i_id, i_ood = bootstrap_indices(n_id, n_ood, b, seed)
        w_id[r] = np.bincount(i_id, minlength=n_id)
        w_ood[r] = np.bincount(i_ood, minlength=n_ood)
    return w_id, w_ood


@functools.lru_cache(maxsize=4)
def _bootstrap_counts(n_id: int, n_ood: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Count weights of every replicate in original sample order, (n_boot, n_id) and (n_boot, n_ood), uint16.

    The draws depend only on the class sizes, the replicate and the seed, never on the scores,
    so every method of a run shares them: drawn once per (n_id, n_ood, n_boot, seed).  (Read-only.)
    """
    w_id = np.empty((n_boot, n_id), dtype=np.uint16)
    w_ood = np.empty((n_boot, n_ood), dtype=np.uint16)
    for b in range(n_boot):
        i_id, i_ood = bootstrap_indices(n_id, n_ood, b, seed)
        w_id[b] = np.bincount(i_id, minlength=n_id)  # a count exceeds 65535 only for n >~ 10^6 draws of one row
        w_ood[b] = np.bincount(i_ood, minlength=n_ood)
    w_id.setflags(write=False)
    w_ood.setflags(write=False)
    return w_id, w_ood


def bootstrap_counts(n_id: int, n_ood: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if max(n_id, n_ood) >= 65_535:  # a uint16 count could overflow: no shared cache, float64 per call
        return bootstrap_weights(n_id, n_ood, n_boot, seed)
    return _bootstrap_counts(int(n_id), int(n_ood), int(n_boot), int(seed))
