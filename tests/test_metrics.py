"""oodcore.evaluation.metrics against scikit-learn: point metrics, weighted core, bootstrap, curves.

scikit-learn is the reference because it is what readers of the numbers will compare
against; exactness (not just closeness) matters for fpr95, which is a step function.
"""

import json

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from oodcore.evaluation import metrics as M
from oodcore.evaluation import replicates
from oodcore.evaluation.metrics import (
    LOWER_IS_BETTER,
    METRIC_LABELS,
    METRIC_NAMES,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_replicates,
    bootstrap_weights,
    compute_metrics,
    evaluate,
    pr_points,
    roc_points,
    sort_pooled,
    threshold_at_tpr,
    weighted_metrics,
)

TOL = dict(rel=1e-12, abs=1e-12)


def sklearn_metrics(s_id, s_ood, w_id=None, w_ood=None):
    """The reference definitions, spelled out with scikit-learn."""
    s_id, s_ood = np.asarray(s_id, float), np.asarray(s_ood, float)
    s = np.concatenate([s_id, s_ood])
    y = np.concatenate([np.zeros(s_id.size), np.ones(s_ood.size)])
    w = None if w_id is None else np.concatenate([w_id, w_ood]).astype(float)
    fpr, tpr, _ = roc_curve(y, s, sample_weight=w, drop_intermediate=False)
    fpr_in, tpr_in, _ = roc_curve(1 - y, -s, sample_weight=w, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s, sample_weight=w),
        "aupr_out": average_precision_score(y, s, sample_weight=w),
        "aupr_in": average_precision_score(1 - y, -s, sample_weight=w),
        "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")],
        "fpr95_in": fpr_in[np.searchsorted(tpr_in, 0.95, side="left")],
    }


def assert_matches(got, ref):
    for k in METRIC_NAMES:
        if k.startswith("fpr"):
            assert got[k] == ref[k], k  # same integer counts, same division: bit-exact
        else:
            assert got[k] == pytest.approx(ref[k], **TOL), k


def _cases():
    rng = np.random.default_rng(12345)
    out = []
    for i in range(30):
        n_id, n_ood = rng.integers(1, 80, size=2)
        s_id = rng.normal(0.0, 1.0, n_id)
        s_ood = rng.normal(rng.uniform(-1.5, 2.5), rng.uniform(0.3, 2.0), n_ood)
        kind = ("continuous", "round1", "int3")[i % 3]
        if kind == "round1":  # heavy ties, also across classes
            s_id, s_ood = np.round(s_id, 1), np.round(s_ood, 1)
        elif kind == "int3":  # only three distinct values
            s_id = rng.integers(0, 3, n_id).astype(float)
            s_ood = rng.integers(0, 3, n_ood).astype(float)
        out.append(pytest.param(s_id, s_ood, id=f"{kind}-{i}-{n_id}x{n_ood}"))
    return out


# ------------------------------------------------------------------ point metrics


@pytest.mark.parametrize("s_id, s_ood", _cases())
def test_compute_metrics_equals_sklearn(s_id, s_ood):
    got = compute_metrics(s_id, s_ood)
    assert set(got) == set(METRIC_NAMES)
    assert all(type(v) is float for v in got.values())
    assert_matches(got, sklearn_metrics(s_id, s_ood))


def test_larger_random_and_discretised():
    rng = np.random.default_rng(7)
    s_id, s_ood = rng.normal(0, 1, 5000), rng.normal(1, 1.3, 700)
    assert_matches(compute_metrics(s_id, s_ood), sklearn_metrics(s_id, s_ood))
    r_id, r_ood = np.round(s_id, 1), np.round(s_ood, 1)
    assert_matches(compute_metrics(r_id, r_ood), sklearn_metrics(r_id, r_ood))


def test_perfect_separation():
    got = compute_metrics([0.0, 0.1, 0.2], [1.0, 2.0])
    assert got == {"auroc": 1.0, "aupr_out": 1.0, "aupr_in": 1.0, "fpr95": 0.0, "fpr95_in": 0.0}


