"""The post-hoc method zoo: each method against its formula on small hand-made inputs,
on the demo cache, memoised fitting, fit-split isolation, and the `export` command."""

import dataclasses
import json
import math

import numpy as np
import pytest

from oodcore import detectors as M
from oodcore.detectors import features as MF
from oodcore.detectors import fitting as FIT
from oodcore.detectors import logits as ML
from oodcore.detectors import numerics as NUM
from oodcore.evaluation.metrics import compute_metrics
from oodcore.store import cache
from oodcore.store.rundata import SplitArrays
from tests.helpers import make_data

ZOO = [
    "entropy",
    "gen",
    "kl_matching",
    "temp_scaling",
    "react",
    "dice",
    "gradnorm",
    "vim",
    "she",
    "mahalanobis",
    "rel_mahalanobis",
    "knn",
]


def naive_softmax(row):
    e = np.exp(np.asarray(row, float) - max(row))
    return e / e.sum()


def split_of(logits, features=None, labels=None):
    logits = np.asarray(logits, float)
    labels = logits.argmax(1) if labels is None else np.asarray(labels)
    return SplitArrays(
        logits,
        None if features is None else np.asarray(features),
        labels,
        np.asarray([f"x/{i}" for i in range(len(logits))]),
    )


def feature_data(seed=0, n_fit=300, n_id=40, n_ood=30, k=3, d=6, ood_shift=2.5):
    """Gaussian class blobs in feature space, a random linear head, logits = head(features)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (k, d))
    w = np.abs(means) / np.linalg.norm(means, axis=1, keepdims=True) + rng.normal(0, 0.1, (k, d))  # a decent classifier
    b = rng.normal(0, 0.5, k)

    def blob(n, labels, shift=0.0):
        f = means[labels] + rng.normal(0, 1, (n, d)) + shift
        return np.abs(f), labels  # non-negative like ReLU features

    f_fit, y_fit = blob(n_fit, rng.integers(0, k, n_fit))
    f_id, y_id = blob(n_id, rng.integers(0, k, n_id))
    f_ood, _ = blob(n_ood, rng.integers(0, k, n_ood), ood_shift)
    data = make_data(
        f_id @ w.T + b,
        f_ood @ w.T + b,
        f_id,
        f_ood,
        head_weight=w,
        head_bias=b,
        fit=split_of(f_fit @ w.T + b, f_fit, y_fit),
    )
    data.id.labels[:] = y_id
    return data


# ----------------------------------------------------------------------------- logits only


def test_entropy_uniform_one_hot_and_formula():
    k = 7
    data = make_data([[0.0] * k, [200.0] + [0.0] * (k - 1)], [[1.0, 2.0, 3.0, 0.5, -1.0, 0.0, 2.5]])
    s_id, s_ood = M.get("entropy").score_id_ood(data)
    assert s_id[0] == pytest.approx(math.log(k))  # uniform: maximal
    assert 0 <= s_id[1] < 1e-80  # (near) one-hot: zero
    p = naive_softmax(data.ood.logits[0])
    assert s_ood[0] == pytest.approx(-(p * np.log(p)).sum())


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (0.5, 2), (1.0, 3), (2.0, 1)])
def test_gen_formula(gamma, m):
    logits = [[2.0, 1.0, 0.0, -1.0], [0.3, 0.2, 0.1, 0.0], [9.0, -3.0, 1.0, 2.0]]
    data = make_data(logits, logits)
    s_id, _ = M.get("gen").score_id_ood(data, gamma=gamma, M=m)
    for row, s in zip(logits, s_id):
        p = np.sort(naive_softmax(row))[::-1][: min(m, 4)]
        assert s == pytest.approx(np.sum(p**gamma * (1 - p) ** gamma), rel=1e-12)


def test_gen_exact_when_the_softmax_saturates():
    """1 - p_max is the sum of the other probabilities, not 1 - 1.0 = 0."""
    data = make_data([[60.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]])
    s_id, s_ood = M.get("gen").score_id_ood(data, gamma=0.1, M=3)
    tail = math.exp(-60.0)  # each of the two small probabilities (to 1e-26 relative)
    expected = (2 * tail) ** 0.1 + 2 * tail**0.1  # top term: 1^γ (2 tail)^γ; tail terms: tail^γ (1 - tail)^γ
    assert s_id[0] == pytest.approx(expected, rel=1e-9)
    assert s_ood[0] > s_id[0]


def test_kl_matching_formula():
    fit_logits = np.array(
        [[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 4.0, 1.0], [0.5, 2.0, 0.0]]
    )  # class 2 never predicted
    data = make_data([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], [[0.2, 0.1, 0.0]], fit=split_of(fit_logits))
    probs = np.array([naive_softmax(r) for r in fit_logits])
    templates = {c: probs[probs.argmax(1) == c].mean(0) for c in (0, 1)}
    s_id, s_ood = M.get("kl_matching").score_id_ood(data)
    for row, s in zip(np.r_[data.id.logits, data.ood.logits], np.r_[s_id, s_ood]):
        p = naive_softmax(row)
        expected = min(np.sum(p * np.log(p / d)) for d in templates.values())
        assert s == pytest.approx(expected, rel=1e-5, abs=1e-6)  # the cross term is a float32 product
    state = M.get("kl_matching").state(data)
    assert list(state["classes"]) == [0, 1]


def test_temp_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, k, t_true = 20_000, 10, 2.5
    calibrated = rng.normal(0, 2.0, (n, k))  # softmax(calibrated) is the true label distribution
    cum = np.cumsum(np.array([naive_softmax(r) for r in calibrated]), axis=1)
    labels = (rng.random((n, 1)) > cum).sum(axis=1)
    observed = calibrated * t_true  # an over-confident model: dividing by T = 2.5 calibrates it
    data = make_data(observed[:5], observed[5:10], fit=split_of(observed, labels=labels))
    t = ML.fitted_temperature(data)
    assert t == pytest.approx(t_true, rel=0.03)
    nll = lambda temp: ML._nll_slope(observed, labels, 1 / temp)[0]  # noqa: E731
    assert nll(t) <= min(nll(t * 1.0001), nll(t / 1.0001))  # the exact minimiser
    s_id, _ = M.get("temp_scaling").score_id_ood(data)
    msp = np.array([naive_softmax(r / t).max() for r in observed[:5]])
    assert s_id == pytest.approx(np.log1p(-msp), rel=1e-9)  # log(1 - MSP_T): the ranking of -MSP_T


def test_temp_scaling_is_tie_free_where_msp_saturates():
    data = make_data(
        [[80.0, 0.0, 0.0], [90.0, 0.0, 0.0]],
        [[1.0, 0.0, 0.0]],
        fit=split_of([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], labels=[0, 1]),
    )
    s_id, s_ood = M.get("temp_scaling").score_id_ood(data)
    t = ML.fitted_temperature(data)
    assert s_id[1] < s_id[0] < s_ood[0]
    assert s_id[0] == pytest.approx(math.log(2) - 80.0 / t, rel=1e-12)


def test_softmax_parts_stay_exact_beyond_float_underflow():
    z = np.array([[1000.0, 0.0, -5.0], [3.0, 1.0, 2.0], [5.0, 5.0, 1.0]])
    parts = NUM.softmax_parts(z)
    assert parts["log_rest"][0] == pytest.approx(-1000.0 + math.log1p(math.exp(-5.0)), rel=1e-12)
    for row, lr in zip(z[1:], parts["log_rest"][1:]):
        assert lr == pytest.approx(math.log(1 - naive_softmax(row).max()), rel=1e-12)
    data = make_data(z, z[:1] / 100, fit=split_of(z[1:], labels=[0, 1]))
    for name in ("temp_scaling", "gen", "entropy", "kl_matching"):
        s_id, s_ood = M.get(name).score_id_ood(data)
        assert np.all(np.isfinite(s_id)) and np.all(np.isfinite(s_ood)), name


# ----------------------------------------------------------------------------- features + head


def energy(logits):
    logits = np.asarray(logits, float)
    m = logits.max(1)
    return -(m + np.log(np.exp(logits - m[:, None]).sum(1)))


def test_react_clips_at_the_fit_percentile_then_energy():
    data = feature_data()
    for p in (90.0, 60.0, 100.0):
        s_id, s_ood = M.get("react").score_id_ood(data, p=p)
        c = np.percentile(data.fit.features, p)
        for split, s in ((data.id, s_id), (data.ood, s_ood)):
            expected = energy(np.minimum(split.features, c) @ data.head_weight.T + data.head_bias)
            assert s == pytest.approx(expected, rel=1e-5)
    assert M.get("react").state(data, p=100.0)["clip"] == data.fit.features.max()


def count_sparse_products(monkeypatch) -> list:
    """Route the head's scipy.sparse through a stand-in that records each CSR matrix made; returns the record."""
    from oodcore.detectors import head as F

    real, used = F.sparse_module(), []

    class Counting:
        @staticmethod
        def csr_matrix(*a, **k):
            used.append(1)
            return real.csr_matrix(*a, **k)

    monkeypatch.setattr(F, "sparse_module", lambda: Counting)
    return used


