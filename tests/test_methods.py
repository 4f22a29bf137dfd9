"""Each method against its formula on small hand-made logits."""

import math

import numpy as np
import pytest

from oodcore import detectors as M
from oodcore.store.rundata import OdinGrid
from tests.helpers import make_data

LOGITS_ID = [[4.0, 1.0, 0.0], [2.0, 2.0, 1.0]]
LOGITS_OOD = [[1.0, 1.0, 1.0], [0.5, 0.0, 3.0]]


def naive_softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


@pytest.fixture
def data():
    return make_data(LOGITS_ID, LOGITS_OOD)


def test_msp_is_negative_max_softmax(data):
    s_id, s_ood = M.get("msp").score_id_ood(data)
    assert s_id == pytest.approx([-max(naive_softmax(r)) for r in LOGITS_ID])
    assert s_ood == pytest.approx([-max(naive_softmax(r)) for r in LOGITS_OOD])
    assert s_ood[0] == pytest.approx(-1 / 3)  # uniform logits: maximally uncertain


def test_maxlogit_is_negative_max_logit(data):
    s_id, s_ood = M.get("maxlogit").score_id_ood(data)
    assert list(s_id) == [-4.0, -2.0] and list(s_ood) == [-1.0, -3.0]


@pytest.mark.parametrize("t", [1.0, 0.5, 10.0])
def test_energy_is_free_energy(data, t):
    s_id, _ = M.get("energy").score_id_ood(data, T=t)
    expected = [-t * math.log(sum(math.exp(v / t) for v in r)) for r in LOGITS_ID]
    assert s_id == pytest.approx(expected)


def test_energy_stable_at_imagenet_scale():
    big = make_data([[900.0, 0.0], [1000.0, 999.0]], [[1.0, 2.0]])
    s_id, _ = M.get("energy").score_id_ood(big, T=0.1)
    assert np.all(np.isfinite(s_id))
    assert s_id[1] == pytest.approx(-0.1 * (10000 + math.log1p(math.exp(-10))))


def test_odin_eps0_is_tempered_msp_from_logits(data):
    s_id, _ = M.get("odin").score_id_ood(data, T=1000.0, eps=0.0)
    assert s_id == pytest.approx([-max(naive_softmax(r, 1000.0)) for r in LOGITS_ID])


def test_odin_eps_needs_grid_and_reads_it(data):
    with pytest.raises(M.MethodUnavailable, match="--odin-grid"):
        M.get("odin").score_id_ood(data, T=1000.0, eps=0.002)
    grid_id = np.arange(2 * 2 * 3, dtype=float).reshape(2, 2, 3)
    grid_ood = -grid_id
    data.odin = OdinGrid(np.array([1.0, 1000.0]), np.array([0.0, 0.001, 0.002]), grid_id, grid_ood)
    s_id, s_ood = M.get("odin").score_id_ood(data, T=1000.0, eps=0.002)
    assert list(s_id) == list(grid_id[:, 1, 2]) and list(s_ood) == list(grid_ood[:, 1, 2])
    with pytest.raises(M.MethodUnavailable, match="not on the cached grid"):
        M.get("odin").score_id_ood(data, T=10.0, eps=0.002)


def test_higher_score_means_more_ood_on_clear_cases():
    data = make_data([[10.0, 0.0, 0.0]], [[0.1, 0.0, 0.05]])
    for name in ("msp", "maxlogit", "energy", "odin"):
        s_id, s_ood = M.get(name).score_id_ood(data)
        assert s_ood[0] > s_id[0], name


def test_registry_specs_are_usable():
    for method in M.REGISTRY.values():
        assert method.paper, method.name
        for p in method.params:
            assert p.low <= p.default <= p.high and p.scale in ("linear", "log")
            if p.scale == "log":
                assert p.low > 0
    with pytest.raises(ValueError, match="no parameter"):
        M.get("energy").resolve({"eps": 1})
    with pytest.raises(ValueError, match="unknown method"):
        M.get("nope")


def test_exp_floor_leaves_the_log_sum_exp_bit_identical():
    """The lse functions raise exponent arguments below -700 before np.exp (its slow path for underflow); each
    row's sum holds exp(0) = 1, so the values equal the plain formula's bit for bit, on any logit spread."""
    from oodcore.detectors import numerics as N

    rng = np.random.default_rng(0)
    for spread in (1.0, 100.0, 1e4, 1e13):
        z = rng.standard_normal((300, 50)) * spread
        z[0, :] = -np.inf
        z[0, 3] = 5.0  # one finite logit
        plain = z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))
        assert np.array_equal(N.logsumexp(z), plain), spread
        b = rng.standard_normal(50)
        zb = z.astype(np.float32) + b
        plain_b = zb.max(axis=1) + np.log(np.exp(zb - zb.max(axis=1, keepdims=True)).sum(axis=1))
        assert np.array_equal(N.bias_logsumexp(z.astype(np.float32), b), plain_b), spread
        r = np.exp(rng.uniform(0, 30, len(z)))
        zr = (z.astype(np.float32).astype(np.float64) - b) * r[:, None] + b
        plain_r = zr.max(axis=1) + np.log(np.exp(zr - zr.max(axis=1, keepdims=True)).sum(axis=1))
        assert np.array_equal(N.rescaled_logsumexp(z.astype(np.float32), r, b), plain_r), spread


@pytest.mark.parametrize("name", ["entropy", "gen", "kl_matching", "temp_scaling", "msp", "energy"])
def test_threaded_row_chunks_equal_one_chunk_after_another(name, monkeypatch):
    """Scoring on both cores (map_row_chunks) gives the same scores as the sequential loop, bit for bit."""
    from oodcore.detectors import numerics as N
    from tests.test_methods_zoo import feature_data

    data = feature_data(n_id=3000, n_ood=500, k=40, d=12)
    monkeypatch.setattr(N, "CHUNK_BYTES", 64 << 10)  # many chunks
    monkeypatch.setattr(N, "_WORKERS", 2)
    threaded = M.get(name).score_id_ood(data)
    monkeypatch.setattr(N, "_WORKERS", 1)
    data.states.clear()
    sequential = M.get(name).score_id_ood(data)
    for a, b in zip(threaded, sequential):
        assert np.array_equal(a, b)