def test_perfectly_inverted():
    # sorted desc: 3 id, 2 id, 1 ood, 0 ood -> AP = 1/2 * 1/3 + 1/2 * 2/4 = 5/12 (both ways)
    got = compute_metrics([2.0, 3.0], [0.0, 1.0])
    assert got["auroc"] == 0.0
    assert got["aupr_out"] == pytest.approx(5 / 12, **TOL)
    assert got["aupr_in"] == pytest.approx(5 / 12, **TOL)
    assert got["fpr95"] == 1.0 and got["fpr95_in"] == 1.0
    assert_matches(got, sklearn_metrics([2.0, 3.0], [0.0, 1.0]))


def test_all_tied():
    got = compute_metrics([1.0, 1.0, 1.0], [1.0, 1.0])
    assert got["auroc"] == 0.5  # every pair is a tie, counted 1/2
    assert got["aupr_out"] == pytest.approx(2 / 5, **TOL)  # prevalence
    assert got["aupr_in"] == pytest.approx(3 / 5, **TOL)
    assert got["fpr95"] == 1.0 and got["fpr95_in"] == 1.0


def test_hand_made_with_ties():
    s_id, s_ood = [0.1, 0.4, 0.35, 0.8], [0.35, 0.8, 0.9]
    got = compute_metrics(s_id, s_ood)
    # pairs won by OOD: 0.35 -> 1 + tie/2, 0.8 -> 3 + tie/2, 0.9 -> 4  => 9 / 12
    assert got["auroc"] == pytest.approx(0.75, **TOL)
    # thresholds 0.9 (P=1, R=1/3), 0.8 (P=2/3, R=2/3), 0.35 (P=1/2, R=1)
    assert got["aupr_out"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3, **TOL)
    # ID+, ascending: 0.1 (P=1), 0.35 (P=2/3), 0.4 (P=3/4), 0.8 (P=4/6), each R step 1/4
    assert got["aupr_in"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 6) / 4, **TOL)
    # catching 95% of 3 OOD needs all three: t = 0.35 flags ID 0.35, 0.4, 0.8
    assert got["fpr95"] == 0.75
    # keeping 95% of 4 ID needs all four: score <= 0.8 accepts OOD 0.35, 0.8
    assert got["fpr95_in"] == pytest.approx(2 / 3, **TOL)
    assert threshold_at_tpr(s_id, s_ood) == 0.35
    assert_matches(got, sklearn_metrics(s_id, s_ood))


def test_fpr95_tpr_exactly_095_counts():
    # 19 of 20 OOD is exactly 95%: the threshold is the 19th highest OOD score (2.0),
    # not the 20th, so only ID 2.5 is a false positive.
    s_id, s_ood = [0.5, 1.5, 2.5], np.arange(1.0, 21.0)
    got = compute_metrics(s_id, s_ood)
    assert got["fpr95"] == pytest.approx(1 / 3, **TOL)
    assert threshold_at_tpr(s_id, s_ood) == 2.0
    assert_matches(got, sklearn_metrics(s_id, s_ood))


def test_single_sample_per_class():
    assert compute_metrics([0.0], [1.0])["auroc"] == 1.0
    assert compute_metrics([1.0], [1.0])["auroc"] == 0.5
    assert_matches(compute_metrics([1.0], [0.0]), sklearn_metrics([1.0], [0.0]))