def test_react_sparse_correction_of_the_cached_logits_equals_clipping(monkeypatch):
    """Where few activations exceed the clip, ReAct subtracts their excess times the head from the cached logits
    (scipy's CSR product): the same energies as clipping the features and applying the head."""
    from oodcore.detectors import head as F

    data = feature_data(n_id=400, n_ood=300, d=64)
    used = count_sparse_products(monkeypatch)
    for p in (99.0, 99.9):
        c = np.percentile(data.fit.features, p)
        for split in (data.id, data.ood):
            used.clear()
            got = M.get("react").score(data, split, p=p)
            expected = energy(np.minimum(split.features, c) @ data.head_weight.T + data.head_bias)
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
            # ~1% of ID activations exceed the clip: the sparse path; OOD's shifted features exceed it more often
            assert bool(used) == (np.mean(split.features > c) <= F.SPARSE_SHARE), (p, len(used))
    # logits that are not the head's output: clipped features times the head, as before
    odd = dataclasses.replace(data.ood, logits=data.ood.logits + 1.0)
    used.clear()
    expected = energy(np.minimum(odd.features, c) @ data.head_weight.T + data.head_bias)
    assert M.get("react").score(data, odd, p=99.9) == pytest.approx(expected, rel=1e-6, abs=1e-6) and not used


