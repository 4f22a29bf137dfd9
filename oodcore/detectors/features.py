"""Feature + head post-hoc detectors: ReAct, DICE, GradNorm, ViM, SHE.

They read the cached penultimate features (N, D) and the final layer (W (K, D), b (K,)),
restricted to the protocol's K classes.  Fitted state (an activation percentile, mean
activations, a principal subspace, class patterns) comes from the ID fit split only and is
fitted once per run (oodcore.detectors.fitting); the state carries what scoring needs of the
head, so a new image is scored with the same state.  Big products run in
float32 BLAS over row chunks; reductions and anything that is inverted or decomposed
run in float64.  numpy only.
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.errors import MethodUnavailable
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.head import head_energy, head_logits, head_state
from oodcore.detectors.numerics import (
    chunked_percentile,
    linear_slider_values,
    logsumexp,
    map_row_chunks,
    row_chunks,
    row_logsumexp,
)
from oodcore.detectors.registry import Param, register
from oodcore.store.rundata import SplitArrays

# ----------------------------------------------------------------------------- shared helpers


def split_features(split: SplitArrays) -> np.ndarray:
    if split.features is None:
        raise MethodUnavailable("this method needs penultimate features, which this split lacks")
    return split.features


def class_sums(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-class float64 feature sums (n_classes, D), counts (n_classes,)) over rows with 0 <= label < n_classes."""
    labels = np.asarray(labels)
    d = features.shape[1]
    sums = np.zeros((n_classes, d))
    counts = np.bincount(labels[(labels >= 0) & (labels < n_classes)], minlength=n_classes)[:n_classes]
    for sl in row_chunks(len(labels), d):
        lab = labels[sl]
        keep = np.flatnonzero((lab >= 0) & (lab < n_classes))
        if len(keep) == 0:
            continue
        order = keep[np.argsort(lab[keep], kind="stable")]
        sorted_lab = lab[order]
        starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]])
        block = np.asarray(features[sl][order], dtype=np.float64)
        sums[sorted_lab[starts]] += np.add.reduceat(block, starts, axis=0)
    return sums, counts


def fit_moments(ctx: FitContext) -> dict:
    """First and second moments of the fit features, shared by ViM, Mahalanobis and relative Mahalanobis.

    mu0 (D,): mean of all (labelled) fit rows; sigma0 (D, D): their covariance (1/N);
    classes (C',): the label indices present; means (C', D); counts (C',).
    One float64 Gram pass over row chunks (centred at mu0 for accuracy).
    """
    fit = ctx.require_fit(features=True, labels=True)

    def build():
        labels = np.asarray(fit.labels)
        keep = np.flatnonzero(labels >= 0)
        feats = fit.features if len(keep) == len(labels) else fit.features[keep]
        labels = labels[keep]
        n, d = feats.shape
        k = int(labels.max()) + 1
        sums, counts = class_sums(feats, labels, k)
        mu0 = sums.sum(axis=0) / n
        gram = np.zeros((d, d))
        for sl in row_chunks(n, d):
            x = np.asarray(feats[sl], dtype=np.float64) - mu0
            gram += x.T @ x
        present = np.flatnonzero(counts > 0)
        return {
            "n": n,
            "mu0": mu0,
            "sigma0": gram / n,
            "classes": present,
            "means": sums[present] / counts[present, None],
            "counts": counts[present],
        }

    return ctx.shared("fit_moments", build)


# ----------------------------------------------------------------------------- ReAct


def react_threshold(ctx: FitContext, p: float) -> float:
    """The p-th percentile (numpy 'linear') of all fit-split activations (every unit of every row)."""
    # = float(np.percentile(features, p)) exactly, without copying the fit activations (chunked radix select)
    return float(chunked_percentile(ctx.require_fit(features=True).features, p))


def fit_react(ctx: FitContext, p: float) -> dict:
    w, b = ctx.head()
    return {"w": w, "b": b, "clip": react_threshold(ctx, p), "head": head_state(ctx)}


@register(
    "react",
    "ReAct",
    params=(
        Param(
            "p",
            "clip percentile p",
            90.0,
            50.0,
            100.0,
            "linear",
            help="activations are clipped at the p-th percentile of the ID fit-split activations; 100 = no clipping",
            fit=True,
        ),
    ),
    fit=fit_react,
    needs=("features", "head", "fit"),
    paper="Sun et al. 2021 (NeurIPS), ReAct: Out-of-distribution Detection With Rectified Activations",
)
def react(state, rows):
    """Energy of the head applied to features clipped at c: -logsumexp(min(f, c) W^T + b).

    c = the p-th percentile of the ID (fit-split) penultimate activations.  Rare, very
    large activations drive overconfident OOD logits; truncating them helps energy
    separate ID from OOD.
    """
    head = state["head"]
    return head_energy(
        split_features(rows), state["w"], state["b"], clip=state["clip"], logits=head_logits(head, rows), head=head
    )


