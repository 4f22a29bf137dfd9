"""Logit-only post-hoc detectors: MSP, MaxLogit, Energy, ODIN, entropy, GEN, KL matching, temperature scaling.

Conventions (as everywhere in the registry): `score(state, rows, **params)` returns one
float64 score per row, higher = more OOD.  Anything *fitted* (templates, a temperature)
is computed by the method's `fit(ctx)` from the ID fit split only — never from the
ID-eval or OOD rows — once per run (oodcore.detectors.fitting).

Everything here is numpy-only, so pages that only read the cache need not import torch.
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.errors import MethodUnavailable
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import (
    LSE_ROWS,
    PRODUCT_ROWS,
    log_softmax,
    logsumexp,
    map_row_chunks,
    max_logsumexp,
    max_softmax,
    row_chunks,
    softmax_parts,
)
from oodcore.detectors.registry import Param, get, register

# ---------------------------------------------------------------- methods

STUDY_TEMPERATURES = (1.0, 10.0, 100.0, 1000.0)
STUDY_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005)


def logit_stats(ctx: FitContext) -> dict:
    """Nothing fitted: a memory-only per-split memo ("~logits") of each row's max logit and log-sum-exp (T = 1),
    shared by MSP, Energy and NNGuide within the process, so the first of them computes it for all three."""
    return ctx.shared("logit_stats", lambda: {"memo": ctx.row_memo("~logits")})


def max_and_lse(state: dict | None, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, logsumexp) per row of the logits at T = 1 (`numerics.max_logsumexp`), from the split's memo when
    `state` has one (a state of `logit_stats`), else computed."""
    if state is None:
        return max_logsumexp(logits)
    return state["memo"].get("max_lse", logits, lambda: max_logsumexp(logits))


@register(
    "msp",
    "MSP",
    fit=logit_stats,
    paper="Hendrycks & Gimpel 2017, A Baseline for Detecting Misclassified and OOD Examples",
)
def msp(state, rows):
    """Negative maximum softmax probability, exp(max - logsumexp) (`numerics.max_softmax` at T = 1)."""
    m, lse = max_and_lse(state, rows.logits)
    return -np.exp(m - lse)


@register("maxlogit", "MaxLogit", paper="Hendrycks et al. 2022, Scaling OOD Detection to Real-World Settings")
def maxlogit(state, rows):
    """Negative maximum logit (no softmax normalisation)."""
    # the max is exact in any precision: taken in the cache's dtype, then widened (no float64 copy of the logits)
    return -np.asarray(np.asarray(rows.logits).max(axis=1), dtype=np.float64)


@register(
    "energy",
    "Energy",
    params=(Param("T", "temperature T", 1.0, 0.1, 1000.0, "log", help="E(x) = -T logsumexp(f(x)/T)"),),
    fit=logit_stats,
    paper="Liu et al. 2020, Energy-based Out-of-distribution Detection",
)
def energy(state, rows, T):
    """The free energy E(x) = -T logsumexp(f(x)/T); high energy = OOD."""
    if T == 1.0:  # dividing by 1 changes nothing: the split's shared log-sum-exp
        return -max_and_lse(state, rows.logits)[1]
    return -T * logsumexp(rows.logits, scale=T)


@register(
    "odin",
    "ODIN",
    params=(
        Param(
            "T", "temperature T", 1000.0, 1.0, 1000.0, "log", STUDY_TEMPERATURES, "softmax temperature", grid="temps"
        ),
        Param(
            "eps",
            "noise ε (pixels)",
            0.0,
            0.0,
            0.005,
            "linear",
            STUDY_EPSILONS,
            "input perturbation in [0,1] pixel units; ε > 0 needs the precomputed grid",
            grid="eps",
            without_grid=(0.0,),
        ),
    ),
    paper="Liang et al. 2018, Enhancing the Reliability of OOD Image Detection in Neural Networks",
    tune_grid=True,
)
def odin(state, rows, T, eps):
    """-max softmax(f(x~)/T) with x~ the input nudged towards its predicted class.

    ε = 0 is computed from the logits at any T; ε > 0 reads the rows' precomputed grid
    (one pass over the images computed every (T, ε) of the grid; a new image has none).
    """
    if eps == 0.0:
        return -max_softmax(rows.logits, T)
    grid = rows.precomputed.get("odin")
    if grid is None:
        raise MethodUnavailable(
            "ODIN with ε > 0 needs the precomputed grid: rerun with --odin-grid "
            "(a new image needs the network, see oodcore.extraction.odin)"
        )
    where = grid.index(T, eps)
    if where is None:
        raise MethodUnavailable(
            f"ODIN (T={T:g}, ε={eps:g}) is not on the cached grid T∈{list(grid.temps)}, ε∈{list(grid.eps)}"
        )
    return grid.values[:, where[0], where[1]]