def test_dice_masks_the_smallest_contributions_on_a_tiny_head():
    w = np.array([[1.0, -2.0, 0.5], [0.1, 3.0, -1.0]])
    b = np.array([0.2, -0.1])
    f_fit = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 2.0]])  # mean activation (2, 1, 1)
    f = np.array([[1.0, 1.0, 1.0], [0.0, 2.0, 5.0]])
    data = make_data(f @ w.T + b, f @ w.T + b, f, f, head_weight=w, head_bias=b, fit=split_of(f_fit @ w.T + b, f_fit))
    # contributions w * mean = [[2, -2, .5], [.2, 3, -1]]; sorted -2, -1, .2, .5, 2, 3
    # p = 50: threshold = percentile 50 = (0.2 + 0.5) / 2 = 0.35 -> keep 0.5, 2, 3
    mask = np.array([[1, 0, 1], [0, 1, 0]])
    s_id, _ = M.get("dice").score_id_ood(data, p=50.0)
    assert s_id == pytest.approx(energy(f @ (w * mask).T + b), rel=1e-6)
    assert np.array_equal(M.get("dice").state(data, p=50.0)["w"] != 0, mask.astype(bool))
    s0, _ = M.get("dice").score_id_ood(data, p=0.0)  # p = 0 drops only the single smallest contribution
    assert s0 == pytest.approx(energy(f @ (w * np.array([[1, 0, 1], [1, 1, 1]])).T + b), rel=1e-6)


