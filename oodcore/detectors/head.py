"""The run's final layer as the head-product detectors use it (ReAct, DICE, ASH, SCALE): shared state, whether a
split's cached logits are the head's output on its features, and the energy of the head on (clipped) features,
by a dense float32 product or, where few activations change, a sparse one.  numpy, plus scipy.sparse when installed.
"""

from __future__ import annotations

import weakref

import numpy as np

from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import (
    PRODUCT_ROWS,
    affine_logsumexp,
    bias_logsumexp,
    difference_logsumexp,
    map_row_chunks,
)
from oodcore.store.rundata import SplitArrays

HEAD_RTOL = 1e-3  # |cached logit - f W^T - b| allowed, relative to the row's largest |logit| (at least 1)
HEAD_CHECK_ROWS = 256
# a product over at most this share of the activations goes through scipy's CSR: row chunks side by side on
# two cores, it beat the dense float32 BLAS product up to ~15% kept at 52k x 1280 x 1000 (`bench`'s shapes)
SPARSE_SHARE = 1 / 8


def head_state(ctx: FitContext) -> dict:
    """The run's final layer as the head-product methods use it, shared by them: W^T (a float32 view of the run's
    own head: nothing to store beside the run), b (float64), and a memory-only memo ("~head") of what is checked
    or made once per process (are a split's logits this head's output; W^T in C order)."""

    def build():
        w, b = ctx.head()
        return {
            "w_t": np.asarray(w, dtype=np.float32).T,
            "b": np.asarray(b, np.float64),
            "check": ctx.row_memo("~head"),
        }

    return ctx.shared("head", build)


def contiguous_w_t(head: dict) -> np.ndarray:
    """W^T in C order, made once per process: scipy's sparse product needs it and BLAS runs faster on it."""
    return head["check"].get("w_t", head["w_t"], lambda: np.ascontiguousarray(head["w_t"]))


def sparse_module():
    """scipy.sparse when installed (with scikit-learn in the engine), else None: the light core's dense product."""
    try:
        import scipy.sparse
    except ImportError:
        return None
    return scipy.sparse


def masked_csr(mask: np.ndarray, values) -> object:
    """scipy CSR (float32) of the True entries of a C-ordered (rows, D) boolean mask, row by row; `values(flat,
    counts)` gives them from their row-major flat indices and each row's count of entries."""
    flat = np.flatnonzero(mask)
    counts = np.add.reduce(mask.view(np.uint8), axis=1, dtype=np.int64)
    indptr = np.zeros(len(mask) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    data = np.asarray(values(flat, counts), dtype=np.float32)
    return sparse_module().csr_matrix((data, flat % mask.shape[1], indptr), shape=mask.shape)


def head_logits(head: dict, rows: SplitArrays) -> np.ndarray | None:
    """The split's cached logits when they are the head's output on its cached features, else None.

    True of a cache's own splits (the logits and the pooled features come from the same forward pass;
    float32 rounding is far inside the tolerance); not of protocol-masked or reduced-precision logits, nor
    of a network whose logits are not a linear function of the cached features.  Checked once per split on
    up to 256 rows spread over it.
    """
    logits, feats = rows.logits, rows.features
    if logits is None or feats is None or logits.shape[1] != head["w_t"].shape[1]:
        return None

    def check() -> tuple:
        n = len(feats)
        idx = np.unique(np.linspace(0, n - 1, min(n, HEAD_CHECK_ROWS)).astype(np.int64))
        z = np.asarray(np.asarray(feats[idx], dtype=np.float32) @ head["w_t"], dtype=np.float64) + head["b"]
        cached = np.asarray(logits[idx], dtype=np.float64)
        scale = np.maximum(1.0, np.abs(cached).max(axis=1, keepdims=True))
        ok = bool(np.all(np.abs(z - cached) <= HEAD_RTOL * scale))
        try:
            return weakref.ref(feats), ok
        except TypeError:  # not weak-referenceable: checked again on every call (256 rows)
            return (lambda: None), ok

    # memoised per logits array, for the features array it was checked against
    of, ok = head["check"].get("matches", logits, check)
    if of() is not feats:
        of, ok = check()
    return logits if ok else None


SPARSE_ROWS = 256  # rows per chunk of the sparse-weight product: f^T and the (K, rows) product stay in cache


def head_energy(
    features: np.ndarray, weight: np.ndarray, bias: np.ndarray, clip: float | None = None, logits=None, head=None
) -> np.ndarray:
    """-logsumexp(min(f, clip) W^T + b) per row, float32 products, float64 log-sum-exp.

    With `logits` (the rows' cached logits, when they are this head's output: `head_logits`) and `head`, a
    chunk in which at most SPARSE_SHARE of the activations exceed the clip (a high percentile) is scored as
    logits - (f - clip)^+ W^T: a sparse correction over those activations only (scipy, when installed).
    Without a clip, a weight with at most SPARSE_SHARE nonzero entries (DICE's masked head) is multiplied
    over those entries only, as W f^T (scipy's CSR product, when installed).
    """
    w_t = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)
    b = np.asarray(bias, dtype=np.float64)
    out = np.empty(len(features))
    sparse = clip is not None and logits is not None and head is not None and sparse_module() is not None
    sparse_w = None
    if clip is None and sparse_module() is not None and np.count_nonzero(w_t) <= SPARSE_SHARE * w_t.size:
        sparse_w = sparse_module().csr_matrix(w_t.T)  # (K, D): the nonzero weights, row by row

    def rows(sl: slice) -> None:
        f = np.asarray(features[sl], dtype=np.float32)
        if sparse_w is not None:  # (W f^T)^T: f^T C-ordered (D, rows), so each weight scales one contiguous row
            prod = sparse_w @ np.ascontiguousarray(f.T)
            out[sl] = -bias_logsumexp(np.ascontiguousarray(prod.T), b)
            return
        if clip is not None:
            c = np.float32(clip)
            if sparse:
                above = f > c
                if np.count_nonzero(above) <= SPARSE_SHARE * f.size:  # few: list them (a dense chunk never is)
                    excess = masked_csr(above, lambda flat, counts: f.ravel()[flat] - c)
                    # widened and corrected into a buffer: the cached logits stay as they are
                    out[sl] = -difference_logsumexp(logits[sl], excess @ contiguous_w_t(head))
                    return
            f = np.minimum(f, c)
        out[sl] = -affine_logsumexp(f, w_t, b)

    chunk_rows = SPARSE_ROWS if sparse_w is not None else PRODUCT_ROWS
    map_row_chunks(len(features), features.shape[1] + 2 * w_t.shape[1], rows, min_rows=chunk_rows)
    return out
