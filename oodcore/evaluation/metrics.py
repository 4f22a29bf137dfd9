"""OOD-detection metrics: exact, vectorised, and checked against scikit-learn.

Conventions: OOD is the positive class and a higher score means more OOD.

Every metric is computed by one core, :func:`weighted_metrics`, from per-sample
weights over the pooled scores sorted once (descending).  The point estimate
uses unit weights; each bootstrap replicate is just another row of integer
(multinomial) count weights.  So the bootstrap needs no re-sorting, and its
per-replicate numbers equal scikit-learn on the explicitly resampled arrays.  The
bootstrap computes the core's numbers without forming the B x N weights
(`oodcore.evaluation.replicates`: one chunked pass down the ID tie groups).

Tie handling matches scikit-learn: thresholds are the distinct scores, samples
sharing a score enter the curves together (one "tie group"), which makes AUROC
the Mann-Whitney statistic with ties counted 1/2.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from oodcore.evaluation.replicates import replicate_metrics
from oodcore.evaluation.resample import TPR_LEVEL, bootstrap_indices, bootstrap_weights, first_true

__all__ = [
    "METRIC_NAMES",
    "METRIC_LABELS",
    "METRIC_DESCRIPTIONS",
    "LOWER_IS_BETTER",
    "PooledSort",
    "sort_pooled",
    "weighted_metrics",
    "compute_metrics",
    "bootstrap_indices",
    "bootstrap_weights",
    "bootstrap_replicates",
    "bootstrap_ci",
    "evaluate",
    "roc_points",
    "pr_points",
    "threshold_at_tpr",
]

METRIC_NAMES = ("auroc", "aupr_out", "aupr_in", "fpr95", "fpr95_in")

METRIC_LABELS = {
    "auroc": "AUROC",
    "aupr_out": "AUPR-Out",
    "aupr_in": "AUPR-In",
    "fpr95": "FPR@95 (OOD+)",
    "fpr95_in": "FPR@95 (ID+)",
}

METRIC_DESCRIPTIONS = {
    "auroc": "Area under the ROC curve (OOD positive); threshold-free, 0.5 is chance.",
    "aupr_out": "Average precision with OOD as the positive class.",
    "aupr_in": "Average precision with ID as the positive class (score negated).",
    "fpr95": "ID false-positive rate when 95% of OOD are caught (OOD positive, as in Hendrycks et al.).",
    "fpr95_in": "OOD acceptance rate when 95% of ID are kept (ID positive).",
}

LOWER_IS_BETTER = {"fpr95", "fpr95_in"}


# --------------------------------------------------------------------------- input


def _as_scores(x, name: str) -> np.ndarray:
    """Float64 1-D copy of one score array; reject what would silently corrupt ranks."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: need at least one score per class")
    finite = np.isfinite(a)
    if not finite.all():
        n_nan = int(np.isnan(a).sum())
        n_pinf = int(np.isposinf(a).sum())
        n_ninf = int(np.isneginf(a).sum())
        raise ValueError(
            f"{name} has {a.size - int(finite.sum())} non-finite of {a.size} scores "
            f"({n_nan} NaN, {n_pinf} +inf, {n_ninf} -inf); scores must be finite"
        )
    return a


class PooledSort(NamedTuple):
    """ID and OOD scores pooled and sorted once (descending), reused by every replicate.

    ``scores``/``is_ood`` are in sorted order; ``pos_id[i]``/``pos_ood[j]`` give where
    original ID sample i / OOD sample j landed; ``group_ends`` are the sorted indices
    where a tie group (run of equal scores) ends, i.e. one per distinct threshold;
    ``id_groups``/``ood_groups`` list the tie groups holding any ID / OOD sample.
    """

    scores: np.ndarray
    is_ood: np.ndarray
    pos_id: np.ndarray
    pos_ood: np.ndarray
    group_ends: np.ndarray
    id_groups: np.ndarray
    ood_groups: np.ndarray

    @property
    def thresholds(self) -> np.ndarray:
        """Distinct scores, descending: the threshold of each tie group."""
        return self.scores[self.group_ends]

    def scatter(self, w_id, w_ood) -> tuple[np.ndarray, np.ndarray]:
        """Place per-class weights (B x n_id, B x n_ood, original order) into the sorted
        B x N layout :func:`weighted_metrics` takes, zero on the other class's columns."""
        w_id = np.atleast_2d(np.asarray(w_id, dtype=np.float64))
        w_ood = np.atleast_2d(np.asarray(w_ood, dtype=np.float64))
        n = self.scores.size
        out_id = np.zeros((w_id.shape[0], n))
        out_ood = np.zeros((w_ood.shape[0], n))
        out_id[:, self.pos_id] = w_id
        out_ood[:, self.pos_ood] = w_ood
        return out_id, out_ood