def test_dice_sparse_head_product_equals_the_dense_one(monkeypatch):
    """At p = 90 DICE keeps 10% of the weights: the product runs over them only (scipy's CSR), equal to the dense
    product of the light core (float32 sums in another order) and to the formula."""
    from oodcore.detectors import head as F

    data = feature_data(n_id=300, n_ood=200, d=64, k=20)
    w = M.get("dice").state(data, p=90.0)["w"]
    assert np.count_nonzero(w) <= F.SPARSE_SHARE * w.size
    expected = energy(data.id.features @ w.T.astype(np.float64) + data.head_bias)
    used = count_sparse_products(monkeypatch)
    sparse = M.get("dice").score(data, data.id, p=90.0)
    assert used
    used.clear()
    M.get("dice").score(data, data.id, p=50.0)  # half the weights kept: the dense product
    assert not used
    monkeypatch.setattr(F, "sparse_module", lambda: None)  # the light core: no scipy
    dense = M.get("dice").score(data, data.id, p=90.0)
    assert sparse == pytest.approx(dense, rel=1e-6, abs=1e-6)
    assert sparse == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_gradnorm_closed_form_equals_autograd():
    torch = pytest.importorskip("torch")
    data = feature_data(k=4, d=5)
    s_id, s_ood = M.get("gradnorm").score_id_ood(data)
    w = torch.tensor(data.head_weight, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(data.head_bias, dtype=torch.float64)
    k = w.shape[0]
    for split, scores in ((data.id, s_id), (data.ood, s_ood)):
        for f, s in zip(split.features[:10], scores[:10]):
            logp = torch.log_softmax(w @ torch.tensor(f, dtype=torch.float64) + b, dim=0)
            u = torch.full((k,), 1.0 / k, dtype=torch.float64)
            kl = (u * (u.log() - logp)).sum()  # KL(u || softmax)
            (grad,) = torch.autograd.grad(kl, w)
            assert s == pytest.approx(-grad.abs().sum().item(), rel=1e-9)


def test_vim_explicit():
    data = feature_data(d=8, n_fit=400)
    w, b = data.head_weight, data.head_bias
    for dim in (3, 5):
        u = -np.linalg.pinv(w) @ b
        x = data.fit.features - u
        evals, evecs = np.linalg.eigh(x.T @ x / len(x))
        r = evecs[:, : 8 - dim]  # complement of the top-`dim` principal subspace
        alpha = (data.fit.features @ w.T + b).max(1).mean() / np.linalg.norm(x @ r, axis=1).mean()
        for split in (data.id, data.ood):
            vlogit = alpha * np.linalg.norm((split.features - u) @ r, axis=1)
            expected = vlogit + energy(split.features @ w.T + b)
            got = M.get("vim").score(data, split, dim=dim)  # residuals are projected in float32
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-5 * np.abs(expected).max())
        state = M.get("vim").state(data)  # D' is a scoring parameter: one state, every D' a slice of it
        assert state["mean_max_logit"] / state["fit_residual"][8 - dim - 1] == pytest.approx(alpha, rel=1e-5)
    assert MF.vim_default_dim(2048) == 1000 and MF.vim_default_dim(768) == 512 and MF.vim_default_dim(64) == 32
    assert MF.resolve_vim_dim(8, 0) == 4 and MF.resolve_vim_dim(8, 50) == 7 and MF.resolve_vim_dim(8, 0.2) == 1
    # a D' the slider does not offer is computed directly, the same way as a table's column
    state = M.get("vim").state(data)
    table = MF._vim_table(state, data.id.features, data.id.logits)
    assert list(table["dims"]) == [4, 7]  # the slider's values on D = 8: auto (D/2) and the clipped D - 1
    direct = MF._residual_table(state, data.id.features, [4])[:, 0]
    assert np.array_equal(table["residual"][:, 0], direct)


@pytest.mark.parametrize("shape,rank", [((3, 7), 3), ((7, 3), 3), ((4, 7), 2)])
def test_vim_origin_is_the_pseudo_inverse_solution(shape, rank):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))  # rank-deficient in the last case
    b = rng.normal(size=shape[0])
    assert MF.vim_origin(w, b) == pytest.approx(-np.linalg.pinv(w) @ b, rel=1e-7, abs=1e-9)