# ----------------------------------------------------------------------------- entropy


@register(
    "entropy", "Entropy", paper="Shannon entropy of the softmax (e.g. Hendrycks & Gimpel 2017; Chan et al. ICCV 2021)"
)
def entropy(state, rows):
    """H(p) = -sum_k p_k log p_k of p = softmax(logits): a flat posterior (high entropy) is OOD.

    Computed from the float64 log-softmax, so p log p is exact (0 where p underflows).
    """
    logits = np.asarray(rows.logits)
    out = np.empty(len(logits))

    def chunk(sl: slice) -> None:
        parts = softmax_parts(np.asarray(logits[sl], dtype=np.float64))
        out[sl] = -(parts["p"] * parts["lp"]).sum(axis=1)

    map_row_chunks(len(logits), 4 * logits.shape[1], chunk)
    return out


# ----------------------------------------------------------------------------- GEN


@register(
    "gen",
    "GEN",
    params=(
        Param("gamma", "γ", 0.1, 0.01, 10.0, "log", help="exponent of p^γ (1-p)^γ; the paper uses 0.1"),
        Param(
            "M",
            "top-M classes",
            100.0,
            1.0,
            1000.0,
            "log",
            help="sum over the M largest probabilities (clipped to the number of classes); the paper uses 100",
        ),
    ),
    paper="Liu et al. 2023 (CVPR), GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
)
def gen(state, rows, gamma, M):
    """Generalized entropy G_γ(p) = sum over the top-M p_j of p_j^γ (1 - p_j)^γ: high = OOD.

    A small γ makes the score sensitive to the whole shape of the truncated posterior,
    not only its maximum.  Exact in float64 via logs: p^γ = exp(γ log p), 1 - p =
    -expm1(log p), and for the largest p, 1 - p = the sum of the others (computed as a
    log-sum-exp), so neither the near-zero tail nor a saturated p ≈ 1 loses precision
    (no clamping of p, unlike some reimplementations).
    """
    if gamma <= 0:
        raise ValueError("GEN needs γ > 0")
    k = rows.logits.shape[1]
    m = int(min(max(1, round(M)), k))

    logits = np.asarray(rows.logits)
    out = np.empty(len(logits))

    def chunk(sl: slice) -> None:
        raw = np.asarray(logits[sl])
        z = np.asarray(raw, dtype=np.float64)
        parts = softmax_parts(z, full=False)
        if m < k:  # the m largest logits, as values (their order is irrelevant to the sum), selected in the
            # cache's own dtype (half the bytes of float64) and widened exactly
            z = np.partition(raw, k - m, axis=1)[:, k - m :].astype(np.float64)
            is_top = np.zeros(z.shape, dtype=bool)  # one occurrence of the row's maximum takes log_rest
            is_top[np.arange(len(z)), z.argmax(axis=1)] = True
        else:
            is_top = np.arange(k)[None, :] == parts["top"][:, None]
        lp = z - parts["lse"][:, None]
        with np.errstate(divide="ignore"):
            log_q = np.where(is_top, parts["log_rest"][:, None], np.log(-np.expm1(lp)))  # log(1 - p)
        out[sl] = np.exp(gamma * (lp + log_q)).sum(axis=1)

    map_row_chunks(len(logits), 4 * k, chunk)
    return out


# ----------------------------------------------------------------------------- KL matching


