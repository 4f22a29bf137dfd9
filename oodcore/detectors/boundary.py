"""Class-geometry detectors on the pooled features and the final layer: NCI, fDBD, CARef.

Each compares a feature with what the head and the ID fit split say about its predicted class ŷ
(the argmax of the cached logits, i.e. of the head on the feature): its weight direction (NCI),
its decision boundaries (fDBD), its mean fit feature (CARef).  All three use the penultimate
(pooled) features, as the papers do.  Fitted state (a fit-feature mean, class means, the
pairwise weight distances) comes from the ID fit split and the head only, once per run.
numpy only.
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import _chunked_mean, class_sums, split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import map_row_chunks
from oodcore.detectors.registry import Param, register
from oodcore.store.rundata import SplitArrays


def _preds(rows: SplitArrays) -> np.ndarray:
    return np.asarray(rows.logits).argmax(axis=1)


def fit_mean(ctx: FitContext) -> np.ndarray:
    """μ: the mean fit feature (float64), shared with DICE's mean activation."""
    fit = ctx.require_fit(features=True)
    return ctx.shared("fit_mean", lambda: _chunked_mean(fit.features))


# ----------------------------------------------------------------------------- NCI


def fit_nci(ctx: FitContext) -> dict:
    w, _ = ctx.head()
    return {"mu": fit_mean(ctx), "w": np.asarray(w, dtype=np.float64)}


@register(
    "nci",
    "NCI",
    fit=fit_nci,
    params=(
        Param(
            "alpha",
            "feature-norm weight α",
            0.0,
            0.0,
            0.1,
            "linear",
            help="weight of the L1 feature norm added to the class-alignment term (tuned per model in the paper; 0 = alignment only, pytorch-ood's default)",
        ),
    ),
    needs=("logits", "features", "head", "fit"),
    paper="Liu & Qin 2025 (CVPR), Detecting Out-of-Distribution Through the Lens of Neural Collapse",
)
def nci(state, rows, alpha):
    """-[(f - μ) · w_ŷ / ||f - μ||₂ + α ||f||₁]: alignment of the centred feature with its predicted class's weights.

    μ is the mean fit feature.  Under neural collapse ID features (centred) point along their
    class's weight vector and have large norms; OOD features neither.  The alignment term is the
    projection on w_ŷ as the authors' and pytorch-ood's code compute it (w_ŷ not normalised).
    """
    feats = split_features(rows)
    preds = _preds(rows)
    out = np.empty(len(feats))

    def chunk(sl: slice) -> None:
        f = np.asarray(feats[sl], dtype=np.float64)
        z = f - state["mu"]
        proj = np.einsum("ij,ij->i", z, state["w"][preds[sl]]) / np.maximum(np.linalg.norm(z, axis=1), 1e-12)
        out[sl] = -proj - float(alpha) * np.abs(f).sum(axis=1)

    map_row_chunks(len(feats), 3 * feats.shape[1], chunk)
    return out


# ----------------------------------------------------------------------------- fDBD


def fit_fdbd(ctx: FitContext) -> dict:
    """μ (mean fit feature) and ||w_i - w_j|| for every class pair (K, K), diagonal 1, in float64."""
    w, _ = ctx.head()
    w64 = np.asarray(w, dtype=np.float64)
    sq = np.einsum("ij,ij->i", w64, w64)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (w64 @ w64.T), 0.0))
    np.fill_diagonal(dist, 1.0)
    tiny = dist <= 1e-12 * max(float(dist.max()), 1e-300)
    dist[tiny] = np.inf  # two identical class weight vectors: no boundary between them (the term is 0)
    return {"mu": fit_mean(ctx), "pair_dist": dist}


@register(
    "fdbd",
    "fDBD",
    fit=fit_fdbd,
    needs=("logits", "features", "head", "fit"),
    paper="Liu & Qin 2024 (ICML), Fast Decision Boundary based Out-of-Distribution Detector",
)
def fdbd(state, rows):
    """-mean_{c≠ŷ} |l_ŷ - l_c| / ||w_ŷ - w_c|| / ||f - μ||: distance to the decision boundaries, normalised.

    |l_ŷ - l_c| / ||w_ŷ - w_c|| is the closed-form distance of the feature to the boundary between
    ŷ and c (l = the cached logits = the head on f); dividing by the distance to the mean fit
    feature μ removes the feature norm's effect.  ID features sit far from the boundaries.
    """
    feats = split_features(rows)
    logits = np.asarray(rows.logits)
    preds = _preds(rows)
    k = logits.shape[1]
    out = np.empty(len(feats))

    def chunk(sl: slice) -> None:
        lg = np.asarray(logits[sl], dtype=np.float64)
        gap = np.abs(lg - lg[np.arange(len(lg)), preds[sl]][:, None])
        boundary = (gap / state["pair_dist"][preds[sl]]).sum(axis=1) / max(k - 1, 1)
        dist = np.maximum(np.linalg.norm(np.asarray(feats[sl], dtype=np.float64) - state["mu"], axis=1), 1e-8)
        out[sl] = -boundary / dist

    map_row_chunks(len(feats), 3 * max(k, feats.shape[1]), chunk)
    return out


# ----------------------------------------------------------------------------- CARef


def fit_caref(ctx: FitContext) -> dict:
    """Class means of the fit features grouped by *predicted* class (the authors' code), (K, D) float64.

    A class no fit row is predicted as falls back to the mean of its labelled fit rows, and a
    class without either to the overall fit mean (listed in "fallback").
    """
    fit = ctx.require_fit(features=True)
    k = ctx.n_classes
    sums, counts = class_sums(fit.features, np.asarray(fit.logits).argmax(axis=1), k)
    fallback = np.flatnonzero(counts == 0)
    if len(fallback):
        lab_sums, lab_counts = class_sums(fit.features, np.asarray(fit.labels), k)
        has = fallback[lab_counts[fallback] > 0]
        sums[has], counts[has] = lab_sums[has], lab_counts[has]
    means = sums / np.maximum(counts, 1)[:, None]
    empty = np.flatnonzero(counts == 0)
    means[empty] = fit_mean(ctx)
    return {"means": means, "fallback": fallback}


@register(
    "caref",
    "CARef",
    fit=fit_caref,
    needs=("logits", "features", "fit"),
    paper="Ling et al. 2025 (CVPR), CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative Feature Leveraging",
)
def caref(state, rows):
    """||f - m_ŷ||₁ / ||f||₁: the relative L1 error of the feature against its predicted class's mean fit feature.

    The class-aware relative feature error of CADRef (its CARef variant, without the decoupled
    energy terms), on the pooled features.  ID features are close to their class's mean.
    """
    feats = split_features(rows)
    preds = _preds(rows)
    out = np.empty(len(feats))

    def chunk(sl: slice) -> None:
        f = np.asarray(feats[sl], dtype=np.float64)
        out[sl] = np.abs(f - state["means"][preds[sl]]).sum(axis=1) / np.maximum(np.abs(f).sum(axis=1), 1e-12)

    map_row_chunks(len(feats), 2 * feats.shape[1], chunk)
    return out