def test_she_explicit():
    data = feature_data()
    fit = data.fit
    correct = fit.preds == fit.labels
    patterns = np.array([fit.features[correct & (fit.labels == c)].mean(0) for c in range(3)])
    for split in (data.id, data.ood):
        expected = -np.einsum("ij,ij->i", split.features, patterns[split.preds])
        assert M.get("she").score(data, split) == pytest.approx(expected, rel=1e-10)


def test_she_falls_back_when_a_class_has_no_correct_fit_row():
    data = feature_data()
    fit = data.fit
    labels = fit.labels.copy()
    labels[fit.preds == 2] = 0  # no fit row is now correctly classified as class 2 ...
    labels[(fit.preds != 2) & (labels == 2)] = 2  # ... but class 2 still has labelled rows
    data.fit = dataclasses.replace(fit, labels=labels)
    state = M.get("she").state(data)
    assert list(state["fallback"]) == [2]
    assert np.allclose(state["patterns"][2], fit.features[labels == 2].mean(0))


# ----------------------------------------------------------------------------- fitted distances


def blobs(seed=0, n=400, d=4):
    """Two Gaussian blobs with known means and a shared covariance."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    cov = a @ a.T + 0.5 * np.eye(d)
    means = np.array([np.zeros(d), np.full(d, 3.0)])
    labels = np.repeat([0, 1], n // 2)
    f_fit = means[labels] + rng.multivariate_normal(np.zeros(d), cov, n)
    f_id = means[rng.integers(0, 2, 20)] + rng.multivariate_normal(np.zeros(d), cov, 20)
    f_ood = rng.normal(1.5, 4.0, (15, d))
    logits = lambda f: np.c_[-f.sum(1), f.sum(1)]  # noqa: E731  (unused by the distances)
    return make_data(logits(f_id), logits(f_ood), f_id, f_ood, fit=split_of(logits(f_fit), f_fit, labels))


def textbook_gaussians(data):
    f, y = data.fit.features, data.fit.labels
    mus = [f[y == c].mean(0) for c in (0, 1)]
    cov = sum((f[y == c] - mus[c]).T @ (f[y == c] - mus[c]) for c in (0, 1)) / len(f)
    mu0 = f.mean(0)
    cov0 = (f - mu0).T @ (f - mu0) / len(f)
    return mus, np.linalg.inv(cov), mu0, np.linalg.inv(cov0)


def test_mahalanobis_per_sample_formula():
    data = blobs()
    mus, prec, _, _ = textbook_gaussians(data)
    for split in (data.id, data.ood):
        expected = [min((x - m) @ prec @ (x - m) for m in mus) for x in split.features]
        assert M.get("mahalanobis").score(data, split) == pytest.approx(expected, rel=1e-4)


def test_relative_mahalanobis_per_sample_formula():
    data = blobs(seed=1)
    mus, prec, mu0, prec0 = textbook_gaussians(data)
    for split in (data.id, data.ood):
        expected = [min((x - m) @ prec @ (x - m) - (x - mu0) @ prec0 @ (x - mu0) for m in mus) for x in split.features]
        got = M.get("rel_mahalanobis").score(data, split)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4 * np.abs(expected).max())


def test_mahalanobis_ignores_a_dead_feature_instead_of_blowing_up():
    """A direction with no fit variance is a null-space of the pseudo-inverse (as sklearn's pinvh in Lee et al.'s code)."""
    data = blobs()
    for split in (data.fit, data.id, data.ood):
        split.features = np.c_[split.features, np.zeros(len(split))]
    s_id, s_ood = M.get("mahalanobis").score_id_ood(data)
    assert np.all(np.isfinite(s_id)) and np.all(np.isfinite(s_ood))
    mus, prec, _, _ = textbook_gaussians(blobs())
    expected = [min((x[:-1] - m) @ prec @ (x[:-1] - m) for m in mus) for x in data.id.features]
    assert s_id == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rank", [400, 250])
def test_the_whitening_factor_is_triangular_and_its_panels_skip_only_zeros(rank):
    """L L^T is the ridged pseudo-inverse (also at reduced rank), L is lower-trapezoidal, and the panel product equals
    the dense one to float32 rounding, for the triangular factor and for a dense one (a state fitted before)."""
    from oodcore.detectors.distance import PANEL_COLUMNS, RIDGE, whiten, whitener, whitening

    rng = np.random.default_rng(rank)
    a = rng.normal(size=(400, rank))
    cov = a @ a.T / rank
    lw = whitener(cov)
    evals, evecs = np.linalg.eigh(cov)
    eps = RIDGE * evals[-1]
    keep = evals > eps
    pinv = (evecs[:, keep] / (evals[keep] + eps)) @ evecs[:, keep].T
    assert lw.shape == (400, int(keep.sum()))
    assert np.abs(lw @ lw.T - pinv).max() <= 1e-9 * np.abs(pinv).max()
    assert not np.triu(lw, 1).any()
    panels = whitening(lw)
    assert len(panels) == -(-lw.shape[1] // PANEL_COLUMNS)
    assert [r0 for _, _, r0, _ in panels] == [c0 for c0, _, _, _ in panels]  # each panel starts at its diagonal
    x = rng.normal(size=(300, 400)).astype(np.float32)
    dense = x.astype(np.float64) @ lw
    for factor in (lw, evecs[:, keep] / np.sqrt(evals[keep] + eps)):
        got = whiten(x, whitening(factor))
        exact = x.astype(np.float64) @ factor
        assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max()
        # the same distances from either factor
        assert np.einsum("ij,ij->i", got, got, dtype=np.float64) == pytest.approx((dense**2).sum(1), rel=1e-4)


@pytest.mark.parametrize("k", [1, 5, 50, 10_000])
def test_knn_against_brute_force(k):
    rng = np.random.default_rng(3)
    f_fit, f_id, f_ood = rng.normal(size=(60, 5)), rng.normal(size=(12, 5)), rng.normal(2, 1, (9, 5))
    data = make_data(f_id[:, :2], f_ood[:, :2], f_id, f_ood, fit=split_of(f_fit[:, :2], f_fit))
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for split in (data.id, data.ood):
        dist = np.sqrt(((norm(split.features)[:, None, :] - norm(f_fit)[None]) ** 2).sum(-1))
        expected = np.sort(dist, axis=1)[:, min(k, 60) - 1]
        assert M.get("knn").score(data, split, k=k) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- on the demo cache


@pytest.fixture(scope="module")
def demo(demo_cache):
    return cache.load_benchmark(demo_cache, "demo", "digits_cnn")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_on_the_demo(demo, name):
    method = M.get(name)
    assert method.available(demo)
    s_id, s_ood = method.score_id_ood(demo)
    assert np.all(np.isfinite(s_id)) and np.all(np.isfinite(s_ood))
    assert compute_metrics(s_id, s_ood)["auroc"] > 0.5


def test_registry_entries():
    for name in ZOO:
        method = M.get(name)
        assert method.paper and method.summary and "\n" not in method.paper
        for p in method.params:
            assert p.low <= p.default <= p.high and p.help


def test_without_a_fit_split_fitted_methods_are_unavailable():
    data = feature_data()
    data.fit = None
    for name in ("kl_matching", "temp_scaling", "react", "dice", "vim", "she", "mahalanobis", "rel_mahalanobis", "knn"):
        assert not M.get(name).available(data), name
    for name in ("entropy", "gen", "gradnorm"):
        assert M.get(name).available(data), name


# ----------------------------------------------------------------------------- memo and fit isolation


def test_fitting_is_memoised_across_slider_moves(demo):
    for k in (10, 50, 200):
        M.get("knn").score_id_ood(demo, k=k)
    for dim in (0, 8, 32, 8):
        M.get("vim").score_id_ood(demo, dim=dim)
    for name in ("mahalanobis", "rel_mahalanobis", "temp_scaling", "kl_matching", "she"):
        M.get(name).score_id_ood(demo)
        M.get(name).score_id_ood(demo)
    for p in (70.0, 90.0, 70.0):
        M.get("react").score_id_ood(demo, p=p)
        M.get("dice").score_id_ood(demo, p=p)
    calls = FIT.context_of(demo).calls
    assert calls["knn"] == 1 and calls["vim_basis"] == 1 and calls["fit_moments"] == 1
    assert calls["mahalanobis"] == 1 and calls["rel_mahalanobis"] == 1 and calls["temp_scaling"] == 1
    assert calls["kl_matching"] == 1 and calls["she"] == 1 and calls["fit_mean"] == 1
    assert calls["class_gaussian"] == 1  # shared by Mahalanobis and relative Mahalanobis
    assert calls["vim"] == 1  # D' is a slice of one eigenbasis: no refit per setting
    assert calls["react"] == 2 and calls["dice"] == 2  # one percentile per distinct p


def _states(data):
    return {
        "T": ML.fitted_temperature(data),
        "kl": M.get("kl_matching").state(data)["log_d"],
        "react": M.get("react").state(data, p=90.0)["clip"],
        "dice": M.get("dice").state(data, p=90.0)["w"],
        "vim": M.get("vim").state(data)["basis"],
        "alpha": M.get("vim").state(data)["fit_residual"],
        "she": M.get("she").state(data)["patterns"],
        "md": M.get("mahalanobis").state(data)["L"],
        "rmd": M.get("rel_mahalanobis").state(data)["background"]["L"],
        "knn": M.get("knn").state(data)["inv_norm"],
    }


def test_fitting_never_reads_the_id_eval_or_ood_rows(demo):
    before = _states(demo)
    calls = dict(FIT.context_of(demo).calls)
    # the same run with other ID-eval/OOD rows: every fitted state is reused as is
    poisoned = dataclasses.replace(
        demo,
        id=dataclasses.replace(demo.id, features=np.full_like(demo.id.features, np.nan), logits=-demo.id.logits),
        ood=dataclasses.replace(demo.ood, features=demo.ood.features[:3] * 100, logits=demo.ood.logits[:3]),
    )
    after = _states(poisoned)
    assert dict(FIT.context_of(poisoned).calls) == calls
    assert all(after[k] is before[k] for k in before)
    # refitted from scratch next to poisoned ID/OOD rows: the same values
    refit = _states(dataclasses.replace(poisoned, states={}))
    for key, value in before.items():
        assert np.array_equal(np.asarray(refit[key]), np.asarray(value)), key


def test_fitted_state_lives_on_the_run_not_in_a_global_memo():
    data, other = feature_data(seed=1), feature_data(seed=2)
    first = M.get("knn").state(data)
    assert M.get("knn").state(data) is first  # once per run
    assert M.get("knn").state(other) is not first and not np.array_equal(
        M.get("knn").state(other)["inv_norm"], first["inv_norm"]
    )
    assert FIT.context_of(data).calls["knn"] == 1 and FIT.context_of(other).calls["knn"] == 1
    # a slider over a scoring parameter (k) never refits; a fit parameter (ReAct's p) fits once per value
    for k in (1, 5, 1):
        M.get("knn").score_id_ood(data, k=k)
    for p in (80.0, 90.0, 80.0):
        M.get("react").score_id_ood(data, p=p)
    assert FIT.context_of(data).calls["knn"] == 1 and FIT.context_of(data).calls["react"] == 2


def test_a_new_image_is_scored_with_the_runs_state(demo):
    """score(state, rows) on one new row equals the cached row's score (the contract has no cached-split path)."""
    rows = SplitArrays(demo.ood.logits[5:6].copy(), demo.ood.features[5:6].copy(), np.array([-1]), np.array(["new"]))
    scored = 0
    for method in M.available_methods(demo):
        if method.trained_on_ood:
            continue
        params = method.defaults()
        expected = method.score(demo, demo.ood, **params)[5]
        assert method.score(demo, rows, **params)[0] == pytest.approx(expected, rel=1e-4, abs=1e-6), method.name
        scored += 1
    assert scored == len([m for m in M.REGISTRY.values() if m.available(demo)])