# ----------------------------------------------------------------------------- DICE


def dice_weights(ctx: FitContext, p: float) -> np.ndarray:
    """W with every weight whose contribution W_kd · mean_fit(f_d) is not above the p-th percentile zeroed."""
    fit = ctx.require_fit(features=True)
    w, _ = ctx.head()
    mean = ctx.shared("fit_mean", lambda: _chunked_mean(fit.features))
    contrib = np.asarray(w, dtype=np.float64) * mean[None, :]
    thresh = np.percentile(contrib, p)
    return np.where(contrib > thresh, w, 0).astype(np.float32)


def fit_dice(ctx: FitContext, p: float) -> dict:
    return {"w": dice_weights(ctx, p), "b": ctx.head()[1]}


def _chunked_mean(x: np.ndarray) -> np.ndarray:
    total = np.zeros(x.shape[1])
    for sl in row_chunks(len(x), x.shape[1]):
        total += np.asarray(x[sl], dtype=np.float64).sum(axis=0)
    return total / len(x)


@register(
    "dice",
    "DICE",
    params=(
        Param(
            "p",
            "sparsity p (%)",
            90.0,
            0.0,
            99.0,
            "linear",
            help="drop the p% smallest weight contributions (keep the top 100-p%); the paper uses 90 on CIFAR, 70 on ImageNet",
            fit=True,
        ),
    ),
    fit=fit_dice,
    needs=("features", "head", "fit"),
    paper="Sun & Li 2022 (ECCV), DICE: Leveraging Sparsification for Out-of-Distribution Detection",
)
def dice(state, rows):
    """Energy through a sparsified head: -logsumexp(f (M ⊙ W)^T + b).

    M keeps weight W_kd only if its contribution W_kd · mean_fit(f_d) is above the
    p-th percentile of all K·D contributions (mean over the ID fit split): the
    noisy, rarely-used weights that inflate OOD logits are dropped.
    """
    return head_energy(split_features(rows), state["w"], state["b"])


# ----------------------------------------------------------------------------- GradNorm


@register(
    "gradnorm",
    "GradNorm",
    needs=("logits", "features"),
    paper="Huang et al. 2021 (NeurIPS), On the Importance of Gradients for Detecting Distributional Shifts in the Wild",
)
def gradnorm(state, rows):
    """-||∂ KL(u || softmax(W f + b)) / ∂W||_1 in closed form: -||softmax(z) - 1/K||_1 · ||f||_1.

    With z = W f + b and u = 1/K: KL(u || p) = -log K - (1/K) Σ_c log p_c, so
    ∂KL/∂z = p - u and ∂KL/∂W = (p - u) f^T (an outer product), whose entry-wise
    L1 norm factorises: Σ_c Σ_d |p_c - u| |f_d| = ||p - u||_1 · ||f||_1.
    (The authors' code uses all-ones targets, i.e. K times this loss: the same
    ranking.)  The gradient of a confident (ID) prediction is large, so the score
    is its negative.  p is the softmax of the cached logits (= the head on f).
    """
    feats = split_features(rows)
    logits = np.asarray(rows.logits)
    k = logits.shape[1]
    out = np.empty(len(logits))

    def chunk(sl: slice) -> None:
        z = np.array(logits[sl], dtype=np.float64)
        p = np.exp(z - row_logsumexp(z)[:, None])  # = exp(log_softmax), in this thread
        out[sl] = -np.abs(p - 1.0 / k).sum(axis=1) * np.abs(np.asarray(feats[sl], dtype=np.float64)).sum(axis=1)

    map_row_chunks(len(logits), 3 * k + feats.shape[1], chunk)
    return out


# ----------------------------------------------------------------------------- ViM