def test_accepts_lists_ints_and_float32():
    ref = compute_metrics(np.array([0.0, 1, 2]), np.array([1.0, 3]))
    assert compute_metrics([0, 1, 2], [1, 3]) == ref
    assert compute_metrics(np.float32([0, 1, 2]), np.float32([1, 3])) == ref


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "s_id, s_ood, match",
    [
        ([], [1.0], "scores_id is empty"),
        ([1.0], [], "scores_ood is empty"),
        ([1.0, np.nan, np.nan], [1.0], r"2 non-finite.*2 NaN"),
        ([1.0], [np.inf, -np.inf, 0.0], r"scores_ood has 2 non-finite.*1 \+inf, 1 -inf"),
        ([[1.0, 2.0]], [1.0], "1-D"),
    ],
)
def test_invalid_input_raises(s_id, s_ood, match):
    for fn in (compute_metrics, evaluate, roc_points, pr_points, threshold_at_tpr):
        with pytest.raises(ValueError, match=match):
            fn(s_id, s_ood)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        bootstrap_ci([0.0, 1.0], [2.0], n_boot=0)
    with pytest.raises(ValueError):
        bootstrap_ci([0.0, 1.0], [2.0], alpha=1.5)
    with pytest.raises(ValueError):
        roc_points([0.0], [1.0], max_points=2)
    with pytest.raises(ValueError):
        pr_points([0.0], [1.0], positive="both")
    with pytest.raises(ValueError):
        threshold_at_tpr([0.0], [1.0], tpr=1.5)
    ps = sort_pooled([0.0, 1.0], [2.0])
    w_id, w_ood = ps.scatter([[1.0, 1.0]], [[1.0]])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_metrics(ps.group_ends, -w_id, w_ood)
    with pytest.raises(ValueError, match="positive total weight"):
        weighted_metrics(ps.group_ends, w_id, 0 * w_ood)


# -------------------------------------------------------------------- weighted core


@pytest.mark.parametrize("s_id, s_ood", _cases()[:12])
def test_weighted_core_equals_sklearn_sample_weight(s_id, s_ood):
    rng = np.random.default_rng(s_id.size * 1000 + s_ood.size)
    b = 3
    w_id = rng.integers(0, 4, size=(b, s_id.size)).astype(float)
    w_ood = rng.integers(0, 4, size=(b, s_ood.size)).astype(float)
    w_id[:, 0] = np.maximum(w_id[:, 0], 1)  # each class needs some weight
    w_ood[:, 0] = np.maximum(w_ood[:, 0], 1)
    ps = sort_pooled(s_id, s_ood)
    got = weighted_metrics(ps.group_ends, *ps.scatter(w_id, w_ood))
    hinted = weighted_metrics(ps.group_ends, *ps.scatter(w_id, w_ood), ps.id_groups, ps.ood_groups)
    for r in range(b):
        ref = sklearn_metrics(s_id, s_ood, w_id[r], w_ood[r])
        assert_matches({k: got[k][r] for k in METRIC_NAMES}, ref)
        for k in METRIC_NAMES:  # the column-subset speed path changes nothing but rounding
            assert hinted[k][r] == pytest.approx(got[k][r], **TOL)


def test_weighted_core_unit_weights_is_compute_metrics():
    rng = np.random.default_rng(3)
    s_id, s_ood = np.round(rng.normal(0, 1, 300), 1), rng.normal(1, 1, 50)
    ps = sort_pooled(s_id, s_ood)
    got = weighted_metrics(ps.group_ends, *ps.scatter(np.ones(300), np.ones(50)))
    ref = compute_metrics(s_id, s_ood)
    for k in METRIC_NAMES:
        assert got[k][0] == pytest.approx(ref[k], **TOL)


def test_weighted_core_non_integer_weights():
    rng = np.random.default_rng(4)
    s_id, s_ood = rng.normal(0, 1, 60), np.round(rng.normal(1, 1, 40), 1)
    w_id, w_ood = rng.uniform(0.1, 2.0, 60), rng.uniform(0.1, 2.0, 40)
    ps = sort_pooled(s_id, s_ood)
    got = weighted_metrics(ps.group_ends, *ps.scatter(w_id, w_ood))
    ref = sklearn_metrics(s_id, s_ood, w_id, w_ood)
    for k in METRIC_NAMES:
        assert got[k][0] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


# ------------------------------------------------------------------------ bootstrap


@pytest.fixture(scope="module")
def example():
    rng = np.random.default_rng(2024)
    return rng.normal(0, 1, 3000), np.round(rng.normal(1.2, 1.1, 400), 2)