def _distinct_sorted(x: np.ndarray) -> np.ndarray:
    """np.unique of an already non-decreasing array, without its sort (or hashing)."""
    if x.size == 0:
        return x
    keep = np.empty(x.size, dtype=bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def sort_pooled(scores_id, scores_ood) -> PooledSort:
    """Validate, pool and sort the scores once (descending, stable)."""
    s_id = _as_scores(scores_id, "scores_id")
    s_ood = _as_scores(scores_ood, "scores_ood")
    pooled = np.concatenate([s_id, s_ood])
    is_ood = np.zeros(pooled.size, dtype=bool)
    is_ood[s_id.size :] = True
    order = np.argsort(-pooled, kind="stable")
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    s = pooled[order]
    starts = s[1:] != s[:-1]
    group_ends = np.append(np.flatnonzero(starts), s.size - 1)
    group_of = np.concatenate([[0], np.cumsum(starts)])  # tie group of each sorted sample
    is_ood_sorted = is_ood[order]
    return PooledSort(
        scores=s,
        is_ood=is_ood_sorted,
        pos_id=inv[: s_id.size],
        pos_ood=inv[s_id.size :],
        group_ends=group_ends,
        id_groups=_distinct_sorted(group_of[~is_ood_sorted]),
        ood_groups=_distinct_sorted(group_of[is_ood_sorted]),
    )


# ---------------------------------------------------------------------------- core


def weighted_metrics(group_ends, w_id, w_ood, id_groups=None, ood_groups=None) -> dict[str, np.ndarray]:
    """All five metrics for B weightings of one sorted pool, as arrays of shape (B,).

    ``w_id``/``w_ood`` are B x N non-negative weights in the pooled *descending* sort
    order (see :func:`sort_pooled` / :meth:`PooledSort.scatter`), zero on the other
    class's columns; ``group_ends`` marks the tie groups.  This is the single code
    path behind both the point estimate (unit weights) and the bootstrap (count
    weights), so checking it against scikit-learn with ``sample_weight`` checks both.
    ``id_groups``/``ood_groups`` (tie groups that can hold ID / OOD weight) are only a
    speed hint; when omitted they are read off the weights.
    """
    w_id = np.atleast_2d(np.asarray(w_id, dtype=np.float64))
    w_ood = np.atleast_2d(np.asarray(w_ood, dtype=np.float64))
    if w_id.shape != w_ood.shape or w_id.ndim != 2:
        raise ValueError(f"w_id and w_ood must both be B x N, got {w_id.shape} and {w_ood.shape}")
    for name, w in (("w_id", w_id), ("w_ood", w_ood)):
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"{name} must be finite and non-negative")
    return _weighted_metrics(np.asarray(group_ends), w_id, w_ood, id_groups, ood_groups)


def _weighted_metrics(group_ends, w_id, w_ood, id_groups=None, ood_groups=None) -> dict[str, np.ndarray]:
    """:func:`weighted_metrics` without input checks (callers that build the weights)."""
    return _metrics_from_prefix(_prefix_sums(w_id, group_ends), _prefix_sums(w_ood, group_ends), id_groups, ood_groups)


def _prefix_sums(w: np.ndarray, group_ends: np.ndarray) -> np.ndarray:
    """B x (G+1) cumulative weights: column 0 is 0, column g+1 is the weight with score
    >= the g-th distinct score.  The leading zero makes "before group g" (c[:, :-1])
    and "through group g" (c[:, 1:]) plain views instead of shifted copies."""
    b, n = w.shape
    c = np.empty((b, n + 1))
    c[:, 0] = 0.0
    np.cumsum(w, axis=1, out=c[:, 1:])
    if group_ends.size != n:  # ties: keep one column per tie group
        c = c[:, np.concatenate([[0], group_ends + 1])]
    return c


def _groups_with_weight(c: np.ndarray) -> np.ndarray:
    """Tie groups where some row's cumulative weight steps up."""
    return np.flatnonzero((c[:, 1:] > c[:, :-1]).any(axis=0))


