"""Activation-shaping detectors: ASH (-B, -P, -S), SCALE and OptFS.

Each reshapes the penultimate features before the final layer and scores the result.  The
papers define ASH on feature maps before the last pooling (ASH) or after it (SCALE); like
OpenOOD and pytorch-ood on ImageNet, these are the *pooled-feature* forms: the cache holds
the pooled (N, D) features, and a row is shaped as one vector of D activations (pytorch-ood's
B x C x 1 x 1 maps).  ASH and SCALE learn nothing (their percentile p only changes scoring, so
a slider never refits); OptFS fits its bin weights in closed form on the ID fit split.

Per row, ASH and SCALE need only the k-th largest activation and the sum of the k largest:
one sort per row gives both for every whole percentage (`_row_table`, kept beside the state
per split), so a slider move reads a column instead of re-sorting.  SCALE only rescales a row, so
when a split's cached logits are this head's output on its features (a cache's own logits: checked
once per split on a sample of rows) it rescales the logits instead of multiplying by the head again.
numpy only.
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.head import (
    SPARSE_SHARE,
    contiguous_w_t,
    head_logits,
    head_state,
    masked_csr,
    sparse_module,
)
from oodcore.detectors.numerics import (
    PRODUCT_ROWS,
    affine_logsumexp,
    bias_logsumexp,
    map_row_chunks,
    rescaled_logsumexp,
    row_chunks,
)
from oodcore.detectors.registry import Param, register
from oodcore.store.rundata import SplitArrays


def kept_count(d: int, p: float) -> int:
    """How many of D activations survive pruning at percentile p (%): D - round(D p / 100), as pytorch-ood,
    but at least one (on small D a high p would otherwise keep none)."""
    return max(1, int(d - int(np.round(d * (float(p) / 100.0)))))


TABLE_PERCENTS = np.arange(0, 100)  # the slider's whole percentages: one column each in the per-split table


def _topk_direct(f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k-th largest value, sum of the k largest in float64) per row, by one partition."""
    d = f.shape[1]
    part = np.partition(f, d - k, axis=1)
    return part[:, d - k].copy(), part[:, d - k :].sum(axis=1, dtype=np.float64)


def _row_table(features: np.ndarray) -> dict:
    """One sort per row, sliced at every whole percentage p: the k-th largest activation and the top-k sum.

    ks (m,): the kept counts of p = 0..99; thr (m, N) float32 and s2 (m, N) float64, one *row* per kept count
    so that a slider move reads contiguous memory (a column of an (N, m) table touches every page of it);
    total (N,) = Σ f.  Any other p is computed directly (`_topk`).
    """
    n, d = features.shape
    ks = np.unique([kept_count(d, p) for p in TABLE_PERCENTS])
    thr = np.empty((len(ks), n), dtype=np.float32)
    s2 = np.empty((len(ks), n))
    total = np.empty(n)
    for sl in row_chunks(n, 3 * d):
        f = np.asarray(features[sl], dtype=np.float32)
        desc = -np.sort(-f, axis=1)
        thr[:, sl] = desc[:, ks - 1].T
        s2[:, sl] = np.cumsum(desc, axis=1, dtype=np.float64)[:, ks - 1].T
        total[sl] = f.sum(axis=1, dtype=np.float64)
    return {"ks": ks, "thr": thr, "s2": s2, "total": total}


def _topk(state: dict, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k-th largest, top-k sum, row sum) per row: a row of the split's memoised table, or computed directly."""
    table = state["memo"].get("row_columns", features, lambda: _row_table(features))
    at = int(np.searchsorted(table["ks"], k))
    if at < len(table["ks"]) and table["ks"][at] == k:
        return table["thr"][at], table["s2"][at], table["total"]
    thr, s2 = np.empty(len(features), dtype=np.float32), np.empty(len(features))
    for sl in row_chunks(len(features), 2 * features.shape[1]):
        thr[sl], s2[sl] = _topk_direct(np.asarray(features[sl], dtype=np.float32), k)
    return thr, s2, table["total"]