def test_bootstrap_weights_are_counts_of_indices():
    w_id, w_ood = bootstrap_weights(50, 7, n_boot=5, seed=3)
    assert w_id.shape == (5, 50) and w_ood.shape == (5, 7)
    assert (w_id.sum(axis=1) == 50).all() and (w_ood.sum(axis=1) == 7).all()  # stratified
    i_id, i_ood = bootstrap_indices(50, 7, replicate=2, seed=3)
    np.testing.assert_array_equal(w_id[2], np.bincount(i_id, minlength=50))
    np.testing.assert_array_equal(w_ood[2], np.bincount(i_ood, minlength=7))
    # a window of replicates is the same draw (chunking cannot change results)
    w_id_part, _ = bootstrap_weights(50, 7, n_boot=5, seed=3, start=2, stop=4)
    np.testing.assert_array_equal(w_id_part, w_id[2:4])


def test_bootstrap_replicates_equal_sklearn_on_resampled_arrays(example, monkeypatch):
    s_id, s_ood = example
    monkeypatch.setattr(replicates, "_ROWS", 3)  # force many chunks of ID groups
    reps = bootstrap_replicates(s_id, s_ood, n_boot=5, seed=11)
    for b in (0, 3, 4):
        i_id, i_ood = bootstrap_indices(s_id.size, s_ood.size, replicate=b, seed=11)
        ref = sklearn_metrics(s_id[i_id], s_ood[i_ood])
        assert_matches({k: reps[k][b] for k in METRIC_NAMES}, ref)


def test_bootstrap_ci_reproducible_and_seeded(example):
    s_id, s_ood = example
    a = bootstrap_ci(s_id, s_ood, n_boot=50, seed=1)
    assert a == bootstrap_ci(s_id, s_ood, n_boot=50, seed=1)
    assert a != bootstrap_ci(s_id, s_ood, n_boot=50, seed=2)
    assert set(a) == set(METRIC_NAMES)


def test_bootstrap_ci_contains_point_estimate(example):
    s_id, s_ood = example
    point = compute_metrics(s_id, s_ood)
    ci = bootstrap_ci(s_id, s_ood, n_boot=200, seed=0)
    for k in METRIC_NAMES:
        lo, hi = ci[k]
        assert isinstance(lo, float) and isinstance(hi, float)
        assert 0.0 <= lo < point[k] < hi <= 1.0, (k, lo, point[k], hi)
    # a wider interval at a smaller alpha
    lo90, hi90 = bootstrap_ci(s_id, s_ood, n_boot=200, seed=0, alpha=0.1)["auroc"]
    assert ci["auroc"][0] <= lo90 <= hi90 <= ci["auroc"][1]


def test_bootstrap_ci_is_percentile_of_replicates(example):
    s_id, s_ood = example
    reps = bootstrap_replicates(s_id, s_ood, n_boot=40, seed=5)
    ci = bootstrap_ci(s_id, s_ood, n_boot=40, seed=5)
    for k in METRIC_NAMES:
        assert ci[k] == tuple(np.percentile(reps[k], [2.5, 97.5]))


def test_evaluate_shape_and_json(example):
    s_id, s_ood = example
    res = evaluate(s_id, s_ood, n_boot=20, seed=0)
    assert set(res) == set(METRIC_NAMES) | {"ci"}
    assert {k: res[k] for k in METRIC_NAMES} == compute_metrics(s_id, s_ood)
    for k in METRIC_NAMES:
        assert isinstance(res["ci"][k], list) and len(res["ci"][k]) == 2
        assert all(type(v) is float for v in res["ci"][k])
    assert json.loads(json.dumps(res)) == res
    assert evaluate(s_id, s_ood, n_boot=0)["ci"] == {}