def _metrics_from_prefix(c_id: np.ndarray, c_ood: np.ndarray, id_groups=None, ood_groups=None) -> dict[str, np.ndarray]:
    """The five metrics from prefix sums of class weights over tie groups (see _prefix_sums).

    Arithmetic follows scikit-learn's curves (tpr = tps / tps[-1], precision =
    tps / (tps + fps)) so integer weights reproduce its numbers, fpr95 bit-for-bit.

    Speed: OOD-positive quantities only change at groups holding OOD weight and
    ID-positive ones only at groups holding ID weight, so each side may run on its own
    column subset.  That is exact (skipped columns add zero to the sums and cannot be
    the first 95% crossing); a side covering most columns uses all of them as views
    instead of gathering.  With 50k ID / 2k OOD the OOD side is tiny.
    """
    b, g = c_id.shape[0], c_id.shape[1] - 1
    t_id = c_id[:, -1]
    t_ood = c_ood[:, -1]
    if np.any(t_id <= 0) or np.any(t_ood <= 0):
        raise ValueError("every weighting needs positive total weight on both ID and OOD")
    rows = np.arange(b)
    if ood_groups is None:
        ood_groups = _groups_with_weight(c_ood)
    if id_groups is None:
        id_groups = _groups_with_weight(c_id)

    def sel(c, cols):
        """(weight before, weight through) each of ``cols`` tie groups, B x len(cols)."""
        if 2 * len(cols) > g:
            return c[:, :-1], c[:, 1:]
        cols = np.asarray(cols)
        return c[:, cols], c[:, cols + 1]

    # ---- OOD side (OOD positive, higher score = more OOD) ------------------------
    co_before, co = sel(c_ood, ood_groups)
    ci_before, ci = sel(c_id, ood_groups)
    out = _ood_side(co_before, co, ci_before, ci, t_id, t_ood)

    # ---- ID side (ID positive, score negated) -------------------------------------
    # Thresholds ascend, so "called ID at group g" means score <= u_g: everything
    # except the groups before g.
    ci_before, ci = sel(c_id, id_groups)
    co_before, _ = sel(c_ood, id_groups)
    d_id = ci - ci_before
    id_le = t_id[:, None] - ci_before
    ood_le = t_ood[:, None] - co_before
    # FPR@95 (ID+): scanning from the lowest score up, the first group whose ID recall
    # reaches 0.95 is the *last* such column in descending order (id_le falls along a row,
    # so the columns meeting it are a prefix: the last one is found by binary search).
    n_cols = id_le.shape[1]
    k95_in = n_cols - 1 - first_true(lambda r, j: id_le[r, n_cols - 1 - j] / t_id[r] >= TPR_LEVEL, b, n_cols)
    fpr95_in = ood_le[rows, k95_in] / t_ood
    tot_le = np.add(ood_le, id_le, out=ood_le)
    # id_le <= tot_le, so where tot_le == 0 id_le is 0 too and is left as precision 0.
    prec_in = np.divide(id_le, tot_le, out=id_le, where=tot_le > 0)
    aupr_in = np.multiply(d_id, prec_in, out=d_id).sum(axis=1) / t_id

    out["aupr_in"] = aupr_in
    out["fpr95_in"] = fpr95_in
    return out


def _ood_side(co_before, co, ci_before, ci, t_id, t_ood) -> dict[str, np.ndarray]:
    """AUROC, AUPR-Out and FPR@95 (OOD positive) from the class weights before / through each OOD-holding
    tie group (B x K each; the bootstrap's replicate path passes the same quantities, `replicates`)."""
    b = co.shape[0]
    d_ood = co - co_before
    # AUROC = P(s_ood > s_id) + 1/2 P(tie): per unit of OOD weight, the ID weight strictly
    # below plus half the tied ID, i.e. t_id - (ci_before + ci) / 2.  This equals the
    # trapezoid over tie-group ROC points; kept in counts so integer weights are exact.
    auroc = (d_ood * (2.0 * t_id[:, None] - ci_before - ci)).sum(axis=1) / (2.0 * t_id * t_ood)
    # AP (OOD+): sum over thresholds of recall step x precision there.
    tot = co + ci
    prec = np.divide(co, tot, out=np.zeros_like(tot), where=tot > 0)
    aupr_out = (d_ood * prec).sum(axis=1) / t_ood
    # FPR@95 (OOD+): first threshold from the top with tpr >= 0.95.
    k95 = first_true(lambda r, j: co[r, j] / t_ood[r] >= TPR_LEVEL, b, co.shape[1])
    fpr95 = ci[np.arange(b), k95] / t_id
    return {"auroc": auroc, "aupr_out": aupr_out, "fpr95": fpr95}


