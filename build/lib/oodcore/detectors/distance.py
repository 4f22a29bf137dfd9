"""Fitted-distance detectors on the penultimate features: Mahalanobis, relative Mahalanobis, KNN.

Everything is fitted on the ID fit split only, once per run (oodcore.detectors.fitting).  Covariances are accumulated and eigen-decomposed in
float64 (one shared Gram pass, see `methods_features.fit_moments`); the inverse is
a pseudo-inverse with a small ridge; no per-class covariance and no (N, K, D)
tensor is ever formed: a squared distance to every class mean is
||y||^2 - 2 y·m_k + ||m_k||^2 in whitened coordinates, one matrix product per row chunk.
numpy only.
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import fit_moments, split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import row_chunks
from oodcore.detectors.registry import Param, register

RIDGE = 1e-10  # relative to the largest eigenvalue


def whitener(cov: np.ndarray) -> np.ndarray:
    """L (D, r) with L L^T = Σ^+ (ridged pseudo-inverse), so (x - μ)^T Σ^+ (x - μ) = ||(x - μ) L||^2.

    Σ = V Λ V^T (float64 eigh); with ε = RIDGE · λ_max, directions with λ <= ε are a
    null-space (no fit variance: dropped, as a pseudo-inverse does) and the others
    are weighted 1 / (λ + ε).
    """
    cov = (np.asarray(cov, dtype=np.float64) + np.asarray(cov, dtype=np.float64).T) / 2
    evals, evecs = np.linalg.eigh(cov)
    eps = RIDGE * max(float(evals[-1]), np.finfo(np.float64).tiny)
    keep = evals > eps
    return evecs[:, keep] / np.sqrt(evals[keep] + eps)


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
        return {"mu0": mom["mu0"], "L": lw, "means_w": means_w, "classes": mom["classes"]}

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
    norms and the combination ||y||^2 - 2 y·m_k + ||m_k||^2 in float64.
    """
    mu0 = state["mu0"].astype(np.float32)
    lw = state["L"].astype(np.float32)
    means_t = np.ascontiguousarray(state["means_w"].T.astype(np.float32))
    m_sq = np.einsum("ij,ij->i", state["means_w"], state["means_w"])
    out = np.empty(len(features))
    for sl in row_chunks(len(features), features.shape[1] + lw.shape[1] + 2 * means_t.shape[1], 8):
        y = (np.asarray(features[sl], dtype=np.float32) - mu0) @ lw
        y_sq = np.einsum("ij,ij->i", y, y, dtype=np.float64)
        md = y_sq[:, None] - 2.0 * (y @ means_t).astype(np.float64) + m_sq[None, :]
        out[sl] = np.maximum(md.min(axis=1), 0.0)
    return out


def _background_distance(features: np.ndarray, background: dict) -> np.ndarray:
    """(f - μ_0)^T Σ_0^+ (f - μ_0) per row, the same way."""
    mu0 = background["mu0"].astype(np.float32)
    l0 = background["L"].astype(np.float32)
    out = np.empty(len(features))
    for sl in row_chunks(len(features), features.shape[1] + l0.shape[1], 4):
        y0 = (np.asarray(features[sl], dtype=np.float32) - mu0) @ l0
        out[sl] = np.einsum("ij,ij->i", y0, y0, dtype=np.float64)
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
    return _class_min(split_features(rows), state)


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
    return _class_min(feats, state["class"]) - _background_distance(feats, state["background"])


# ----------------------------------------------------------------------------- KNN


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_bank(ctx: FitContext) -> dict:
    """The fit features and 1 / ||f|| of every fit row (N_fit,), float32: the fit rows are normalised on the fly.

    Keeping only the inverse norms (not a normalised copy of the fit features) saves
    N_fit x D x 4 bytes (400 MB for 50k x 2048).
    """
    fit = ctx.require_fit(features=True)
    inv = np.empty(len(fit.features), dtype=np.float64)
    for sl in row_chunks(len(inv), fit.features.shape[1]):
        inv[sl] = 1.0 / np.maximum(np.linalg.norm(np.asarray(fit.features[sl], dtype=np.float64), axis=1), 1e-12)
    return {"features": fit.features, "inv_norm": inv.astype(np.float32)}


@register(
    "knn",
    "KNN",
    fit=knn_bank,
    params=(
        Param(
            "k",
            "neighbour k",
            50.0,
            1.0,
            1000.0,
            "log",
            help="distance to the k-th nearest normalised fit feature (clipped to the fit size); the paper uses 1000 with all of ImageNet train, 50 on CIFAR",
        ),
    ),
    needs=("features", "fit"),
    paper="Sun et al. 2022 (ICML), Out-of-Distribution Detection with Deep Nearest Neighbors",
)
def knn(state, rows, k):
    """||z - z_(k)||_2 with z = f / ||f||: the distance to the k-th nearest normalised fit feature.

    Exact brute force: per row chunk, cosine similarities to every fit row by one
    float32 product (scaled by the fit rows' inverse norms), the k-th largest by
    np.partition (= the k-th nearest, since ||a - b||^2 = 2 - 2 a·b on the unit sphere),
    then that neighbour's distance recomputed in float64.  Memory is bounded by the
    chunk size (about 64 MB of similarities at a time) plus N_fit floats.
    """
    inv_norm = state["inv_norm"]
    fit_feats = state["features"]
    feats = split_features(rows)
    n_fit = len(inv_norm)
    kk = int(min(max(1, round(k)), n_fit))
    col = n_fit - kk  # after a partition, column n_fit - k holds the k-th largest similarity
    out = np.empty(len(feats))
    for sl in row_chunks(len(feats), n_fit + feats.shape[1], 4):
        q = _normalise(feats[sl])
        sims = q.astype(np.float32) @ fit_feats.T
        sims *= inv_norm
        kth = np.partition(sims, col, axis=1)[:, col]  # ~10x faster than np.argpartition here
        idx = (sims == kth[:, None]).argmax(axis=1)  # the neighbour holding it
        diff = q - _normalise(fit_feats[idx])  # exact float64 distance to the selected neighbour
        out[sl] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out
