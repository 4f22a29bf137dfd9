"""The detector benchmark's shape (timings are never asserted): every detector timed, one slider move each."""

import json

import pytest

from oodcore import detectors as M
from oodcore.cli.bench import synthetic_benchmark
from oodcore.cli.bench_detectors import bench_detectors, describe, slider_target


def test_bench_detectors_reports_every_method_and_slider():
    data = synthetic_benchmark(n_id=300, n_ood=100, k=10, d=16)
    out = bench_detectors(data, n_boot=5)
    json.dumps(out)  # JSON-able, for bench --json
    names = {m.name for m in M.available_methods(data)}
    assert set(out["per_method_seconds"]) == names
    assert out["methods_seconds_52k"] == sum(out["per_method_seconds"].values())
    with_params = {m.name for m in M.available_methods(data) if m.params}
    assert set(out["slider_seconds_52k"]) <= with_params
    assert {"knn", "nnguide", "ash_s", "scale", "vim", "react", "dice", "nci", "optfs"} <= set(
        out["slider_seconds_52k"]
    )
    assert all(v >= 0 for v in out["slider_seconds_52k"].values())
    floor = out["product_floor"]
    assert set(floor["seconds"]) == set(floor["counts"]) == {"head", "whiten", "templates"}
    assert floor["floor_s"] == pytest.approx(sum(floor["counts"][k] * t for k, t in floor["seconds"].items()))
    assert len(describe(out)) == 2 and "dense float32 products" in describe(out)[0]


def test_bench_detectors_scores_a_second_copy_from_the_stored_states(tmp_path):
    data = synthetic_benchmark(n_id=300, n_ood=100, k=10, d=16)
    out = bench_detectors(data, n_boot=5, slider=False, folder=tmp_path)
    assert out["from_stored_state"] and set(out["per_method_seconds_cold"]) == set(out["per_method_seconds"])
    assert out["methods_seconds_52k_cold"] == sum(out["per_method_seconds_cold"].values())
    stored = {p.name.split("-")[0] for p in (tmp_path / "fitted").iterdir()}
    assert {"mahalanobis", "vim", "knn.table", "vim.table", "nnguide.guidance", "shaping.row_columns"} <= stored
    assert "from the cache with the run's stored fitted states and tables" in describe(out)[0]


def test_slider_target_moves_off_the_default():
    data = synthetic_benchmark(n_id=50, n_ood=20, k=5, d=8)
    knn_k = M.get("knn").params[0]
    assert slider_target(M.get("knn"), knn_k, data) == 100.0  # the next value on the 1-2-5 ladder after 50
    p = M.get("ash_s").params[0]
    assert slider_target(M.get("ash_s"), p, data) == 99.0  # 90 + 10 steps of 1, clipped to the high end
    eps = [p for p in M.get("odin").params if p.name == "eps"][0]
    assert slider_target(M.get("odin"), eps, data) is None  # no ODIN grid: ε = 0 only


@pytest.mark.subprocess
def test_fit_peak_rss_measures_in_fresh_processes():
    from oodcore.cli.bench_detectors import fit_peak_rss

    out = fit_peak_rss(sizes=(200, 400), d=8, k=3, methods=("mahalanobis",))
    assert set(out["mahalanobis"]) == {200, 400}
    for rec in out["mahalanobis"].values():
        assert rec["peak_mb"] >= rec["inputs_mb"] > 0 and rec["fit_mb"] >= 0