# ----------------------------------------------------------------------------- export


def test_export_writes_plain_arrays_and_the_registry_scores(demo_cache, tmp_path):
    from oodcore.cli.main import main

    out = tmp_path / "exp" / "demo.npz"
    assert (
        main(
            ["export", "--benchmark", "demo", "--arch", "digits_cnn", "--npz", str(out), "--cache-dir", str(demo_cache)]
        )
        == 0
    )
    data = cache.load_benchmark(demo_cache, "demo", "digits_cnn")
    n_id, n_ood, n_fit, k, d = len(data.id), len(data.ood), len(data.fit), data.n_classes, data.id.features.shape[1]
    with np.load(out, allow_pickle=False) as z:
        arrays = {key: z[key] for key in z.files}
    shapes = {
        "logits_id": (n_id, k),
        "logits_ood": (n_ood, k),
        "features_id": (n_id, d),
        "features_ood": (n_ood, d),
        "features_fit": (n_fit, d),
        "fc_weight": (k, d),
        "fc_bias": (k,),
    }
    for key, shape in shapes.items():
        assert arrays[key].shape == shape and arrays[key].dtype == np.float32, key
    assert arrays["labels_fit"].shape == (n_fit,) and arrays["labels_id"].shape == (n_id,)
    assert np.array_equal(arrays["labels_id"], data.id.labels) and np.array_equal(arrays["logits_id"], data.id.logits)
    side = json.loads(out.with_suffix(".json").read_text())
    assert (side["n_id"], side["n_ood"], side["n_fit"]) == (n_id, n_ood, n_fit)
    assert (
        side["protocol"] == data.protocol
        and side["class_ids"] == data.class_ids
        and side["class_names"] == data.class_names
    )
    assert side["fitted"]["temp_scaling"]["T"] == pytest.approx(ML.fitted_temperature(data))
    names = [m.name for m in M.available_methods(data)]
    assert set(ZOO) <= set(names) and set(side["methods"]) == set(names)
    for name in names:
        method = M.get_for(data, name) if hasattr(M, "get_for") else M.get(name)
        s_id, s_ood = method.score_id_ood(data)
        assert np.array_equal(arrays[f"scores_{name}_id"], s_id) and np.array_equal(
            arrays[f"scores_{name}_ood"], s_ood
        ), name
        assert side["methods"][name]["params"] == method.defaults()


