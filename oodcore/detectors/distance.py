"""Fitted-distance detectors on the penultimate features: Mahalanobis, relative Mahalanobis, KNN.

Everything is fitted on the ID fit split only, once per run (oodcore.detectors.fitting).  Covariances are accumulated and eigen-decomposed in
float64 (one shared Gram pass, see `methods_features.fit_moments`); the inverse is
a pseudo-inverse with a small ridge; no per-class covariance and no (N, K, D)
tensor is ever formed: a squared distance to every class mean is
||y||^2 - 2 y·m_k + ||m_k||^2 in whitened coordinates, one matrix product per row chunk.
The whitening factor is triangular, so whitening a row skips its zero half (`whiten`).
numpy only.
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import fit_moments, split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import PRODUCT_ROWS, map_row_chunks, row_chunks, slider_values
from oodcore.detectors.registry import Param, register
from oodcore.detectors.search import QUERY_BATCH, Bank, normalised32

RIDGE = 1e-10  # relative to the largest eigenvalue


def whitener(cov: np.ndarray) -> np.ndarray:
    """L (D, r), lower-trapezoidal (L[i, j] = 0 for j > i), with L L^T = Σ^+ (ridged pseudo-inverse), so
    (x - μ)^T Σ^+ (x - μ) = ||(x - μ) L||^2.

    Σ = V Λ V^T (float64 eigh); with ε = RIDGE · λ_max, directions with λ <= ε are a
    null-space (no fit variance: dropped, as a pseudo-inverse does) and the others
    are weighted 1 / (λ + ε): E = V_r (Λ_r + ε)^(-1/2) has E E^T = Σ^+.  Any factor with that
    product gives the same distances; the one returned is R^T from the QR decomposition E^T = Q R
    (E E^T = R^T Q^T Q R = R^T R), which is triangular, so `whiten` skips its zero half.
    """
    cov = (np.asarray(cov, dtype=np.float64) + np.asarray(cov, dtype=np.float64).T) / 2
    evals, evecs = np.linalg.eigh(cov)
    eps = RIDGE * max(float(evals[-1]), np.finfo(np.float64).tiny)
    keep = evals > eps
    factor = evecs[:, keep] / np.sqrt(evals[keep] + eps)
    return np.ascontiguousarray(np.linalg.qr(factor.T, mode="r").T)


PANEL_COLUMNS = 160  # columns of L per product in `whiten`: 8 panels at D = 1280


def whitening(lw: np.ndarray) -> list[tuple[int, int, int, np.ndarray]]:
    """L as column panels without their leading zero rows: [(first column, end column, first nonzero row,
    float32 block L[row:, columns]), ...], made once per scoring call for `whiten`.

    For `whitener`'s triangular factor, panel j starts at its own first column, so the panels hold about
    half of L; any other L (a state fitted before the factor was triangular) is whitened all the same,
    with less or nothing skipped.
    """
    l32 = np.asarray(lw, dtype=np.float32)
    panels = []
    for c0 in range(0, l32.shape[1], PANEL_COLUMNS):
        c1 = min(c0 + PANEL_COLUMNS, l32.shape[1])
        nonzero = np.flatnonzero(np.any(l32[:, c0:c1] != 0, axis=1))
        r0 = int(nonzero[0]) if nonzero.size else l32.shape[0]
        panels.append((c0, c1, r0, np.ascontiguousarray(l32[r0:, c0:c1])))
    return panels


def whiten(centred: np.ndarray, panels: list) -> np.ndarray:
    """centred @ L (float32) from `whitening`'s panels: panel j multiplies only the columns of `centred` from its
    first nonzero row on, since the rows above it are zero.  With 8 panels of a triangular L that is ~56% of
    the dense product's multiply-adds, in numpy's BLAS (so row chunks still run side by side, see
    `map_row_chunks`); each output is the same sum without its zero terms, equal to float32 rounding.
    """
    y = np.empty((len(centred), panels[-1][1] if panels else 0), dtype=np.float32)
    for c0, c1, r0, block in panels:
        y[:, c0:c1] = centred[:, r0:] @ block
    return y


def class_gaussian(ctx: FitContext) -> dict:
    """Class means μ_k (labels present in the fit split) and the shared (tied) covariance, whitened.

    Σ = (1/N) Σ_k Σ_{i: y_i = k} (f_i - μ_k)(f_i - μ_k)^T, obtained from the shared
    Gram as Σ_0 - Σ_k (n_k / N)(μ_k - μ_0)(μ_k - μ_0)^T (within = total - between).
    Returned in float64: mu0, L (D, r), means_w = (μ_k - μ_0) L (C', r), classes.
    """
    ctx.require_fit(features=True, labels=True)

    def build():
        mom = fit_moments(ctx)
        offsets = mom["means"] - mom["mu0"]
        between = (offsets * (mom["counts"] / mom["n"])[:, None]).T @ offsets
        lw = whitener(mom["sigma0"] - between)
        means_w = offsets @ lw
        # memo "~class_min": a split's class distances, shared with relative Mahalanobis within the process
        return {
            "mu0": mom["mu0"],
            "L": lw,
            "means_w": means_w,
            "classes": mom["classes"],
            "memo": ctx.row_memo("~class_min"),
        }

    return ctx.shared("class_gaussian", build)


def background_gaussian(ctx: FitContext) -> dict:
    """The background Gaussian of relative Mahalanobis: mean μ_0 and covariance Σ_0 of all fit features."""
    ctx.require_fit(features=True, labels=True)
    mom = fit_moments(ctx)
    return {"mu0": mom["mu0"], "L": whitener(mom["sigma0"])}


def fit_rel_mahalanobis(ctx: FitContext) -> dict:
    return {"class": class_gaussian(ctx), "background": background_gaussian(ctx)}


def _class_min(features: np.ndarray, state: dict) -> np.ndarray:
    """min_k ||y - m_k||^2 per row with y = (f - μ_0) L: the minimum squared class Mahalanobis distance.

    Centred at μ_0 and whitened by float32 products (the float64 decomposition cast once);
    norms and the combination in float64: min_k (||m_k||^2 - 2 y·m_k), then + ||y||^2 (the same for every k,
    so it is added to the N minima instead of the N x K distances).
    """
    mu0 = state["mu0"].astype(np.float32)
    lw = whitening(state["L"])
    # -2 m_k^T: scaling by a power of two is exact, so y @ (-2 M^T) is -2 (y @ M^T) bit for bit, one pass fewer
    means_t = np.ascontiguousarray(state["means_w"].T.astype(np.float32)) * np.float32(-2.0)
    m_sq = np.einsum("ij,ij->i", state["means_w"], state["means_w"])
    out = np.empty(len(features))

    def rows(sl: slice) -> None:
        y = whiten(np.asarray(features[sl], dtype=np.float32) - mu0, lw)
        y_sq = np.einsum("ij,ij->i", y, y, dtype=np.float64)
        md = np.add(y @ means_t, m_sq[None, :], dtype=np.float64)  # widened and offset in one pass
        out[sl] = np.maximum(md.min(axis=1) + y_sq, 0.0)

    map_row_chunks(len(features), 2 * features.shape[1] + 2 * means_t.shape[1], rows, min_rows=PRODUCT_ROWS)
    return out


def _background_distance(features: np.ndarray, background: dict) -> np.ndarray:
    """(f - μ_0)^T Σ_0^+ (f - μ_0) per row, the same way."""
    mu0 = background["mu0"].astype(np.float32)
    l0 = whitening(background["L"])
    out = np.empty(len(features))

    def rows(sl: slice) -> None:
        y0 = whiten(np.asarray(features[sl], dtype=np.float32) - mu0, l0)
        out[sl] = np.einsum("ij,ij->i", y0, y0, dtype=np.float64)

    map_row_chunks(len(features), 2 * features.shape[1], rows, 4, min_rows=PRODUCT_ROWS)
    return out


@register(
    "mahalanobis",
    "Mahalanobis",
    fit=class_gaussian,
    needs=("features", "fit"),
    paper="Lee et al. 2018 (NeurIPS), A Simple Unified Framework for Detecting OOD Samples and Adversarial Attacks",
)
def mahalanobis(state, rows):
    """min_k (f - μ_k)^T Σ^+ (f - μ_k): class means + one tied covariance from the labelled fit split.

    The penultimate features of each class are modelled as a Gaussian with a shared
    covariance (LDA); a feature far from every class mean is OOD.  (Feature-space
    version: no input pre-processing and no layer ensemble.)
    """
    feats = split_features(rows)
    return state["memo"].get("class_min", feats, lambda: _class_min(feats, state)).copy()


@register(
    "rel_mahalanobis",
    "Relative Mahalanobis",
    fit=fit_rel_mahalanobis,
    needs=("features", "fit"),
    paper="Ren et al. 2021, A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection",
)
def rel_mahalanobis(state, rows):
    """min_k [MD_k(f) - MD_0(f)]: the class distance relative to a background Gaussian N(μ_0, Σ_0) of all fit features.

    MD_0 is the same for every k, so this is min_k MD_k(f) - MD_0(f).  Subtracting
    the background distance removes directions that are far for ID and OOD alike,
    which helps near-OOD.
    """
    feats = split_features(rows)
    cls = state["class"]
    return cls["memo"].get("class_min", feats, lambda: _class_min(feats, cls)) - _background_distance(
        feats, state["background"]
    )


# ----------------------------------------------------------------------------- KNN


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_bank(ctx: FitContext) -> dict:
    """The fit features, 1 / ||f|| of every fit row (float32), and a per-split memo of neighbour tables.

    The search bank (`search.Bank`) normalises the fit rows when first searched: once, into one faiss
    index, when they fit in one block; block by block otherwise, so memory stays bounded at any fit size.
    """
    fit = ctx.require_fit(features=True)
    inv = np.empty(len(fit.features), dtype=np.float64)
    for sl in row_chunks(len(inv), fit.features.shape[1]):
        inv[sl] = 1.0 / np.maximum(np.linalg.norm(np.asarray(fit.features[sl], dtype=np.float64), axis=1), 1e-12)
    return {
        "features": fit.features,
        "inv_norm": inv.astype(np.float32),
        "memo": ctx.row_memo("knn"),
        "bank": Bank(fit.features),
    }


KNN_K = Param(
    "k",
    "neighbour k",
    50.0,
    1.0,
    1000.0,
    "log",
    help="distance to the k-th nearest normalised fit feature (clipped to the fit size); the paper uses 1000 with all of ImageNet train, 50 on CIFAR",
)


def _knn_search(state: dict, q: np.ndarray, k: int) -> np.ndarray:
    """(N, k) int64: the fit rows of each normalised query's k nearest normalised fit features, nearest first.

    An exact inner-product search over the normalised fit rows (`search.Bank`: faiss when installed,
    else numpy; block by block with a merge when the fit set is larger than one block).
    """
    return state["bank"].search(q, k)[1]


WINDOW = 2  # float32 similarities can swap near-tied neighbours: the k-th is re-ranked in float64 among k ± WINDOW


def _window(k: int, n_fit: int) -> tuple[int, int]:
    return max(0, k - 1 - WINDOW), min(n_fit, k + WINDOW)


def _table_ks(n_fit: int) -> list[int]:
    """The k of every value the slider offers (a 1-2-5 ladder and the default), clipped to the fit size."""
    return sorted({int(min(max(1, round(v)), n_fit)) for v in slider_values(KNN_K)})


def _knn_table(state: dict, feats: np.ndarray) -> dict:
    """Per split, once (and stored beside the run): the exact k-th distance for every k the slider offers.

    One search per query batch, as deep as the largest k (+ WINDOW); each k's float32 ranks k ± WINDOW
    are re-ranked in float64 (`_kth_distance`).  {"ks": (m,) int64, "dist": (N, m) float64}.
    """
    n_fit = len(state["inv_norm"])
    ks = _table_ks(n_fit)
    deepest = min(n_fit, ks[-1] + WINDOW)
    dist = np.empty((len(feats), len(ks)))
    for start in range(0, len(feats), QUERY_BATCH):
        batch = feats[start : start + QUERY_BATCH]
        neighbours = _knn_search(state, normalised32(batch), deepest)
        for j, k in enumerate(ks):
            lo, hi = _window(k, n_fit)
            dist[start : start + len(batch), j] = _kth_distance(
                batch, state["features"], neighbours[:, lo:hi], k, n_fit
            )
    return {"ks": np.asarray(ks, dtype=np.int64), "dist": dist}


def _kth_distance(feats: np.ndarray, fit_feats: np.ndarray, cands: np.ndarray, k: int, n_fit: int) -> np.ndarray:
    """The k-th smallest exact (float64) distance, re-ranking each row's candidates (its float32 ranks k ± WINDOW).

    ||f/||f|| - g/||g|| ||_2 in float64 for every candidate g; the k-th nearest is the one at position
    k - 1 - lo among the sorted candidate distances (those ranked before the window are nearer).
    """
    lo, _ = _window(k, n_fit)
    out = np.empty(len(feats))
    width = cands.shape[1]
    for sl in row_chunks(len(feats), (width + 1) * feats.shape[1]):
        q = _normalise(feats[sl])
        g = _normalise(np.asarray(fit_feats)[cands[sl].ravel()]).reshape(len(q), width, -1)
        diff = g - q[:, None, :]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        out[sl] = np.sort(dist, axis=1)[:, k - 1 - lo]
    return out


@register(
    "knn",
    "KNN",
    fit=knn_bank,
    params=(KNN_K,),
    needs=("features", "fit"),
    paper="Sun et al. 2022 (ICML), Out-of-Distribution Detection with Deep Nearest Neighbors",
)
def knn(state, rows, k):
    """||z - z_(k)||_2 with z = f / ||f||: the distance to the k-th nearest normalised fit feature.

    Exact search (cosine similarity = inner product of normalised vectors, so the k-th largest
    similarity is the k-th nearest neighbour): faiss's flat inner-product index when installed,
    else a float32 product per row chunk and a partition; the float32 ranks k ± 2 are then
    re-ranked by their float64 distances (float32 can swap near-tied neighbours), so the result
    is the exact float64 k-th distance.  Per split, the distance for every k the slider offers is
    found in one search and stored beside the run, so a slider move is a column read; any other k
    is one search.
    """
    feats = split_features(rows)
    fit_feats, n_fit = state["features"], len(state["inv_norm"])
    kk = int(min(max(1, round(k)), n_fit))
    table = state["memo"].get("table", feats, lambda: _knn_table(state, feats))
    col = int(np.searchsorted(table["ks"], kk))
    if col < len(table["ks"]) and table["ks"][col] == kk:  # a value the slider offers: a column read
        return np.array(table["dist"][:, col], dtype=np.float64)
    lo, hi = _window(kk, n_fit)  # any other k: one search for it
    batches = range(0, len(feats), QUERY_BATCH)
    cands = np.concatenate(
        [_knn_search(state, normalised32(feats[b : b + QUERY_BATCH]), hi)[:, lo:hi] for b in batches]
    )
    return _kth_distance(feats, fit_feats, cands, kk, n_fit)