def compute_metrics(scores_id, scores_ood, pooled: PooledSort | None = None) -> dict[str, float]:
    """Point estimates of the five metrics (fractions), via the weighted core with unit weights."""
    ps = pooled if pooled is not None else sort_pooled(scores_id, scores_ood)
    w_ood = ps.is_ood.astype(np.float64)
    w_id = 1.0 - w_ood
    m = _weighted_metrics(ps.group_ends, w_id[None, :], w_ood[None, :], ps.id_groups, ps.ood_groups)
    return {k: float(m[k][0]) for k in METRIC_NAMES}


# ----------------------------------------------------------------------- bootstrap


def bootstrap_replicates(
    scores_id, scores_ood, n_boot: int = 200, seed: int = 0, pooled: PooledSort | None = None
) -> dict[str, np.ndarray]:
    """Per-replicate metrics (arrays of length n_boot) of the stratified bootstrap.

    ID and OOD are resampled separately (class sizes fixed) with the draws of
    :func:`bootstrap_indices`.  Each replicate is a row of count weights (drawn once per class
    sizes and shared by every score vector, see `_bootstrap_counts`), placed straight into the
    pooled sort order (= :func:`bootstrap_weights` scattered): no replicate re-sorts, and
    `pooled` (the scores' PooledSort, e.g. from the point estimate) is sorted once.  The
    replicates' metrics are the core's (:func:`weighted_metrics` on those weights), computed
    down the ID tie groups in cache-sized chunks, replicate blocks side by side on the cores
    (`oodcore.evaluation.replicates`): memory stays at a few MB besides the shared counts.
    """
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    ps = pooled if pooled is not None else sort_pooled(scores_id, scores_ood)
    reps = replicate_metrics(ps, n_boot, seed, _ood_side)
    return {k: reps[k] for k in METRIC_NAMES}


