"""Logit-only post-hoc detectors (entropy, GEN, KL matching, temperature scaling),
plus the fitted-state memo shared by every method that learns something from the fit split.

Conventions (as everywhere in the registry): `fn(data, split, **params)` returns one
float64 score per row of `split`, higher = more OOD.  Anything *fitted* (templates,
a temperature, class means, a PCA basis...) is computed from `data.fit` (and the
cached head) only — never from the ID-eval or OOD rows — once per fit-array object,
and reused when only a slider parameter changes (see :data:`MEMO`).

Everything here is numpy-only, so pages that only read the cache need not import torch.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, OrderedDict
from typing import Callable, Iterator

import numpy as np

from .data import BenchmarkData, SplitArrays

# The memo and the numerics helpers come first and import `.methods` lazily: importing this
# module directly imports `.methods`, whose last line imports the other method modules,
# which take these helpers from this (then partially initialised) module.

# ----------------------------------------------------------------------------- memo


class FitMemo:
    """Fitted states keyed on the *identity* of the arrays they were fitted from.

    A key is (name, ids of the source arrays, extra hashables such as a slider value).
    Each entry holds weak references to its source arrays: a lookup only hits when
    every reference still points at the very same object (so a recycled `id()` can
    never serve a stale state), and an entry is dropped as soon as one of its source
    arrays is garbage-collected.  At most `max_entries` states are kept (LRU).

    Arrays are assumed not to be mutated in place after loading (the cache never
    does); `clear()` forgets everything.  `calls[name]` counts how often a state
    named `name` was actually (re)built — the tests use it to prove reuse.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self.calls: Counter[str] = Counter()
        self._store: OrderedDict = OrderedDict()
        self._lock = threading.RLock()  # re-entrant: a builder may ask for another fitted state

    def get(self, name: str, sources: tuple, build: Callable[[], object], extra: tuple = ()) -> object:
        key = (name, tuple(id(a) for a in sources), extra)
        with self._lock:
            hit = self._store.get(key)
            if hit is not None and all((r is None and a is None) or (r is not None and r() is a)
                                       for r, a in zip(hit[0], sources)):
                self._store.move_to_end(key)
                return hit[1]
            state = build()
            self.calls[name] += 1

            def drop(_ref, key=key, store=self._store):
                store.pop(key, None)

            refs = tuple(None if a is None else weakref.ref(a, drop) for a in sources)
            self._store[key] = (refs, state)
            self._store.move_to_end(key)
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)
            return state

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self.calls.clear()

    def __len__(self) -> int:
        return len(self._store)


MEMO = FitMemo()


def fitted(name: str, sources: tuple, build: Callable[[], object], extra: tuple = ()) -> object:
    """Shorthand for ``MEMO.get``."""
    return MEMO.get(name, sources, build, extra)


def require_fit(data: BenchmarkData, *, features: bool = False, labels: bool = False) -> SplitArrays:
    """The fit split, or a clear MethodUnavailable when it (or what is asked of it) is missing."""
    from .methods import MethodUnavailable

    fit = data.fit
    if fit is None or len(fit) == 0:
        raise MethodUnavailable("this method is fitted on the ID fit split, which this cache lacks")
    if features and fit.features is None:
        raise MethodUnavailable("this method needs the fit split's features, which were not loaded")
    if labels and not np.any(np.asarray(fit.labels) >= 0):
        raise MethodUnavailable("this method needs labelled ID rows in the fit split")
    return fit


# ----------------------------------------------------------------------------- numerics

CHUNK_BYTES = 64 << 20  # per temporary; every method streams rows in chunks of about this size