def test_labels_and_direction():
    assert METRIC_NAMES == ("auroc", "aupr_out", "aupr_in", "fpr95", "fpr95_in")
    assert set(METRIC_LABELS) == set(METRIC_NAMES)
    assert METRIC_LABELS["fpr95"] == "FPR@95 (OOD+)" and METRIC_LABELS["fpr95_in"] == "FPR@95 (ID+)"
    assert LOWER_IS_BETTER == {"fpr95", "fpr95_in"}


# --------------------------------------------------------------------------- curves


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(99)
    return rng.normal(0, 1, 20000), rng.normal(1.3, 1.2, 1500)


@pytest.mark.parametrize("max_points", [3, 10, 57, 400])
def test_roc_points_downsampled(big, max_points):
    s_id, s_ood = big
    r = roc_points(s_id, s_ood, max_points=max_points)
    n = len(r["fpr"])
    assert 3 <= n <= max_points and len(r["tpr"]) == len(r["threshold"]) == n
    assert (r["fpr"][0], r["tpr"][0], r["threshold"][0]) == (0.0, 0.0, np.inf)
    assert (r["fpr"][-1], r["tpr"][-1]) == (1.0, 1.0)
    assert (np.diff(r["fpr"]) >= 0).all() and (np.diff(r["tpr"]) >= 0).all()
    assert (np.diff(r["threshold"]) < 0).all()
    # a faithful subset of sklearn's exact curve
    y = np.r_[np.zeros(s_id.size), np.ones(s_ood.size)]
    fpr, tpr, thr = roc_curve(y, np.r_[s_id, s_ood], drop_intermediate=False)
    idx = np.searchsorted(-thr, -r["threshold"])
    np.testing.assert_array_equal(thr[idx], r["threshold"])
    np.testing.assert_array_equal(fpr[idx], r["fpr"])
    np.testing.assert_array_equal(tpr[idx], r["tpr"])
    # the fpr95 operating point is always on it
    k = np.flatnonzero(r["tpr"] >= 0.95)[0]
    assert r["fpr"][k] == compute_metrics(s_id, s_ood)["fpr95"]
    assert r["threshold"][k] == threshold_at_tpr(s_id, s_ood)
    if max_points >= 57:  # the budget is actually used
        assert n >= max_points - 2