def bootstrap_ci(
    scores_id, scores_ood, n_boot: int = 200, seed: int = 0, alpha: float = 0.05, pooled: PooledSort | None = None
) -> dict[str, tuple[float, float]]:
    """Seeded stratified percentile-bootstrap (1 - alpha) intervals for all five metrics."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    reps = bootstrap_replicates(scores_id, scores_ood, n_boot=n_boot, seed=seed, pooled=pooled)
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    out = {}
    for k in METRIC_NAMES:
        lo, hi = np.percentile(reps[k], q)
        out[k] = (float(lo), float(hi))
    return out


def evaluate(scores_id, scores_ood, n_boot: int = 200, seed: int = 0) -> dict:
    """Metrics plus ``"ci"``: {name: [lo, hi]} (JSON-able); ``n_boot=0`` gives ``"ci": {}``.

    One sort of the pooled scores serves the point estimate and every bootstrap replicate.
    """
    ps = sort_pooled(scores_id, scores_ood)
    res: dict = compute_metrics(scores_id, scores_ood, pooled=ps)
    if int(n_boot) > 0:
        ci = bootstrap_ci(scores_id, scores_ood, n_boot=n_boot, seed=seed, pooled=ps)
        res["ci"] = {k: [lo, hi] for k, (lo, hi) in ci.items()}
    else:
        res["ci"] = {}
    return res


# -------------------------------------------------------------------------- curves


def _curve_counts(pos, neg):
    """Cumulative (pos, neg) counts with score >= each distinct score, plus thresholds."""
    ps = sort_pooled(neg, pos)  # OOD slot = positive class
    c_pos = np.cumsum(ps.is_ood)[ps.group_ends].astype(np.float64)
    c_neg = (ps.group_ends + 1) - c_pos
    return c_pos, c_neg, ps.thresholds


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int, must=()) -> np.ndarray:
    """Indices of at most max_points curve points, evenly spaced in path length.

    Keeps first, last and ``must`` indices and returns them sorted, so the subset keeps
    the curve's order (a faithful, monotone subset of the exact curve).  Jagged stretches
    (e.g. PR precision at low recall) swallow several path-length targets into one
    point, so the number of targets is raised (binary search) to use the whole budget.
    """
    n = x.size
    if n <= max_points:
        return np.arange(n)
    must = np.unique(np.asarray(must, dtype=np.int64))
    path = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])

    def pick(k: int) -> np.ndarray:
        idx = np.searchsorted(path, np.linspace(0.0, path[-1], k), side="left")
        return np.unique(np.concatenate([[0, n - 1], np.minimum(idx, n - 1), must]))

    lo = max(2, max_points - 2 - must.size)  # pick(lo) has <= max_points indices
    best, hi = pick(lo), n  # pick(k) grows (nearly) with k: search the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = pick(mid)
        if cand.size <= max_points:
            best, lo = cand, mid
        else:
            hi = mid - 1
    return best


def _check_max_points(max_points: int) -> int:
    max_points = int(max_points)
    if max_points < 3:
        raise ValueError(f"max_points must be >= 3 (two endpoints and the 95% point), got {max_points}")
    return max_points


def roc_points(scores_id, scores_ood, max_points: int = 400) -> dict[str, np.ndarray]:
    """ROC curve (OOD positive) for plotting: ``fpr``, ``tpr``, ``threshold``.

    Point i flags ``score >= threshold[i]``; the first point is (0, 0) at +inf and the
    last is (1, 1).  Downsampled to at most ``max_points`` along path length, always
    keeping the point where tpr first reaches 0.95 (the fpr95 operating point).
    """
    max_points = _check_max_points(max_points)
    c_ood, c_id, thr = _curve_counts(scores_ood, scores_id)
    fpr = np.concatenate([[0.0], c_id / c_id[-1]])
    tpr = np.concatenate([[0.0], c_ood / c_ood[-1]])
    threshold = np.concatenate([[np.inf], thr])
    k95 = int(np.searchsorted(tpr, TPR_LEVEL, side="left"))
    keep = _downsample(fpr, tpr, max_points, must=[k95])
    return {"fpr": fpr[keep], "tpr": tpr[keep], "threshold": threshold[keep]}


def pr_points(scores_id, scores_ood, max_points: int = 400, positive: str = "ood") -> dict[str, np.ndarray]:
    """Precision-recall curve for plotting: ``recall``, ``precision``, ``threshold``.

    ``positive="ood"``: point i flags ``score >= threshold[i]`` as OOD.
    ``positive="id"``: the score is negated and labels swapped (the AUPR-In curve);
    ``threshold`` stays in original score units and point i calls ``score <= threshold[i]`` ID.
    Points run from recall 0 (precision 1, sklearn's convention; threshold +inf / -inf)
    to recall 1, downsampled to at most ``max_points`` along path length.
    """
    max_points = _check_max_points(max_points)
    if positive == "ood":
        c_pos, c_neg, thr = _curve_counts(scores_ood, scores_id)
        sign = 1.0
    elif positive == "id":
        s_id = _as_scores(scores_id, "scores_id")
        s_ood = _as_scores(scores_ood, "scores_ood")
        c_pos, c_neg, thr = _curve_counts(-s_id, -s_ood)
        sign = -1.0
    else:
        raise ValueError(f"positive must be 'ood' or 'id', got {positive!r}")
    recall = np.concatenate([[0.0], c_pos / c_pos[-1]])
    precision = np.concatenate([[1.0], c_pos / (c_pos + c_neg)])
    threshold = sign * np.concatenate([[np.inf], thr])
    keep = _downsample(recall, precision, max_points)
    return {"recall": recall[keep], "precision": precision[keep], "threshold": threshold[keep]}


def threshold_at_tpr(scores_id, scores_ood, tpr: float = 0.95) -> float:
    """Score threshold t such that flagging ``score >= t`` catches >= ``tpr`` of OOD.

    It is the highest distinct score reaching that rate, i.e. the operating point of
    fpr95 (for tpr=0.95): the fraction of ID with ``score >= t`` equals fpr95.  Used to
    draw the 95%-TPR line and to decide whether one new image crosses it.
    """
    tpr = float(tpr)
    if not 0.0 <= tpr <= 1.0:
        raise ValueError(f"tpr must be in [0, 1], got {tpr}")
    c_ood, _, thr = _curve_counts(scores_ood, scores_id)
    rate = np.concatenate([[0.0], c_ood / c_ood[-1]])
    k = int(np.searchsorted(rate, tpr, side="left"))
    return float(np.concatenate([[np.inf], thr])[k])
