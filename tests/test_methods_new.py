"""ASH-B/-P/-S, SCALE, OptFS, NCI, fDBD, CARef and NNGuide against hand computations on small arrays.

(The ones pytorch-ood 0.4.0 also has are cross-checked against it in test_crosscheck_pytorch_ood.py.)
"""

import dataclasses

import numpy as np
import pytest

from oodcore import detectors as M
from oodcore.detectors import fitting as FIT
from oodcore.detectors import search
from oodcore.evaluation.metrics import compute_metrics
from oodcore.store import cache
from oodcore.store.rundata import SplitArrays
from tests.test_methods_zoo import feature_data

NEW = ["ash_b", "ash_p", "ash_s", "scale", "nci", "fdbd", "nnguide", "optfs", "caref"]


def energy(logits):
    logits = np.asarray(logits, dtype=np.float64)
    m = logits.max(axis=1)
    return -(m + np.log(np.exp(logits - m[:, None]).sum(axis=1)))


def head_of(data):
    return np.asarray(data.head_weight, np.float64), np.asarray(data.head_bias, np.float64)


def hand_shape(f, p, variant):
    """One row at a time, with Python sorting: keep the k = D - round(D p/100) largest (first index on ties)."""
    out = []
    for row in np.asarray(f, dtype=np.float64):
        d = len(row)
        k = d - int(round(d * p / 100))
        keep = sorted(range(d), key=lambda i: (-row[i], i))[:k]
        s1, s2 = row.sum(), row[keep].sum()
        shaped = np.zeros(d)
        if variant == "scale":
            shaped = row * np.exp(s1 / s2)
        elif variant == "b":
            shaped[keep] = s1 / k
        else:
            shaped[keep] = row[keep] * (np.exp(s1 / s2) if variant == "s" else 1.0)
        out.append(shaped)
    return np.array(out)


@pytest.mark.parametrize("p", [0.0, 30.0, 60.0, 65.0, 90.0, 62.5])  # 62.5: not a whole percentage (direct path)
@pytest.mark.parametrize("variant", ["b", "p", "s", "scale"])
def test_ash_and_scale_by_hand(variant, p):
    data = feature_data(d=8)
    w, b = head_of(data)
    name = "scale" if variant == "scale" else f"ash_{variant}"
    for split in (data.id, data.ood):
        expected = energy(hand_shape(split.features, p, variant) @ w.T + b)
        assert M.get(name).score(data, split, p=p) == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("p", [30.0, 85.0])
def test_scale_rescales_the_cached_logits_only_when_they_are_the_heads_output(p):
    """SCALE reads a split's cached logits when they are the head's output on its features, and otherwise
    multiplies the scaled features by the head: both paths give the hand computation."""
    from oodcore.detectors.head import head_logits

    data = feature_data(d=8)
    w, b = head_of(data)
    expected = energy(hand_shape(data.id.features, p, "scale") @ w.T + b)
    state = M.get("scale").state(data)["head"]
    assert head_logits(state, data.id) is data.id.logits
    assert M.get("scale").score(data, data.id, p=p) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    rng = np.random.default_rng(1)
    for other in (  # logits that are not this head's output: another head, or reduced precision
        data.id.logits + rng.normal(0, 1, data.id.logits.shape),
        (data.id.logits * 50).astype(np.float16).astype(np.float64) / 50 + 0.05,
    ):
        odd = dataclasses.replace(data.id, logits=other)
        assert head_logits(state, odd) is None
        assert M.get("scale").score(data, odd, p=p) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("variant", ["b", "p", "s"])