def test_roc_points_small_is_exact():
    r = roc_points([0.1, 0.4, 0.35, 0.8], [0.35, 0.8, 0.9])
    np.testing.assert_allclose(r["fpr"], [0, 0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(r["tpr"], [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_array_equal(r["threshold"], [np.inf, 0.9, 0.8, 0.4, 0.35, 0.1])


@pytest.mark.parametrize("positive", ["ood", "id"])
@pytest.mark.parametrize("max_points", [3, 25, 400])
def test_pr_points_downsampled(big, positive, max_points):
    s_id, s_ood = big
    p = pr_points(s_id, s_ood, max_points=max_points, positive=positive)
    n = len(p["recall"])
    assert 2 <= n <= max_points and len(p["precision"]) == len(p["threshold"]) == n
    assert (p["recall"][0], p["precision"][0]) == (0.0, 1.0)
    assert p["recall"][-1] == 1.0
    assert (np.diff(p["recall"]) >= 0).all()
    sign = 1 if positive == "ood" else -1  # thresholds stay in original score units
    assert (np.diff(sign * p["threshold"]) < 0).all()
    # a faithful subset of sklearn's exact curve
    y = np.r_[np.zeros(s_id.size), np.ones(s_ood.size)]
    s = np.r_[s_id, s_ood]
    if positive == "id":
        y, s = 1 - y, -s
    prec, rec, thr = precision_recall_curve(y, s)
    last = np.r_[thr, np.inf]  # sklearn appends (P=1, R=0) without a threshold
    idx = np.searchsorted(last, sign * p["threshold"])
    np.testing.assert_array_equal(prec[idx], p["precision"])
    np.testing.assert_array_equal(rec[idx], p["recall"])
    # final point: precision = prevalence of the positive class
    n_pos = s_ood.size if positive == "ood" else s_id.size
    assert p["precision"][-1] == pytest.approx(n_pos / (s_id.size + s_ood.size), **TOL)


def test_pr_points_id_small():
    p = pr_points([0.1, 0.4, 0.35, 0.8], [0.35, 0.8, 0.9], positive="id")
    np.testing.assert_allclose(p["recall"], [0, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(p["precision"], [1, 1, 2 / 3, 3 / 4, 4 / 6, 4 / 7])
    np.testing.assert_array_equal(p["threshold"], [-np.inf, 0.1, 0.35, 0.4, 0.8, 0.9])


# ------------------------------------------------------------------------ threshold


@pytest.mark.parametrize("s_id, s_ood", _cases()[::4])
def test_threshold_at_tpr_consistent_with_fpr95(s_id, s_ood):
    t = threshold_at_tpr(s_id, s_ood)
    m = compute_metrics(s_id, s_ood)
    assert np.mean(s_id >= t) == pytest.approx(m["fpr95"], **TOL)
    assert np.mean(s_ood >= t) >= 0.95
    # and t is the highest such threshold: the next higher score catches < 95%
    higher = np.unique(np.r_[s_id, s_ood])
    higher = higher[higher > t]
    if higher.size:
        assert np.mean(s_ood >= higher[0]) < 0.95


def test_threshold_at_tpr_other_levels(big):
    s_id, s_ood = big
    for level in (0.0, 0.5, 0.8, 1.0):
        t = threshold_at_tpr(s_id, s_ood, tpr=level)
        assert np.mean(s_ood >= t) >= level
    assert threshold_at_tpr(s_id, s_ood, tpr=0.0) == np.inf
    assert threshold_at_tpr(s_id, s_ood, tpr=1.0) == s_ood.min()


# ----------------------------------------------------------------- one sort, shared draws (issue 13)


def _old_bootstrap(scores_id, scores_ood, n_boot, seed=0):
    """The implementation before the shared sort/draws: fresh draws bincounted into the sorted order (one
    chunk of n_boot rows, as the old code did at these sizes), the weighted core, and FPR@95 read by
    np.argmax over the full boolean matrix."""
    from oodcore.evaluation import metrics as MM

    ps = sort_pooled(scores_id, scores_ood)
    n = ps.scores.size
    w_id, w_ood = np.empty((n_boot, n)), np.empty((n_boot, n))
    for b in range(n_boot):
        i_id, i_ood = bootstrap_indices(ps.pos_id.size, ps.pos_ood.size, b, seed)
        w_id[b] = np.bincount(ps.pos_id[i_id], minlength=n)
        w_ood[b] = np.bincount(ps.pos_ood[i_ood], minlength=n)
    c_id, c_ood = MM._prefix_sums(w_id, ps.group_ends), MM._prefix_sums(w_ood, ps.group_ends)
    m = MM._metrics_from_prefix(c_id, c_ood, ps.id_groups, ps.ood_groups)
    rows = np.arange(n_boot)
    t_id, t_ood = c_id[:, -1], c_ood[:, -1]
    k95 = np.argmax(c_ood[:, 1:] / t_ood[:, None] >= 0.95, axis=1)
    m["fpr95"] = c_id[:, 1:][rows, k95] / t_id
    id_le = t_id[:, None] - c_id[:, :-1]
    ok = id_le / t_id[:, None] >= 0.95
    k95_in = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    m["fpr95_in"] = (t_ood[:, None] - c_ood[:, :-1])[rows, k95_in] / t_ood
    return m


@pytest.mark.parametrize("ties", [False, True])
def test_shared_sort_and_draws_equal_the_old_bootstrap(ties):
    rng = np.random.default_rng(7)
    s_id, s_ood = rng.normal(size=700), rng.normal(0.7, 1, size=90)
    if ties:
        s_id, s_ood = np.round(s_id, 1), np.round(s_ood, 1)
    new = bootstrap_replicates(s_id, s_ood, n_boot=40, seed=3)
    old = _old_bootstrap(s_id, s_ood, n_boot=40, seed=3)
    for k in old:  # integer ratios exactly; the two average precisions sum the same terms in another order
        if k.startswith("aupr"):
            np.testing.assert_allclose(new[k], old[k], rtol=1e-13, atol=0, err_msg=k)
        else:
            assert np.array_equal(new[k], old[k]), k
    ps = sort_pooled(s_id, s_ood)
    assert evaluate(s_id, s_ood, n_boot=40, seed=3) == {
        **compute_metrics(s_id, s_ood, pooled=ps),
        "ci": {k: list(v) for k, v in bootstrap_ci(s_id, s_ood, n_boot=40, seed=3, pooled=ps).items()},
    }


def test_shared_draws_are_the_bootstrap_weights():
    from oodcore.evaluation.resample import bootstrap_counts

    c_id, c_ood = bootstrap_counts(50, 7, 12, 5)
    w_id, w_ood = bootstrap_weights(50, 7, 12, seed=5)
    assert np.array_equal(c_id, w_id) and np.array_equal(c_ood, w_ood)
    assert bootstrap_counts(50, 7, 12, 5)[0] is c_id and not c_id.flags.writeable  # drawn once, shared read-only


def test_first_true_is_argmax_of_a_monotone_predicate():
    from oodcore.evaluation.resample import first_true

    rng = np.random.default_rng(0)
    cut = rng.integers(0, 13, size=40)  # 12 = never true
    mat = np.arange(12)[None, :] >= cut[:, None]
    got = first_true(lambda r, j: mat[r, j], 40, 12)
    assert np.array_equal(got, np.argmax(mat, axis=1))


@pytest.mark.parametrize("layout", ["distinct", "ties", "coarse", "constant_id", "ood_above_all", "ood_below_all"])
def test_replicate_path_equals_the_weighted_core(layout, monkeypatch):
    """The bootstrap's chunked pass down the ID groups gives the core's numbers on the same count weights:
    exactly for AUROC and both FPR@95 (integer ratios), to 1e-13 for the two average precisions."""
    from oodcore.evaluation.resample import bootstrap_counts

    rng = np.random.default_rng(len(layout))
    s_id, s_ood = rng.normal(size=333), rng.normal(0.8, 1, size=71)
    if layout == "ties":
        s_id, s_ood = np.round(s_id, 1), np.round(s_ood, 1)
    elif layout == "coarse":
        s_id, s_ood = np.round(s_id), np.round(s_ood)
    elif layout == "constant_id":
        s_id, s_ood = np.zeros_like(s_id), np.round(s_ood * 0.3)
    elif layout == "ood_above_all":
        s_ood = s_ood + 20
    elif layout == "ood_below_all":
        s_ood = s_ood - 20
    ps = sort_pooled(s_id, s_ood)
    c_id, c_ood = bootstrap_counts(s_id.size, s_ood.size, 23, 4)
    w_id, w_ood = ps.scatter(c_id, c_ood)
    core = M._weighted_metrics(ps.group_ends, w_id, w_ood, ps.id_groups, ps.ood_groups)
    for rows in (1, 7, 64, 4096):  # chunks of one group, several, all in one
        monkeypatch.setattr(replicates, "_ROWS", rows)
        fast = bootstrap_replicates(s_id, s_ood, n_boot=23, seed=4, pooled=ps)
        for k in METRIC_NAMES:
            if k.startswith("aupr"):
                np.testing.assert_allclose(fast[k], core[k], rtol=1e-13, atol=0, err_msg=f"{k} rows={rows}")
            else:
                assert np.array_equal(fast[k], core[k]), (k, rows)


def test_cumsum_rows_equals_numpy():
    x = np.random.default_rng(0).integers(0, 5, size=(2 * 32 * 3 + 7, 9)).astype(np.int32)
    for r in (1, 2, 31, 64, 100, x.shape[0]):
        assert np.array_equal(replicates._cumsum_rows(x[:r].copy()), np.cumsum(x[:r], axis=0)), r
