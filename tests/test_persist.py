"""Fitted detector state saved beside the run (issue 9 item 4): written once, read back identical, keyed."""

import shutil

import numpy as np
import pytest

from oodcore import detectors as M
from oodcore.detectors import fitting as FIT
from oodcore.detectors import persist
from oodcore.store import cache


@pytest.fixture
def run_copy(demo_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(demo_cache / "demo", root / "demo", ignore=shutil.ignore_patterns("fitted"))
    return root


def _load(root, writable=True):
    data = cache.load_benchmark(root, "demo", "digits_cnn")
    store = persist.attach(data, cache.arch_dir(root, "demo", "digits_cnn"), writable=writable)
    return data, store


def _all_scores(data):
    return {m.name: np.r_[m.score_id_ood(data)] for m in M.available_methods(data) if not m.trained_on_ood}


def test_flatten_round_trip():
    state = {"a": np.arange(3.0), "b": {"c": 2, "d": 0.5, "e": np.ones((2, 2), np.float32)}}
    arrays = {}
    assert persist._flatten(state, "", arrays)
    back = persist._unflatten(arrays)
    assert back["b"]["c"] == 2 and isinstance(back["b"]["c"], int) and back["b"]["d"] == 0.5
    assert np.array_equal(back["a"], state["a"]) and back["b"]["e"].dtype == np.float32
    assert persist._unflatten({k: v for k, v in [("_#scalar", np.asarray(1.5))]}) == 1.5
    assert not persist._flatten({"memo": object()}, "", {})


@pytest.mark.slow
def test_states_are_fitted_once_per_run_and_read_back_identical(run_copy):
    fresh = cache.load_benchmark(run_copy, "demo", "digits_cnn")
    expected = _all_scores(fresh)  # no store: fitted in memory

    data, store = _load(run_copy)
    first = _all_scores(data)
    folder = cache.arch_dir(run_copy, "demo", "digits_cnn") / persist.FITTED_DIR
    written = sorted(p.name.split("-")[0] for p in folder.glob("*.npz"))
    assert {"mahalanobis", "rel_mahalanobis", "vim", "she", "caref", "fdbd", "nci", "optfs", "temp_scaling"} <= set(
        written
    )
    assert "knn" not in written  # it holds the run's own fit features
    tables = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in folder.glob("*.arrays"))
    for table in ("knn.table", "nnguide.guidance", "vim.table", "shaping.row_columns"):
        assert f"{table}-id" in tables and f"{table}-ood" in tables, (table, tables)
    assert store.saved and not store.loaded

    again, store2 = _load(run_copy)  # a new process, in effect
    second = _all_scores(again)
    assert set(store2.loaded) == set(store.saved) and not store2.saved
    calls = FIT.context_of(again).calls
    assert calls["fit_moments"] == 0 and calls["vim_basis"] == 0  # nothing refitted that was stored
    for name in expected:
        assert np.array_equal(first[name], expected[name]), name
        assert np.array_equal(second[name], expected[name]), name


def test_a_fit_parameter_is_its_own_file_and_damage_means_refit(run_copy):
    data, store = _load(run_copy)
    M.get("optfs").score_id_ood(data, bins=50)
    M.get("optfs").score_id_ood(data, bins=100)
    assert store.path("optfs", {"bins": 50.0}) != store.path("optfs", {"bins": 100.0})
    assert store.path("optfs", {"bins": 50.0}).is_file() and store.path("optfs", {"bins": 100.0}).is_file()
    store.path("optfs", {"bins": 50.0}).write_bytes(b"not an npz")
    again, store2 = _load(run_copy)
    s = M.get("optfs").score_id_ood(again, bins=50)
    assert "optfs" not in store2.loaded and "optfs" in store2.saved  # refitted and rewritten
    assert np.array_equal(np.r_[s], np.r_[M.get("optfs").score_id_ood(data, bins=50)])


def test_a_damaged_table_is_recomputed_identically(run_copy):
    data, store = _load(run_copy)
    first = M.get("knn").score_id_ood(data, k=5)
    folder = cache.arch_dir(run_copy, "demo", "digits_cnn") / persist.FITTED_DIR
    (table,) = folder.glob("knn.table-id-*.arrays")
    (table / "dist.npy").write_bytes(b"garbage")
    again, store2 = _load(run_copy)
    second = M.get("knn").score_id_ood(again, k=5)
    assert "knn.table/id" not in store2.loaded and "knn.table/id" in store2.saved
    assert "knn.table/ood" in store2.loaded
    assert np.array_equal(np.r_[first], np.r_[second])


def test_a_silently_altered_table_is_caught_by_its_checksum_and_by_verify(run_copy):
    from oodcore.cli.main import main

    data, store = _load(run_copy)
    first = M.get("knn").score_id_ood(data, k=5)
    folder = cache.arch_dir(run_copy, "demo", "digits_cnn") / persist.FITTED_DIR
    (table,) = folder.glob("knn.table-id-*.arrays")
    raw = bytearray((table / "dist.npy").read_bytes())
    raw[-3] ^= 0xFF  # same size, one value changed: only the recorded xxh3 checksum can tell
    (table / "dist.npy").write_bytes(bytes(raw))
    assert main(["verify", "--cache-dir", str(run_copy)]) == 1
    assert cache.verify_run(run_copy, "demo", "digits_cnn") == []  # readers of the run are not stopped by it
    assert cache.verify_run(run_copy, "demo", "digits_cnn", fitted=True)
    again, store2 = _load(run_copy)
    assert np.array_equal(np.r_[first], np.r_[M.get("knn").score_id_ood(again, k=5)])  # recomputed, not served
    assert "knn.table/id" not in store2.loaded
    raw[-3] ^= 0xFF
    (table / "dist.npy").write_bytes(bytes(raw[:-8]))  # now truncated as well
    assert main(["verify", "--repair", "--cache-dir", str(run_copy)]) == 0
    assert not table.exists() and main(["verify", "--cache-dir", str(run_copy)]) == 0


def test_the_key_follows_the_run(run_copy):
    data, store = _load(run_copy)
    other = persist.StateStore(store.folder, {**data.meta, "key": "something-else"}, [])
    assert store.path("mahalanobis", {}) != other.path("mahalanobis", {})


def test_read_only_store_never_writes(run_copy):
    data, store = _load(run_copy, writable=False)
    M.get("mahalanobis").score_id_ood(data)
    assert not store.saved
    assert not (cache.arch_dir(run_copy, "demo", "digits_cnn") / persist.FITTED_DIR).exists()


def test_a_finished_run_is_freed_without_the_garbage_collector(demo_cache):
    """A run's fit context, states and per-split tables form no reference cycle: a study that scores one
    architecture after another holds one at a time (a cycle kept ~0.5 GB per 2048-d architecture alive)."""
    import gc
    import weakref

    data = cache.load_benchmark(demo_cache, "demo", "digits_cnn")
    persist.attach(data, demo_cache / "unused", writable=False)
    for name in ("knn", "vim", "nnguide", "ash_p", "mahalanobis", "rel_mahalanobis"):
        M.get(name).score_id_ood(data)
    ctx = weakref.ref(FIT.context_of(data))
    memo = weakref.ref(M.get("knn").state(data)["memo"])
    gc.disable()
    try:
        del data
        assert ctx() is None and memo() is None
    finally:
        gc.enable()