def kl_templates(ctx: FitContext) -> dict:
    """Per predicted class c on the fit split: log d_c, d_c = mean softmax of fit rows predicted as c.

    Returns {"classes": (C',) class indices that were predicted at least once, "log_d": (C', K)}.
    log d_c is computed as logsumexp over rows of the log-softmax minus log n_c: exact
    even where a template probability underflows float64.
    """
    fit = ctx.require_fit()
    preds = np.asarray(fit.logits).argmax(axis=1)
    classes = np.unique(preds)
    log_d = np.empty((len(classes), fit.logits.shape[1]))
    order = np.argsort(preds, kind="stable")
    bounds = np.searchsorted(preds[order], np.r_[classes, classes[-1] + 1])
    for j in range(len(classes)):
        rows = order[bounds[j] : bounds[j + 1]]
        lp = log_softmax(fit.logits[rows])
        log_d[j] = logsumexp(lp.T, axis=1) - np.log(len(rows))
    return {"classes": classes, "log_d": log_d}


@register(
    "kl_matching",
    "KL matching",
    fit=kl_templates,
    needs=("logits", "fit"),
    paper="Hendrycks et al. 2022 (ICML), Scaling Out-of-Distribution Detection for Real-World Settings",
)
def kl_matching(state, rows):
    """min_c KL(p(x) || d_c), d_c = the mean posterior of fit rows *predicted* as class c (no labels needed).

    A posterior unlike every class's typical posterior is OOD.  Classes never predicted
    on the fit split have no template and are left out of the minimum.
    KL(p || d) = sum p log p - p · log d: the entropy term in float64, the (N, K) x (K, C')
    cross term as one float32 matrix product per row chunk (|error| ~ 1e-6).
    """
    log_d_t = np.ascontiguousarray(state["log_d"].T, dtype=np.float32)  # (K, C')
    logits = np.asarray(rows.logits)
    out = np.empty(len(logits))

    def chunk(sl: slice) -> None:
        rows = logits[sl]
        p32, neg_h = np.empty(rows.shape, dtype=np.float32), np.empty(len(rows))
        for start in range(0, len(rows), LSE_ROWS):  # the softmax block by block, while the block is in cache
            blk = slice(start, start + LSE_ROWS)
            parts = softmax_parts(np.asarray(rows[blk], dtype=np.float64))
            neg_h[blk] = (parts["p"] * parts["lp"]).sum(axis=1)
            p32[blk] = parts["p"]
        cross = (p32 @ log_d_t).max(axis=1)  # the one big product, in float32
        out[sl] = neg_h - cross.astype(np.float64)

    map_row_chunks(len(logits), 4 * logits.shape[1] + log_d_t.shape[1], chunk, min_rows=PRODUCT_ROWS)
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


def fit_temp_scaling(ctx: FitContext) -> dict:
    """{"T": the temperature `temp_scaling` uses}, fitted on the labelled ID fit split."""
    fit = ctx.require_fit(labels=True)
    return {"T": fit_temperature(fit.logits, fit.labels)}


def fitted_temperature(data) -> float:
    """The run's fitted temperature (memoised with the method's state)."""
    return get("temp_scaling").state(data)["T"]


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

    def chunk(sl: slice) -> None:
        out[sl] = softmax_parts(np.asarray(logits[sl], dtype=np.float64) / temperature, full=False)["log_rest"]

    map_row_chunks(n, 3 * k, chunk)
    return out


@register(
    "temp_scaling",
    "Temp. scaling",
    fit=fit_temp_scaling,
    needs=("logits", "fit"),
    paper="Guo et al. 2017 (ICML), On Calibration of Modern Neural Networks",
)
def temp_scaling(state, rows):
    """MSP of the calibrated classifier: T fitted on the labelled ID fit split by minimising the NLL.

    Scored as log(1 - max softmax(f(x) / T)), which ranks exactly as -MSP_T but stays
    tie-free when MSP rounds to 1.0 (fitted temperatures below 1 make that common).
    The fitted T is `oodcore.detectors.logits.fitted_temperature(data)` (also in `export`'s JSON).
    """
    return log_one_minus_msp(rows.logits, state["T"])