def row_chunks(n: int, row_elems: int, itemsize: int = 8) -> Iterator[slice]:
    """Slices of at most ~CHUNK_BYTES for temporaries of `row_elems` elements per row."""
    step = max(1, CHUNK_BYTES // max(1, row_elems * itemsize))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (exact where exp would underflow)."""
    from .methods import logsumexp

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
        from .methods import logsumexp

        others = z[lost].copy()
        others[np.arange(len(lost)), top[lost]] = -np.inf
        log_rest[lost] = logsumexp(others) - m[lost]
    return {"top": top, "lse": lse, "p": e / total[:, None], "lp": z - lse[:, None], "log_rest": log_rest}


from .methods import MethodUnavailable, Param, logsumexp, register  # noqa: E402

# ----------------------------------------------------------------------------- entropy


@register("entropy", "Entropy", paper="Shannon entropy of the softmax (e.g. Hendrycks & Gimpel 2017; Chan et al. ICCV 2021)")
def entropy(data, split):
    """H(p) = -sum_k p_k log p_k of p = softmax(logits): a flat posterior (high entropy) is OOD.

    Computed from the float64 log-softmax, so p log p is exact (0 where p underflows).
    """
    logits = np.asarray(split.logits)
    out = np.empty(len(logits))
    for sl in row_chunks(len(logits), 4 * logits.shape[1]):
        parts = softmax_parts(np.asarray(logits[sl], dtype=np.float64))
        out[sl] = -(parts["p"] * parts["lp"]).sum(axis=1)
    return out


# ----------------------------------------------------------------------------- GEN


@register(
    "gen",
    "GEN",
    params=(
        Param("gamma", "γ", 0.1, 0.01, 10.0, "log", help="exponent of p^γ (1-p)^γ; the paper uses 0.1"),
        Param("M", "top-M classes", 100.0, 1.0, 1000.0, "log",
              help="sum over the M largest probabilities (clipped to the number of classes); the paper uses 100"),
    ),
    paper="Liu et al. 2023 (CVPR), GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
)
def gen(data, split, gamma, M):
    """Generalized entropy G_γ(p) = sum over the top-M p_j of p_j^γ (1 - p_j)^γ: high = OOD.

    A small γ makes the score sensitive to the whole shape of the truncated posterior,
    not only its maximum.  Exact in float64 via logs: p^γ = exp(γ log p), 1 - p =
    -expm1(log p), and for the largest p, 1 - p = the sum of the others (computed as a
    log-sum-exp), so neither the near-zero tail nor a saturated p ≈ 1 loses precision
    (no clamping of p, unlike some reimplementations).
    """
    if gamma <= 0:
        raise ValueError("GEN needs γ > 0")
    k = split.logits.shape[1]
    m = int(min(max(1, round(M)), k))

    logits = np.asarray(split.logits)
    out = np.empty(len(logits))
    for sl in row_chunks(len(logits), 4 * k):
        z = np.asarray(logits[sl], dtype=np.float64)
        parts = softmax_parts(z)
        if m < k:  # the m largest probabilities (their order is irrelevant to the sum)
            idx = np.argpartition(z, k - m, axis=1)[:, k - m:]
            z = np.take_along_axis(z, idx, axis=1)
            is_top = idx == parts["top"][:, None]
        else:
            is_top = np.arange(k)[None, :] == parts["top"][:, None]
        lp = z - parts["lse"][:, None]
        with np.errstate(divide="ignore"):
            log_q = np.where(is_top, parts["log_rest"][:, None], np.log(-np.expm1(lp)))  # log(1 - p)
        out[sl] = np.exp(gamma * (lp + log_q)).sum(axis=1)
    return out


# ----------------------------------------------------------------------------- KL matching


def kl_templates(data: BenchmarkData) -> dict:
    """Per predicted class c on the fit split: log d_c, d_c = mean softmax of fit rows predicted as c.

    Returns {"classes": (C',) class indices that were predicted at least once, "log_d": (C', K)}.
    log d_c is computed as logsumexp over rows of the log-softmax minus log n_c: exact
    even where a template probability underflows float64.
    """
    fit = require_fit(data)

    def build():
        preds = np.asarray(fit.logits).argmax(axis=1)
        classes = np.unique(preds)
        log_d = np.empty((len(classes), fit.logits.shape[1]))
        order = np.argsort(preds, kind="stable")
        bounds = np.searchsorted(preds[order], np.r_[classes, classes[-1] + 1])
        for j in range(len(classes)):
            rows = order[bounds[j]:bounds[j + 1]]
            lp = log_softmax(fit.logits[rows])
            log_d[j] = logsumexp(lp.T, axis=1) - np.log(len(rows))
        return {"classes": classes, "log_d": log_d}

    return fitted("kl_matching", (fit.logits,), build)


@register("kl_matching", "KL matching", needs=("logits", "fit"),
          paper="Hendrycks et al. 2022 (ICML), Scaling Out-of-Distribution Detection for Real-World Settings")
def kl_matching(data, split):
    """min_c KL(p(x) || d_c), d_c = the mean posterior of fit rows *predicted* as class c (no labels needed).

    A posterior unlike every class's typical posterior is OOD.  Classes never predicted
    on the fit split have no template and are left out of the minimum.
    KL(p || d) = sum p log p - p · log d: the entropy term in float64, the (N, K) x (K, C')
    cross term as one float32 matrix product per row chunk (|error| ~ 1e-6).
    """
    state = kl_templates(data)
    log_d_t = np.ascontiguousarray(state["log_d"].T, dtype=np.float32)  # (K, C')
    logits = np.asarray(split.logits)
    out = np.empty(len(logits))
    for sl in row_chunks(len(logits), 4 * logits.shape[1] + log_d_t.shape[1]):
        parts = softmax_parts(np.asarray(logits[sl], dtype=np.float64))
        neg_h = (parts["p"] * parts["lp"]).sum(axis=1)
        cross = (parts["p"].astype(np.float32) @ log_d_t).max(axis=1)  # the one big product, in float32
        out[sl] = neg_h - cross.astype(np.float64)
    return out


# ----------------------------------------------------------------------------- temperature scaling

T_RANGE = (1e-3, 1e3)


def _nll_slope(logits: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float, float]:
    """NLL(β) = mean[logsumexp(β z) - β z_y] and its first two derivatives in β = 1/T.

    dNLL/dβ = mean[E_p z - z_y], d²NLL/dβ² = mean[Var_p z] >= 0: NLL is convex in β.
    """
    n, k = logits.shape
    nll = g = h = 0.0
    for sl in row_chunks(n, 3 * k):
        z = np.asarray(logits[sl], dtype=np.float64)
        zy = z[np.arange(len(z)), labels[sl]]
        bz = beta * z
        lse = logsumexp(bz)
        p = np.exp(bz - lse[:, None])
        ez = (p * z).sum(axis=1)
        ez2 = (p * z * z).sum(axis=1)
        nll += float((lse - beta * zy).sum())
        g += float((ez - zy).sum())
        h += float(np.maximum(ez2 - ez * ez, 0.0).sum())
    return nll / n, g / n, h / n


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, tol: float = 1e-10, max_iter: int = 200) -> float:
    """The T in [1e-3, 1e3] minimising the NLL of softmax(logits / T) w.r.t. `labels` (rows with label < 0 ignored).

    The NLL is convex in β = 1/T, so its minimiser is the root of the (increasing)
    derivative: safeguarded Newton on β inside a shrinking bracket, falling back to a
    geometric bisection step whenever Newton would leave the bracket.  Deterministic,
    scipy-free, converges to machine precision in a handful of passes over the rows.
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    logits, labels = np.asarray(logits)[keep], labels[keep].astype(np.int64)
    if len(labels) == 0:
        raise MethodUnavailable("temperature scaling needs labelled ID rows in the fit split")
    lo, hi = 1.0 / T_RANGE[1], 1.0 / T_RANGE[0]
    if _nll_slope(logits, labels, lo)[1] >= 0:
        return T_RANGE[1]
    if _nll_slope(logits, labels, hi)[1] <= 0:
        return T_RANGE[0]
    beta = 1.0
    for _ in range(max_iter):
        _, g, h = _nll_slope(logits, labels, beta)
        if g > 0:
            hi = beta
        else:
            lo = beta
        step = beta - g / h if h > 0 else np.nan
        new = step if lo < step < hi else np.sqrt(lo * hi)
        if abs(new - beta) <= tol * beta or hi / lo - 1 <= tol:
            beta = new
            break
        beta = new
    return float(1.0 / beta)


def fitted_temperature(data: BenchmarkData) -> float:
    """The temperature that `temp_scaling` uses: fitted once per fit split (memoised)."""
    fit = require_fit(data, labels=True)
    return fitted("temp_scaling", (fit.logits, fit.labels), lambda: fit_temperature(fit.logits, fit.labels))


def log_one_minus_msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log(1 - max_k softmax(z / T)_k) = logsumexp_{k != argmax}(z_k / T) - logsumexp(z / T), exactly.

    Strictly increasing in -MSP, so it ranks exactly as -MSP does, but it never
    saturates: for confident rows float64 rounds MSP to exactly 1.0 (a logit gap
    above ~37 after dividing by T), which would tie them all.
    """
    logits = np.asarray(logits)
    n, k = logits.shape
    if k < 2:
        return np.zeros(n)
    out = np.empty(n)
    for sl in row_chunks(n, 3 * k):
        out[sl] = softmax_parts(np.asarray(logits[sl], dtype=np.float64) / temperature)["log_rest"]
    return out


@register("temp_scaling", "Temp. scaling", needs=("logits", "fit"),
          paper="Guo et al. 2017 (ICML), On Calibration of Modern Neural Networks")
def temp_scaling(data, split):
    """MSP of the calibrated classifier: T fitted on the labelled ID fit split by minimising the NLL.

    Scored as log(1 - max softmax(f(x) / T)), which ranks exactly as -MSP_T but stays
    tie-free when MSP rounds to 1.0 (fitted temperatures below 1 make that common).
    The fitted T is `oodcore.methods_logits.fitted_temperature(data)` (also in `export`'s JSON).
    """
    return log_one_minus_msp(split.logits, fitted_temperature(data))