def test_export_of_a_missing_benchmark_is_a_clear_error(tmp_path, capsys):
    from oodcore.cli.main import main

    assert (
        main(
            [
                "export",
                "--benchmark",
                "nope",
                "--arch",
                "x",
                "--npz",
                str(tmp_path / "x.npz"),
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no cached run" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_no_method_writes_into_the_cached_arrays(dtype):
    """Every method at its default and at its slider's far end, on read-only logits, features and head (as the
    memory-mapped cache hands them out): a method that wrote into them would raise here."""
    from oodcore.cli.bench_detectors import slider_target

    data = feature_data(n_id=300, n_ood=200, d=64)
    for split in (data.id, data.ood, data.fit):
        for name in ("logits", "features"):
            arr = np.ascontiguousarray(getattr(split, name), dtype=dtype)
            arr.setflags(write=False)
            setattr(split, name, arr)
    for arr in (data.head_weight, data.head_bias):
        arr.setflags(write=False)
    for method in M.available_methods(data):
        if method.trained_on_ood:
            continue
        settings = [method.defaults()]
        for param in method.params:
            target = slider_target(method, param, data)
            if target is not None:
                settings.append({**method.defaults(), param.name: target})
        for params in settings:
            for split in (data.id, data.ood):
                assert np.all(np.isfinite(method.score(data, split, **params))), (method.name, params)