def topk_mask(f: np.ndarray, thr: np.ndarray, k: int) -> np.ndarray:
    """Exactly k kept per row: every value above the row's k-th largest, then ties at it by lowest index."""
    keep = f >= thr[:, None]
    # rows whose ties at the k-th value would keep too many (rare); counted as bytes (2x faster than bool sums)
    over = np.flatnonzero(np.add.reduce(keep.view(np.uint8), axis=1, dtype=np.int32) > k)
    if len(over):
        sub = f[over]
        above = sub > thr[over, None]
        tie = sub == thr[over, None]
        need = k - above.sum(axis=1)
        keep[over] = above | (tie & (np.cumsum(tie, axis=1) <= need[:, None]))
    return keep


def fit_head(ctx: FitContext) -> dict:
    """Shaping methods learn nothing from the fit split: their state is the head (W, b) and a per-split memo.

    One state shared by ASH-B/-P/-S and SCALE, so the per-split table is built once for all four.
    """

    def build():
        head = head_state(ctx)
        return {"memo": ctx.row_memo("shaping"), "head": head}

    return ctx.shared("shaping_head", build)


def _energy_of(shaped: np.ndarray, state: dict) -> np.ndarray:
    """-logsumexp(x W^T + b) of shaped rows (float32 product, float64 log-sum-exp)."""
    return -affine_logsumexp(np.asarray(shaped, dtype=np.float32), contiguous_w_t(state["head"]), state["head"]["b"])


def _pruning(rows: SplitArrays, p: float) -> tuple[np.ndarray, int]:
    feats = split_features(rows)
    if not 0.0 <= float(p) < 100.0:
        raise ValueError(f"p = {p} is outside [0, 100): a percentile of the activations to prune")
    return feats, kept_count(feats.shape[1], p)