def vim_default_dim(d: int) -> int:
    """D' as in the authors' code: 1000 for D >= 1500 (e.g. 2048), 512 for D >= 768, else D/2."""
    if d >= 1500:
        return 1000
    if d >= 768:
        return 512
    return max(1, d // 2)


def vim_origin(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """u = -W^+ b, the minimum-norm point the head maps closest to all-zero logits.

    Through the smaller Gram matrix (W^+ = W^T (W W^T)^+ = (W^T W)^+ W^T), in float64: a
    linear solve when W has full row rank (checked: then W u = -b), else an eigen-
    decomposition with eigenvalues below 1e-12 of the largest treated as zero (singular
    values below 1e-6 of the largest).  The same as np.linalg.pinv for any usable head,
    and much faster than an SVD of a (1000, 2048) matrix.
    """
    w64, b64 = np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)
    wide = w64.shape[0] <= w64.shape[1]
    gram = w64 @ w64.T if wide else w64.T @ w64
    if wide:  # full row rank (every usable head): W^+ b = W^T (W W^T)^{-1} b, and W u = -b exactly
        try:
            u = -(w64.T @ np.linalg.solve(gram, b64))
            if np.all(np.isfinite(u)) and np.linalg.norm(w64 @ u + b64) <= 1e-8 * max(np.linalg.norm(b64), 1e-300):
                return u
        except np.linalg.LinAlgError:
            pass
    evals, evecs = np.linalg.eigh(gram)
    keep = evals > 1e-12 * max(float(evals[-1]), np.finfo(np.float64).tiny)
    v, lam = evecs[:, keep], evals[keep]
    if wide:
        return -(w64.T @ (v @ ((v.T @ b64) / lam)))
    return -(v @ ((v.T @ (w64.T @ b64)) / lam))


def _mean_max(logits: np.ndarray) -> float:
    """Mean over rows of the row maximum, in float64, streamed in row chunks (the max is exact in any dtype)."""
    total = 0.0
    for sl in row_chunks(len(logits), logits.shape[1], 4):
        total += float(np.asarray(logits[sl]).max(axis=1).astype(np.float64).sum())
    return total / len(logits)


def vim_basis(ctx: FitContext) -> dict:
    """Origin u = -(W^T)^+ b and the eigen-decomposition of the fit features' second moment about u."""
    fit = ctx.require_fit(features=True)
    w, b = ctx.head()

    def build():
        u = vim_origin(w, b)
        mom = fit_moments(ctx)
        delta = mom["mu0"] - u
        second = mom["sigma0"] + np.outer(delta, delta)  # (1/N) Σ (f - u)(f - u)^T, from the shared Gram
        evals, evecs = np.linalg.eigh(second)  # ascending
        return {
            "u": u,
            "evals": evals,
            "evecs": evecs,
            "mean_max_logit": _mean_max(fit.logits),
        }

    return ctx.shared("vim_basis", build)


VIM_DIM = Param(
    "dim",
    "principal dims D′ (0 = auto)",
    0.0,
    0.0,
    2048.0,
    "linear",
    help="dimension of the principal subspace; 0 = 1000 if D ≥ 1500, 512 if D ≥ 768, else D/2 (clipped to D−1)",
)


def resolve_vim_dim(d: int, dim: float) -> int:
    """The principal dimension D′ a slider value means on D features (0 = the authors' default), in [1, D - 1]."""
    want = vim_default_dim(d) if dim <= 0 else int(round(dim))
    return int(min(max(1, want), d - 1))


def _residual_cumsum(features: np.ndarray, u32: np.ndarray, basis32: np.ndarray, sl: slice) -> np.ndarray:
    """(n, D) float64: per row of `features[sl]`, the running sum of squared coordinates of f - u along the basis
    (ascending eigenvalue), so column m - 1 is the squared residual norm outside the top D - m directions."""
    coords = np.asarray((np.asarray(features[sl], dtype=np.float32) - u32) @ basis32, dtype=np.float64)
    np.square(coords, out=coords)
    return np.cumsum(coords, axis=1, out=coords)


def _residual_table(state: dict, features: np.ndarray, dims: list[int]) -> np.ndarray:
    """(N, len(dims)) float64: ||(f - u) R_{D′}|| for each D′ of `dims`, from one projection per row chunk."""
    cols = features.shape[1] - np.asarray(dims, dtype=np.int64) - 1
    out = np.empty((len(features), len(dims)))
    for sl in row_chunks(len(features), 2 * features.shape[1], 8):
        out[sl] = np.sqrt(_residual_cumsum(features, state["u32"], state["basis"], sl)[:, cols])
    return out


def vim_state(ctx: FitContext) -> dict:
    """Origin u, the full eigenbasis of the fit features' second moment about u (ascending), and for every D′ the
    mean fit residual norm (α's denominator): any principal dimension is a slice, so D′ is a scoring parameter."""
    fit = ctx.require_fit(features=True)
    basis = vim_basis(ctx)
    feats = fit.features
    n, d = feats.shape
    state = {"u32": basis["u"].astype(np.float32), "basis": np.ascontiguousarray(basis["evecs"], dtype=np.float32)}
    total = np.zeros(d)
    for sl in row_chunks(n, 2 * d, 8):
        total += np.sqrt(_residual_cumsum(feats, state["u32"], state["basis"], sl)).sum(axis=0)
    # fit_residual[m - 1]: mean residual norm when the residual keeps the m least-variance directions
    return {**state, "fit_residual": total / n, "mean_max_logit": basis["mean_max_logit"], "memo": ctx.row_memo("vim")}


def _vim_table(state: dict, feats: np.ndarray, logits: np.ndarray) -> dict:
    """Per split, once (and stored beside the run): the residual norm for every D′ the slider offers, and the
    energy logsumexp(logits).  {"dims": (m,) int64, "residual": (N, m) float64, "lse": (N,) float64}."""
    d = feats.shape[1]
    dims = sorted({resolve_vim_dim(d, v) for v in linear_slider_values(VIM_DIM)})
    return {
        "dims": np.asarray(dims, dtype=np.int64),
        "residual": _residual_table(state, feats, dims),
        "lse": logsumexp(logits),
    }


@register(
    "vim",
    "ViM",
    params=(VIM_DIM,),
    fit=vim_state,
    needs=("logits", "features", "head", "fit"),
    paper="Wang et al. 2022 (CVPR), ViM: Out-Of-Distribution with Virtual-logit Matching",
)
def vim(state, rows, dim=0.0):
    """Virtual logit minus energy: α ||(f - u) R|| - logsumexp(logits).

    u = -(W^T)^+ b; R spans the D - D' least-variance directions of the fit features
    about u (the complement of the principal subspace P); α = mean max logit /
    mean residual norm on the fit split.  This is the authors' score
    (vlogit - energy); it is log(p_0 / (1 - p_0)) for p_0 the softmax probability of
    the virtual logit among [logits, α||x^{P⊥}||], so it ranks exactly as the paper's
    "virtual-logit softmax" score.  Feature residuals no logit explains are OOD.
    The state holds the whole eigenbasis, so every D' is a slice: per split, the residual
    norm of every D' the slider offers is computed once (one projection) and stored.
    """
    feats = split_features(rows)
    d = feats.shape[1]
    d_prime = resolve_vim_dim(d, dim)
    table = state["memo"].get("table", feats, lambda: _vim_table(state, feats, rows.logits))
    col = int(np.searchsorted(table["dims"], d_prime))
    if col < len(table["dims"]) and table["dims"][col] == d_prime:
        r = np.asarray(table["residual"][:, col], dtype=np.float64)
    else:  # a D' the slider does not offer: the same computation for this one column
        r = _residual_table(state, feats, [d_prime])[:, 0]
    return vim_alpha(state, d, dim) * r - np.asarray(table["lse"], dtype=np.float64)


def vim_alpha(state: dict, d: int, dim: float = 0.0) -> float:
    """α for a principal dimension on D features: the mean max logit over the mean fit residual norm."""
    return state["mean_max_logit"] / float(state["fit_residual"][d - resolve_vim_dim(d, dim) - 1])


# ----------------------------------------------------------------------------- SHE


def she_patterns(ctx: FitContext) -> dict:
    """Stored patterns S_k = mean fit feature of the rows labelled k *and* predicted k, (K, D) float64.

    A class with no correctly classified fit row falls back to the mean of its
    labelled rows (listed in "fallback"); a class with no fit row at all gets a zero
    pattern (its score is 0).
    """
    fit = ctx.require_fit(features=True, labels=True)
    k = ctx.n_classes
    labels = np.asarray(fit.labels)
    correct = np.where(np.asarray(fit.logits).argmax(axis=1) == labels, labels, -1)
    sums, counts = class_sums(fit.features, correct, k)
    fallback = np.flatnonzero(counts == 0)
    if len(fallback):
        all_sums, all_counts = class_sums(fit.features, labels, k)
        sums[fallback], counts[fallback] = all_sums[fallback], all_counts[fallback]
    return {"patterns": sums / np.maximum(counts, 1)[:, None], "fallback": fallback}


@register(
    "she",
    "SHE",
    fit=she_patterns,
    needs=("logits", "features", "fit"),
    paper="Zhang et al. 2023 (ICLR), OOD Detection based on In-Distribution Data Patterns Memorization with Modern Hopfield Energy",
)
def she(state, rows):
    """Simplified Hopfield energy: -f · S_ŷ, S_ŷ the stored pattern of the predicted class ŷ.

    Patterns are the mean features of the correctly classified fit rows per class;
    an ID feature aligns with its class's memorised pattern (large inner product),
    an OOD feature does not.
    """
    patterns = state["patterns"]
    feats = split_features(rows)
    preds = np.asarray(rows.logits).argmax(axis=1)
    out = np.empty(len(feats))

    def chunk(sl: slice) -> None:
        out[sl] = -np.einsum("ij,ij->i", np.asarray(feats[sl], dtype=np.float64), patterns[preds[sl]])

    map_row_chunks(len(feats), 2 * feats.shape[1], chunk)
    return out