def test_ash_sparse_product_equals_the_dense_one(variant, monkeypatch):
    """At a high p the pruned rows go through scipy's CSR product: the same energies as the dense product
    (float32 sums in another order), and the hand computation."""
    from oodcore.detectors import shaping

    data = feature_data(d=64, n_id=200, n_ood=100)
    name = f"ash_{variant}"
    w, b = head_of(data)
    expected = energy(hand_shape(data.id.features, 97.0, variant) @ w.T + b)
    calls = []
    real = shaping._sparse_energy
    monkeypatch.setattr(shaping, "_sparse_energy", lambda *a: calls.append(1) or real(*a))
    sparse = M.get(name).score(data, data.id, p=97.0)  # 2 of 64 kept: within SPARSE_SHARE
    n_sparse = len(calls)
    assert n_sparse > 0
    monkeypatch.setattr(shaping, "sparse_module", lambda: None)  # the light core: no scipy
    dense = M.get(name).score(data, data.id, p=97.0)
    assert len(calls) == n_sparse  # the dense product this time
    assert sparse == pytest.approx(dense, rel=1e-6, abs=1e-6)
    assert sparse == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_ash_sparse_product_reads_each_rows_kept_count_off_the_mask():
    """The CSR rows are laid out from the mask itself (here 0 to 5 kept per row), not from an assumed k per row."""
    from oodcore.detectors import shaping

    data = feature_data(d=16, n_id=6, n_ood=5)
    state = M.get("ash_p").state(data)
    w, b = head_of(data)
    f = np.asarray(data.id.features, dtype=np.float32)
    keep = np.zeros(f.shape, dtype=bool)
    for i in range(len(f)):
        keep[i, :i] = True
    factor = np.linspace(0.5, 2.0, len(f)).astype(np.float32)
    for values, rows in ((f, None), (f, factor), (None, factor)):
        x = (keep * (values if values is not None else 1.0)) * (rows[:, None] if rows is not None else 1.0)
        got = shaping._sparse_energy(values, keep, rows, state)
        assert got == pytest.approx(energy(x.astype(np.float64) @ w.T + b), rel=1e-5, abs=1e-5)


def test_ash_p_prunes_a_non_finite_activation_to_zero():
    """ASH-P zeroes pruned activations by a product with the mask; a pruned -inf must still become 0 (not NaN)."""
    data = feature_data(d=8, n_id=30, n_ood=20)
    f = np.array(data.id.features, dtype=np.float32)
    f[3, int(np.argmin(f[3]))] = -np.inf  # the row's smallest: pruned at p = 60
    data.id = SplitArrays(data.id.logits, f, data.id.labels, data.id.paths)
    w, b = head_of(data)
    got = M.get("ash_p").score(data, data.id, p=60.0)
    assert np.all(np.isfinite(got))
    assert got == pytest.approx(energy(hand_shape(np.where(np.isfinite(f), f, -1e30), 60.0, "p") @ w.T + b), rel=1e-5)


