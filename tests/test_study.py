"""The study view across architectures: pure computations, the Study page and the misfires page's
'fools every architecture' tab, and the new detectors' sliders in the app (AppTest)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from oodcore import detectors as M
from oodcore.evaluation import analysis, study
from oodcore.store import cache
from tests.helpers import add_perturbed_arch
from tests.test_app import APP, TIMEOUT, goto, no_exception

pytestmark = pytest.mark.timeout(900)


# ----------------------------------------------------------------------------- pure computations


def test_fools_every_architecture_is_the_intersection_by_path():
    runs = [
        {
            "arch": "a",
            "paths": np.array(["x", "y", "z", "w"]),
            "passed": np.array([True, True, False, True]),
            "preds": ["c0", "c1", "c2", "c3"],
            "scores": np.array([0.1, 0.2, 0.9, 0.3]),
        },
        {  # another row order, one image this run did not score ("w")
            "arch": "b",
            "paths": np.array(["z", "y", "x"]),
            "passed": np.array([True, True, True]),
            "preds": ["d2", "d1", "d0"],
            "scores": np.array([0.5, 0.05, 0.3]),
        },
    ]
    frame, n_scored = study.fools_every_architecture(runs)
    assert n_scored == 3
    assert set(frame["path"]) == {"x", "y"}
    row = frame.set_index("path").loc["x"]
    assert row["a: predicted"] == "c0" and row["b: predicted"] == "d0"
    assert row["a: score"] == 0.1 and row["b: score"] == 0.3
    # mean rank: y is rank 2/4 in a and 1/3 in b; x is 1/4 and 2/3 -> y first
    assert list(frame["path"]) == ["y", "x"]
    empty, _ = study.fools_every_architecture([{**runs[0], "passed": np.zeros(4, bool)}, runs[1]])
    assert empty.empty


def _frame():
    reports = []
    for arch, top1, aucs in (("a", 0.70, (0.8, 0.9)), ("b", 0.80, (0.85, 0.7)), ("c", 0.90, (0.95, 0.75))):
        results = [
            {"method": m, "params": {}, "auroc": auc, "aupr_out": 0.5, "aupr_in": 0.5, "fpr95": 0.3, "fpr95_in": 0.3}
            for m, auc in zip(("msp", "energy"), aucs)
        ]
        results.append({**results[0], "method": "odin", "auroc": 0.99, "tuned_on": "exposure", "note": "tuned"})
        reports.append(
            {
                "arch": arch,
                "benchmark": "b",
                "protocol": "p",
                "n_id": 10,
                "n_ood": 5,
                "id_top1": top1,
                "results": results,
            }
        )
    return analysis.report_frame(reports)


def test_accuracy_vs_auroc_and_the_matrix_use_default_rows_only():
    frame = _frame()
    points = study.accuracy_vs_auroc(frame, "MSP")
    assert list(points["architecture"]) == ["a", "b", "c"]
    assert points["auroc"].tolist() == pytest.approx([80.0, 85.0, 95.0])
    assert study.accuracy_auroc_correlation(points) == pytest.approx(1.0)
    energy = study.accuracy_vs_auroc(frame, "Energy")
    assert study.accuracy_auroc_correlation(energy) == pytest.approx(-0.5)
    matrix = study.auroc_matrix(frame)
    assert len(matrix) == 6 and not any("tuned" in m for m in matrix["method"])  # 3 archs x 2 untuned methods
    assert study.accuracy_auroc_correlation(points.head(2)) is None


# ----------------------------------------------------------------------------- the app, two architectures


@pytest.fixture(scope="module")
def two_archs(tmp_path_factory, demo_cache):
    root = tmp_path_factory.mktemp("study") / "cache"
    shutil.copytree(demo_cache / "demo", root / "demo")
    add_perturbed_arch(root)
    return root


@pytest.fixture
def study_app(two_archs, monkeypatch):
    monkeypatch.setenv("OODCORE_CACHE", str(two_archs))
    monkeypatch.delenv("OODCORE_READONLY", raising=False)
    return two_archs


@pytest.mark.slow
def test_study_page_shows_both_architectures(study_app):
    at = goto(AppTest.from_file(APP, default_timeout=TIMEOUT).run(), "pages/study.py")
    assert "MSP" in at.selectbox(key="study.method").options
    assert "ASH-S" in at.selectbox(key="study.method").options  # the new detectors join the study
    points = [d.value for d in at.dataframe if "ID top-1 (%)" in d.value.columns][0]
    assert set(points["architecture"]) == {"digits_cnn", "digits_cnn_b"}
    # the same numbers as the engine's report for each architecture
    for arch in ("digits_cnn", "digits_cnn_b"):
        data = cache.load_benchmark(study_app, "demo", arch)
        s_id, s_ood = M.get("msp").score_id_ood(data)
        from oodcore.evaluation.metrics import compute_metrics

        expected = 100 * compute_metrics(s_id, s_ood)["auroc"]
        assert float(points.set_index("architecture").loc[arch, "auroc"]) == pytest.approx(expected, abs=1e-9)
    at.selectbox(key="study.method").set_value("NNGuide").run()
    no_exception(at)
    assert len(at.get("vega_lite_chart")) == 2  # the scatter and the heatmap


@pytest.mark.slow
def test_misfires_fools_every_architecture(study_app):
    at = goto(AppTest.from_file(APP, default_timeout=TIMEOUT).run(), "pages/misfires.py")
    tables = [d.value for d in at.dataframe if "digits_cnn_b: predicted" in d.value.columns]
    assert tables, "no 'fools every architecture' table"
    shown = tables[0]
    # recompute: MSP at the OOD+ operating point, per architecture, intersected by path
    passed = []
    for arch in ("digits_cnn", "digits_cnn_b"):
        data = cache.load_benchmark(study_app, "demo", arch)
        s_id, s_ood = M.get("msp").score_id_ood(data)
        passed.append(set(data.ood.paths[analysis.passes_as_id(s_ood, s_id, s_ood, "ood")].tolist()))
    assert set(shown["path"]) == passed[0] & passed[1] and len(shown) > 0
    captions = [c for img in at.image for c in img.captions if " · " in c and "(" not in c]
    assert captions  # thumbnails captioned with each architecture's predicted class


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,widget",
    [("ash_s", "slider"), ("scale", "slider"), ("nci", "slider"), ("optfs", "slider"), ("nnguide", "select_slider")],
)
def test_new_detectors_get_sliders(demo_cache, monkeypatch, name, widget):
    monkeypatch.setenv("OODCORE_CACHE", str(demo_cache))
    monkeypatch.delenv("OODCORE_READONLY", raising=False)
    at = goto(AppTest.from_file(APP, default_timeout=TIMEOUT).run(), "pages/misfires.py")
    at.selectbox(key="mis.method").select_index(list(M.REGISTRY).index(name)).run()
    no_exception(at)
    method = M.get(name)
    keys = {s.key for s in getattr(at, widget)}
    assert {f"mis.{name}.{p.name}" for p in method.params} <= keys
    p = method.params[0]
    target = p.high if widget == "slider" else 10.0
    if name in ("ash_s", "scale"):
        target = 50.0
    getattr(at, widget)(key=f"mis.{name}.{p.name}").set_value(target).run()
    no_exception(at)
    auroc = [m.value for m in at.metric if m.label == "AUROC"][0]
    data = cache.load_benchmark(demo_cache, "demo", "digits_cnn")
    s_id, s_ood = method.score_id_ood(data, **{p.name: target})
    from oodcore.evaluation.metrics import compute_metrics

    assert auroc == analysis.fmt_pct(compute_metrics(s_id, s_ood)["auroc"])


def test_pages_registry_lists_the_study_page():
    from oodcore.explorer.shell import PAGES

    assert "study.py" in [p[0] for p in PAGES]
    assert isinstance(study.auroc_matrix(_frame()), pd.DataFrame)