def _sparse_energy(f: np.ndarray, keep: np.ndarray, row_values, state: dict):
    """-logsumexp(x W^T + b) of pruned rows x by a CSR product over the kept entries only: k of D multiply-adds
    per output instead of D (the dense product's float32 sums, in another order).  The rows' kept counts are
    read off the mask (k each from `topk_mask`), so the product stays right whatever the mask holds."""

    def values(flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if f is None:
            return np.repeat(row_values, counts)
        vals = f.ravel()[flat]
        if row_values is not None:
            vals *= np.repeat(row_values, counts)
        return vals

    x = masked_csr(keep, values)
    return -bias_logsumexp(np.asarray(x @ contiguous_w_t(state["head"])), state["head"]["b"])


def _ash(state: dict, rows: SplitArrays, p: float, variant: str) -> np.ndarray:
    feats, k = _pruning(rows, p)
    n, d = feats.shape
    thr, s2, s1 = _topk(state, feats, k)
    out = np.empty(n)
    # at most SPARSE_SHARE of a row kept: the pruned rows go through a sparse product (scipy, when installed)
    sparse = k <= SPARSE_SHARE * d and sparse_module() is not None

    def rows(sl: slice) -> None:
        f = np.asarray(feats[sl], dtype=np.float32)
        keep = topk_mask(f, thr[sl], k)
        if variant == "b":  # binarise: every kept activation becomes s1 / k
            factor = (s1[sl] / k).astype(np.float32)
            if sparse:
                out[sl] = _sparse_energy(None, keep, factor, state)
                return
            shaped = keep * factor[:, None]
        else:
            factor = np.exp(s1[sl] / s2[sl]).astype(np.float32) if variant == "s" else None
            if sparse:
                out[sl] = _sparse_energy(f, keep, factor, state)
                return
            # f x keep: branch-free (np.where on a random mask is ~12x slower), exact for finite f (f or ±0, which
            # add nothing to the product); a chunk with a non-finite activation takes np.where (NaN x 0 is NaN)
            shaped = np.multiply(f, keep, dtype=np.float32)
            if not np.isfinite(f).all():
                shaped = np.where(keep, f, np.float32(0))
            if factor is not None:  # ASH-S: rescale the kept activations by exp(s1 / s2)
                shaped *= factor[:, None]
        out[sl] = _energy_of(shaped, state)

    map_row_chunks(n, 3 * d + state["head"]["w_t"].shape[1], rows, min_rows=PRODUCT_ROWS)
    return out


def ash_param(default: float) -> Param:
    return Param(
        "p",
        "pruning percentile p (%)",
        default,
        0.0,
        99.0,
        "linear",
        help="per image, activations below its own p-th percentile are set to zero; the default is the paper's ImageNet "
        "ResNet-50 setting (ASH-P 60, ASH-B 65, ASH-S 90)",
    )


ASH_PAPER = "Djurisic et al. 2023 (ICLR), Extremely Simple Activation Shaping for Out-of-Distribution Detection"
ASH_NEEDS = ("features", "head")


@register("ash_p", "ASH-P", fit=fit_head, params=(ash_param(60.0),), needs=ASH_NEEDS, paper=ASH_PAPER)
def ash_p(state, rows, p):
    """ASH-P: keep each row's top (100-p)% activations, zero the rest, score the energy of the head on the result.

    Pooled-feature form (pytorch-ood's B x C x 1 x 1 maps; the paper prunes the feature maps before
    pooling): the percentile is taken over a row's D pooled activations.
    """
    return _ash(state, rows, p, "p")


@register("ash_b", "ASH-B", fit=fit_head, params=(ash_param(65.0),), needs=ASH_NEEDS, paper=ASH_PAPER)
def ash_b(state, rows, p):
    """ASH-B: prune as ASH-P, then set every kept activation to s1 / k (s1 = the row's sum, k = kept count); energy.

    Pooled-feature form (see ASH-P): the binarised row keeps the total activation s1.
    """
    return _ash(state, rows, p, "b")


@register("ash_s", "ASH-S", fit=fit_head, params=(ash_param(90.0),), needs=ASH_NEEDS, paper=ASH_PAPER)
def ash_s(state, rows, p):
    """ASH-S: prune as ASH-P, then multiply the kept activations by exp(s1 / s2); energy of the head.

    s1 = sum of all the row's activations, s2 = sum of the kept ones (pooled-feature form, see ASH-P).
    """
    return _ash(state, rows, p, "s")


# ----------------------------------------------------------------------------- SCALE


@register(
    "scale",
    "SCALE",
    fit=fit_head,
    params=(
        Param(
            "p",
            "percentile p (%)",
            85.0,
            0.0,
            99.0,
            "linear",
            help="the scale factor is exp(sum of all activations / sum of the top (100-p)%); nothing is pruned (the paper: 85 on ImageNet)",
        ),
    ),
    needs=ASH_NEEDS,
    paper="Xu et al. 2024 (ICLR), Scaling for Training Time and Post-hoc Out-of-distribution Detection Enhancement",
)
def scale(state, rows, p):
    """SCALE: energy of the head on f · exp(s1 / s2), s1 = Σ f, s2 = the sum of the row's top (100-p)% activations.

    No activation is pruned; the top-k set only sets the factor.  Applied to the pooled features,
    as in the paper (after the last average pooling).
    """
    feats, k = _pruning(rows, p)
    n, d = feats.shape
    _, s2, s1 = _topk(state, feats, k)
    factor = np.exp(s1 / s2)
    out = np.empty(n)
    logits = head_logits(state["head"], rows)
    if logits is not None:  # (f r) W^T + b = r (f W^T) + (b - r b): the cached logits, rescaled

        def logit_rows(sl: slice) -> None:
            out[sl] = -rescaled_logsumexp(logits[sl], factor[sl], state["head"]["b"])

        map_row_chunks(n, logits.shape[1], logit_rows)
        return out

    def rows(sl: slice) -> None:
        f = np.asarray(feats[sl], dtype=np.float32) * factor[sl].astype(np.float32)[:, None]
        out[sl] = _energy_of(f, state)

    map_row_chunks(n, d + state["head"]["w_t"].shape[1], rows, min_rows=PRODUCT_ROWS)
    return out


# ----------------------------------------------------------------------------- OptFS


def _bin_index(x: np.ndarray, lefts: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin index, inside) of each value: bin i holds lefts[i] <= x < lefts[i] + width (the authors' masks).

    The index is searchsorted(lefts, x, "right") - 1 exactly: estimated arithmetically (the bins are
    equal-width), then corrected against the edges themselves until every value sits between its
    edges (one or two steps absorb the rounding), which is several times faster than a binary search.
    """
    n = len(lefts)
    edges = np.concatenate([[-np.inf], lefts, [np.inf]])  # edges[j] <= x < edges[j + 1] for j = index + 1
    # upper[j] = edges[j + 1], but NaN above the last bin: no value (not even +inf) moves past it
    upper = edges[1:].copy()
    upper[-1] = np.nan
    if width > 0:
        est = x - lefts[0]
        est /= width
        est += 1.0
        with np.errstate(invalid="ignore"):  # NaN (and ±inf) cast to the int32 minimum, then clipped to 0
            j = np.floor(est, out=est).astype(np.int32)
        np.clip(j, 0, n, out=j)  # j = 0: below every bin, where a NaN activation lands (outside, as its masks say)
    else:
        j = np.zeros(x.shape, dtype=np.int32)
    while True:  # the estimate is off by at most one bin (rounding): usually no value moves
        up = np.take(upper, j) <= x
        down = np.take(edges, j) > x
        if not (up.any() or down.any()):
            break
        j += up
        j -= down
    idx = j - 1
    safe = np.clip(idx, 0, n - 1)
    inside = (idx >= 0) & (x < np.take(lefts, safe) + width)
    return safe, inside


def fit_optfs(ctx: FitContext, bins: float = 100) -> dict:
    """Bin edges over the fit activations' [0.1%, 99.9%] quantile range and the closed-form bin weights θ.

    θ_i ∝ I_i = mean over fit rows of Σ_d [f_d in bin i] w_{ŷ,d} f_d (ŷ the row's predicted class):
    the expected contribution of bin i to the predicted logit; scaled to ||θ|| = 1000 as the
    authors' code does (the score's ranking does not depend on the scale).
    """
    fit = ctx.require_fit(features=True)
    w, _ = ctx.head()
    w64 = np.asarray(w, dtype=np.float64)
    feats = fit.features
    n_bins = int(max(1, round(bins)))
    # the range does not depend on the bin count: found once per run, so a move of the bins slider only re-bins
    lo, hi = ctx.shared("optfs_range", lambda: np.quantile(feats, [1e-3, 1 - 1e-3]))
    width = float((hi - lo) / n_bins)
    if not width > 0:
        lo, width = float(lo), 1.0  # constant activations: one bin holds them all
    lefts = np.arange(lo, hi, width) if hi > lo else np.array([float(lo)])
    preds = np.asarray(fit.logits).argmax(axis=1)
    parts: dict[int, np.ndarray] = {}

    def chunk(sl: slice) -> None:
        f = np.asarray(feats[sl], dtype=np.float64)
        contrib = w64[preds[sl]] * f
        idx, inside = _bin_index(f, lefts, width)
        parts[sl.start] = np.bincount(idx[inside], weights=contrib[inside], minlength=len(lefts))

    map_row_chunks(len(feats), 3 * feats.shape[1], chunk)
    total = np.zeros(len(lefts))
    for start in sorted(parts):  # in row order, whichever chunk finished first: the sequential loop's sums
        total += parts[start]
    impact = total / len(feats)
    norm = np.linalg.norm(impact)
    theta = impact / norm * 1000.0 if norm > 0 else np.zeros_like(impact)
    return {"w": w64, "lefts": lefts, "width": width, "theta": theta}


@register(
    "optfs",
    "OptFS",
    fit=fit_optfs,
    params=(
        Param(
            "bins",
            "shaping bins",
            100.0,
            10.0,
            400.0,
            "linear",
            help="number of piecewise-constant pieces over the fit activations' 0.1-99.9% range (the authors use 100)",
            fit=True,
        ),
    ),
    needs=("logits", "features", "head", "fit"),
    paper="Zhao et al. 2024 (ICLR), Towards Optimal Feature-Shaping Methods for Out-of-Distribution Detection",
)
def optfs(state, rows):
    """-w_ŷ · (f ⊙ θ(f)): the predicted logit (without bias) of the features shaped by a fitted piecewise-constant θ.

    θ(v) = θ_i for v in bin i, 0 outside the fitted range; θ is fitted in closed form on the ID fit
    split (see `fit_optfs`).  The authors' default ("vanilla") score, on the pooled features.
    """
    feats = split_features(rows)
    preds = np.asarray(rows.logits).argmax(axis=1)
    out = np.empty(len(feats))

    def rows(sl: slice) -> None:
        f = np.asarray(feats[sl], dtype=np.float64)
        idx, inside = _bin_index(f, state["lefts"], state["width"])
        shaped = np.where(inside, f * np.take(state["theta"], idx), 0.0)
        out[sl] = -np.einsum("ij,ij->i", state["w"][preds[sl]], shaped)

    map_row_chunks(len(feats), 3 * feats.shape[1], rows)
    return out