def test_ash_keeps_exactly_k_on_ties():
    data = feature_data(d=6)
    f = np.array([[3.0, 1.0, 1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    data.id = SplitArrays(f @ data.head_weight.T + data.head_bias, f, np.array([0, 1]), np.array(["a", "b"]))
    w, b = head_of(data)
    for variant in ("b", "p", "s"):
        got = M.get(f"ash_{variant}").score(data, data.id, p=50.0)  # k = 3 of 6: one of the tied 1.0s is cut
        assert got == pytest.approx(energy(hand_shape(f, 50.0, variant) @ w.T + b), rel=1e-6)


def test_ash_slider_reads_one_table_and_refuses_p_100():
    data = feature_data(d=8)
    for p in (10.0, 50.0, 90.0):
        M.get("ash_s").score_id_ood(data, p=p)
        M.get("scale").score_id_ood(data, p=p)
    state = M.get("ash_s").state(data)
    assert state is M.get("scale").state(data)  # one shared state, one table per split
    assert len(state["memo"]._store) == 2
    assert FIT.context_of(data).calls["shaping_head"] == 1
    with pytest.raises(ValueError, match="outside"):
        M.get("ash_p").score_id_ood(data, p=100.0)
    # on D = 8, p = 99 would keep no activation: the largest one is kept
    w, b = head_of(data)
    f = np.asarray(data.id.features, np.float64)
    top = np.where(f == f.max(axis=1, keepdims=True), f, 0.0)
    assert M.get("ash_p").score(data, data.id, p=99.0) == pytest.approx(energy(top @ w.T + b), rel=1e-6)


def test_optfs_bin_index_is_searchsorted_on_any_values():
    """OptFS's arithmetic bin estimate plus its correction equals a binary search over the bin edges, with the
    authors' "x < left + width" for the last bin, on random edges and values, edge values, NaN and ±inf."""
    from oodcore.detectors.shaping import _bin_index

    rng = np.random.default_rng(0)
    for _ in range(200):
        n, lo, width = int(rng.integers(1, 300)), rng.normal(), float(rng.uniform(1e-3, 2))
        lefts = np.arange(lo, lo + n * width, width)[:n]
        n = len(lefts)
        x = rng.normal(lo + n * width / 2, n * width, size=(40, 30))
        x[0, : min(5, n)], x[1, : min(5, n)] = lefts[:5], (lefts + width)[:5]  # exactly on edges
        x[2, :4] = [np.nan, np.inf, -np.inf, 1e300]
        idx, inside = _bin_index(x, lefts, width)
        ref = np.searchsorted(lefts, x, "right") - 1
        ref_inside = (ref >= 0) & (x < lefts[np.clip(ref, 0, n - 1)] + width)
        assert np.array_equal(inside, ref_inside) and np.array_equal(idx[inside], ref[inside])


def test_optfs_against_the_authors_masks():
    """The authors' loop: bins [left_i, left_i + width) from np.arange over the 0.1-99.9% quantiles, θ = I / ||I|| 1000."""
    data = feature_data(d=6, n_fit=200)
    w, _ = head_of(data)
    ff = np.asarray(data.fit.features, np.float64)
    lo, hi = np.quantile(ff, 1e-3), np.quantile(ff, 1 - 1e-3)
    width = (hi - lo) / 100.0
    lefts = np.arange(lo, hi, width)
    pred = data.fit.logits.argmax(1)
    lc = w[pred] * ff
    impact = np.array([np.mean(np.sum(((ff >= x) & (ff < x + width)) * lc, axis=1)) for x in lefts])
    theta = impact / np.linalg.norm(impact) * 1000
    state = M.get("optfs").state(data)
    assert state["theta"] == pytest.approx(theta, rel=1e-9, abs=1e-9)
    for split in (data.id, data.ood):
        f = np.asarray(split.features, np.float64)
        shaped = np.zeros_like(f)
        for i, x in enumerate(lefts):
            shaped += ((f >= x) & (f < x + width)) * f * theta[i]
        expected = -np.sum(w[split.logits.argmax(1)] * shaped, axis=1)
        assert M.get("optfs").score(data, split) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_caref_is_relative_l1_error_to_the_predicted_class_mean():
    data = feature_data(d=5)
    ff, pred = np.asarray(data.fit.features, np.float64), data.fit.logits.argmax(1)
    means = np.array([ff[pred == c].mean(axis=0) for c in range(3)])
    for split in (data.id, data.ood):
        f = np.asarray(split.features, np.float64)
        m = means[split.logits.argmax(1)]
        expected = np.abs(f - m).sum(1) / np.abs(f).sum(1)
        assert M.get("caref").score(data, split) == pytest.approx(expected, rel=1e-12)


def test_caref_falls_back_for_a_class_nothing_is_predicted_as():
    data = feature_data(d=4)
    keep = data.fit.logits.argmax(1) != 2  # no fit row predicted as class 2
    data.fit = SplitArrays(data.fit.logits[keep], data.fit.features[keep], data.fit.labels[keep], data.fit.paths[keep])
    state = M.get("caref").state(data)
    assert list(state["fallback"]) == [2]
    labelled = data.fit.features[data.fit.labels == 2]
    expected = labelled.mean(0) if len(labelled) else data.fit.features.mean(0)
    assert state["means"][2] == pytest.approx(expected)


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_nci_by_hand(alpha):
    data = feature_data(d=5)
    w, _ = head_of(data)
    mu = np.asarray(data.fit.features, np.float64).mean(0)
    for split in (data.id, data.ood):
        rows = []
        for f, lg in zip(np.asarray(split.features, np.float64), split.logits):
            c = int(np.argmax(lg))
            rows.append(-(f - mu) @ w[c] / np.linalg.norm(f - mu) - alpha * np.abs(f).sum())
        assert M.get("nci").score(data, split, alpha=alpha) == pytest.approx(rows, rel=1e-10)


def test_fdbd_by_hand():
    data = feature_data(d=5)
    w, b = head_of(data)
    mu = np.asarray(data.fit.features, np.float64).mean(0)
    for split in (data.id, data.ood):
        rows = []
        for f in np.asarray(split.features, np.float64):
            lg = w @ f + b
            c = int(np.argmax(lg))
            terms = [abs(lg[c] - lg[j]) / np.linalg.norm(w[c] - w[j]) for j in range(len(lg)) if j != c]
            rows.append(-np.mean(terms) / np.linalg.norm(f - mu))
        assert M.get("fdbd").score(data, split) == pytest.approx(rows, rel=1e-9)


@pytest.mark.parametrize("k", [1, 7, 100, 10_000])
def test_nnguide_by_brute_force(k):
    data = feature_data(d=5, n_fit=150)
    ff = np.asarray(data.fit.features, np.float64)
    conf_fit = -energy(data.fit.logits)
    bank = ff / np.linalg.norm(ff, axis=1, keepdims=True) * conf_fit[:, None]
    for split in (data.id, data.ood):
        f = np.asarray(split.features, np.float64)
        sims = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ bank.T
        kk = min(k, len(ff))
        guidance = -np.sort(-sims, axis=1)[:, :kk].mean(1)
        expected = -guidance * -energy(split.logits)
        assert M.get("nnguide").score(data, split, k=k) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("k", [1, 10, 64])
def test_faiss_and_numpy_search_agree(k):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    a = search.top_neighbours(q, bank, k, use_faiss=True)[0]
    b = search.top_neighbours(q, bank, k, use_faiss=False)[0]
    exact = -np.sort(-(q.astype(np.float64) @ bank.T.astype(np.float64)), axis=1)[:, :k]
    assert a.shape == b.shape == (50, k)
    assert np.allclose(a, exact, atol=1e-5) and np.allclose(b, exact, atol=1e-5)


@pytest.mark.parametrize("use_faiss", [True, False])
def test_a_bank_searched_block_by_block_equals_one_search(use_faiss, monkeypatch):
    """An ImageNet-train-sized fit set is searched in blocks (memory bounded by the block): same neighbours."""
    if use_faiss:
        pytest.importorskip("faiss")
    else:
        monkeypatch.setattr(search, "faiss_module", lambda: None)
    rng = np.random.default_rng(1)
    feats = np.abs(rng.normal(size=(1000, 24))).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 1000).astype(np.float32)
    q = search.normalised32(np.abs(rng.normal(size=(70, 24))).astype(np.float32))
    for k in (1, 7, 300):
        whole = search.Bank(feats, scale).search(q, k)
        blocks = search.Bank(feats, scale, block_rows=128).search(q, k)  # 8 blocks, merged
        np.testing.assert_array_equal(blocks[0], whole[0])  # the same similarities, bit for bit
        # each returned row really has that similarity (rows differ only where similarities tie exactly)
        bank = search.normalised32(feats) * scale[:, None]
        np.testing.assert_allclose(np.take_along_axis(q @ bank.T, blocks[1], axis=1), blocks[0], atol=1e-6)
        assert np.mean(blocks[1] == whole[1]) > 0.99
        exact = -np.sort(
            -(q.astype(np.float64) @ (search.normalised32(feats) * scale[:, None]).T.astype(np.float64)), axis=1
        )
        np.testing.assert_allclose(whole[0], exact[:, :k], atol=1e-5)


def test_new_methods_need_what_they_declare():
    data = feature_data()
    data.fit = None
    for name in ("ash_b", "ash_p", "ash_s", "scale"):  # no fit split needed: only the head
        assert M.get(name).available(data), name
    for name in ("nci", "fdbd", "nnguide", "optfs", "caref"):
        assert not M.get(name).available(data), name


def test_registry_entries_of_the_new_methods():
    for name in NEW:
        method = M.get(name)
        assert method.paper and method.summary and "\n" not in method.paper
        for p in method.params:
            assert p.low <= p.default <= p.high and p.help
    assert [p.fit for p in M.get("optfs").params] == [True]  # bins change the fitted θ
    assert not any(p.fit for n in NEW if n != "optfs" for p in M.get(n).params)  # the rest are slider-only


@pytest.fixture(scope="module")
def demo(demo_cache):
    return cache.load_benchmark(demo_cache, "demo", "digits_cnn")


@pytest.mark.parametrize("name", NEW)
def test_new_methods_on_the_demo(demo, name):
    s_id, s_ood = M.get(name).score_id_ood(demo)
    assert np.all(np.isfinite(s_id)) and np.all(np.isfinite(s_ood))
    auroc = compute_metrics(s_id, s_ood)["auroc"]
    # ASH-S at the paper's ImageNet p = 90 keeps 6 of the demo CNN's 64 activations: below chance here
    assert auroc > 0.5 or name == "ash_s", (name, auroc)


def _old_knn(fit_feats, feats, k):
    """The exact numpy KNN before faiss and the per-split table (float32 similarities, partition, float64 distance)."""

    def norm(x):
        return np.asarray(x, np.float64) / np.maximum(
            np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True), 1e-12
        )  # noqa: E731

    inv = (1.0 / np.maximum(np.linalg.norm(np.asarray(fit_feats, np.float64), axis=1), 1e-12)).astype(np.float32)
    n_fit = len(fit_feats)
    kk = int(min(max(1, round(k)), n_fit))
    q = norm(feats)
    sims = q.astype(np.float32) @ np.asarray(fit_feats, np.float32).T
    sims *= inv
    kth = np.partition(sims, n_fit - kk, axis=1)[:, n_fit - kk]
    idx = (sims == kth[:, None]).argmax(axis=1)
    diff = q - norm(np.asarray(fit_feats)[idx])
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


@pytest.mark.parametrize("use_faiss", [True, False])
def test_knn_equals_the_previous_exact_numpy_code(demo, monkeypatch, use_faiss):

    if use_faiss:
        pytest.importorskip("faiss")
    else:
        monkeypatch.setattr(search, "faiss_module", lambda: None)
    data = dataclasses.replace(demo, states={})
    fit = np.asarray(data.fit.features, np.float64)
    fit /= np.linalg.norm(fit, axis=1, keepdims=True)
    for k in (1, 5, 50, 200, 37):  # 37: not on the slider's ladder (one direct search)
        for split in (data.id, data.ood):
            ours = M.get("knn").score(data, split, k=k)
            q = np.asarray(split.features, np.float64)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            exact = np.sort(np.sqrt(((q[:, None, :] - fit[None]) ** 2).sum(-1)), axis=1)[:, k - 1]
            assert np.allclose(ours, exact, rtol=1e-12, atol=1e-14), k  # the exact float64 k-th distance
            # the previous code selected by float32 similarities: the same up to near-ties (|Δ| < 1e-6)
            assert np.allclose(ours, _old_knn(data.fit.features, split.features, k), rtol=0, atol=1e-6), k
    state = M.get("knn").state(data)
    index, rows = state["bank"]._single()
    assert (index is not None) == use_faiss and (rows is None) == use_faiss
    assert len(state["memo"]._store) == 2  # one neighbour table per split, every ladder k a column


def test_chunked_percentile_is_numpys_percentile(monkeypatch):
    from oodcore.detectors import numerics

    monkeypatch.setattr(numerics, "CHUNK_BYTES", 256)  # many chunks
    rng = np.random.default_rng(1)
    for trial in range(60):
        n, d = int(rng.integers(1, 300)), int(rng.integers(1, 9))
        x = (rng.standard_normal((n, d)) * rng.choice([1e-3, 1.0, 100.0])).astype(np.float32)
        if trial % 3 == 0:
            x = np.abs(x)
        if trial % 5 == 0:
            x = np.round(x, 1)
        for q in (0.0, 0.1, 50.0, 90.0, 99.9, 100.0, float(rng.uniform(0, 100))):
            ours, ref = numerics.chunked_percentile(x, q), np.percentile(x, q)
            assert ours == ref and ours.dtype == ref.dtype, (n, d, q)


def test_react_threshold_unchanged(demo):
    data = dataclasses.replace(demo, states={})
    for p in (50.0, 90.0, 99.0):
        assert M.get("react").state(data, p=p)["clip"] == float(np.percentile(demo.fit.features, p))


def test_row_chunks_run_side_by_side_give_the_sequential_result(monkeypatch):
    """map_row_chunks (threads, one-thread BLAS each) scores row for row as one chunk after another does."""
    from oodcore.detectors import numerics

    data = feature_data(n_id=1500, n_ood=700, d=12)  # several chunks of 256 rows (the product loops' minimum)
    monkeypatch.setattr(numerics, "CHUNK_BYTES", 4096)  # many chunks
    calls = []
    real = numerics.row_chunks
    monkeypatch.setattr(numerics, "row_chunks", lambda *a, **k: calls.append(list(real(*a, **k))) or iter(calls[-1]))
    results = {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(numerics, "_WORKERS", workers)
        results[workers] = [
            np.r_[M.get(name).score_id_ood(data)] for name in ("ash_p", "ash_b", "ash_s", "scale", "react", "optfs")
        ]
    assert max(len(c) for c in calls) >= 5  # the loops really ran in several chunks
    for workers in (2, 3):
        for a, b in zip(results[1], results[workers]):
            np.testing.assert_array_equal(a, b)
