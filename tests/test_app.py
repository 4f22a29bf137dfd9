"""The Streamlit explorer under streamlit.testing.v1.AppTest, against a demo cache built once per session.

The session's demo cache is built by the app's own first-run path (app.py with an empty
cache), so that path is exercised for real; every other test reuses the result.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from streamlit.testing.v1 import AppTest

from tests.helpers import demo_cache_dir, demo_is_built, record

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
CACHE_PAGES = ["pages/leaderboard.py", "pages/study.py", "pages/curves.py", "pages/odin_tuner.py", "pages/misfires.py"]
PAGES = CACHE_PAGES + ["pages/score_image.py"]
TITLES = {
    "pages/leaderboard.py": "Leaderboard",
    "pages/study.py": "Study",
    "pages/curves.py": "Curves",
    "pages/odin_tuner.py": "ODIN tuner",
    "pages/misfires.py": "Misfires",
    "pages/score_image.py": "Score an image",
}
TIMEOUT = 60  # seconds per AppTest run (the first leaderboard run bootstraps every method)
ARTIFACTS = ROOT / "artifacts"

pytestmark = pytest.mark.timeout(900)


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture(scope="session")
def first_run(tmp_path_factory):
    """app.py on an empty cache: it builds the demo benchmark, then shows it. Returns (root, AppTest | None)."""
    root = demo_cache_dir(tmp_path_factory)
    if demo_is_built(root):
        return root, None  # built earlier in this session (conftest's demo_cache)
    root.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("OODCORE_CACHE")
    os.environ["OODCORE_CACHE"] = str(root)
    try:
        started = time.perf_counter()
        at = AppTest.from_file(APP, default_timeout=600).run()
        record("first_run_build_seconds", round(time.perf_counter() - started, 1))
    finally:
        if saved is None:
            os.environ.pop("OODCORE_CACHE", None)
        else:
            os.environ["OODCORE_CACHE"] = saved
    return root, at


@pytest.fixture
def demo_cache(first_run, monkeypatch) -> Path:
    root, _ = first_run
    monkeypatch.setenv("OODCORE_CACHE", str(root))
    monkeypatch.delenv("OODCORE_READONLY", raising=False)
    return root


@pytest.fixture
def demo_data(demo_cache):
    from oodcore.store import cache

    return cache.load_benchmark(demo_cache, "demo", "digits_cnn")


def app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(query)
    return at.run()


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    no_exception(at)
    assert [t.value for t in at.title] == [TITLES[page]]
    return at


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no st.metric labelled {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


# ---------------------------------------------------------------- first run, navigation, standalone pages


@pytest.mark.slow
def test_first_run_builds_the_demo_and_shows_it(first_run, tmp_path, monkeypatch):
    root, at = first_run
    if at is None:  # the shared cache existed already: exercise the path on a fresh one
        root = tmp_path / "fresh"
        monkeypatch.setenv("OODCORE_CACHE", str(root))
        at = AppTest.from_file(APP, default_timeout=600).run()
    no_exception(at)
    assert (root / "demo" / "digits_cnn" / "run.json").is_file()
    assert [t.value for t in at.title] == ["Leaderboard"]  # rerun after the build lands on the first page
    assert metric(at, "Images (ID / OOD)").replace(",", "") == "360 / 896"


@pytest.mark.parametrize("page", PAGES)
def test_every_page_through_the_app_navigation(demo_cache, page):
    at = app()
    no_exception(at)
    goto(at, page)
    assert [s.key for s in at.sidebar.selectbox][:2] == ["bench", "arch"]
    assert at.sidebar.selectbox(key="bench").value == "demo"


@pytest.mark.parametrize("page", PAGES)
def test_a_page_run_on_its_own_points_to_the_app(demo_cache, page):
    """Pages are views inside app.py's navigation; `streamlit run pages/x.py` says how to start the explorer."""
    at = AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT).run()
    no_exception(at)
    assert any("streamlit run app.py" in i.value for i in at.info)
    assert not at.title and not at.sidebar.selectbox


def test_app_with_no_cache_in_readonly_mode_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("OODCORE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("OODCORE_READONLY", "1")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    no_exception(at)
    assert any("python -m oodcore demo" in i.value for i in at.info)
    assert not (tmp_path / "empty").exists()  # read-only: nothing written


def test_readonly_hides_work_pages(demo_cache, monkeypatch):
    monkeypatch.setenv("OODCORE_READONLY", "1")
    at = app()
    no_exception(at)
    goto(at, "pages/misfires.py")
    with pytest.raises(ValueError):
        at.switch_page("pages/score_image.py")  # not a registered navigation page
    alone = AppTest.from_file(str(ROOT / "pages/score_image.py"), default_timeout=TIMEOUT).run()
    no_exception(alone)
    assert not alone.file_uploader  # on its own a page only points to the app


@pytest.mark.slow
def test_selection_carries_across_pages(demo_cache, tmp_path, monkeypatch):
    """Two architectures: both appear on the leaderboard; the sidebar's pick survives page switches."""
    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    twin = root / "demo" / "digits_cnn_twin"
    shutil.copytree(root / "demo" / "digits_cnn", twin)
    run = json.loads((twin / "run.json").read_text())
    run["arch"] = "digits_cnn_twin"
    (twin / "run.json").write_text(json.dumps(run))
    monkeypatch.setenv("OODCORE_CACHE", str(root))
    at = app()
    no_exception(at)
    table = at.dataframe[0].value
    assert set(table["architecture"]) == {"digits_cnn", "digits_cnn_twin"}
    at.sidebar.selectbox(key="arch").set_value("digits_cnn_twin").run()
    for page in ("pages/odin_tuner.py", "pages/misfires.py", "pages/curves.py"):
        goto(at, page)
        assert at.sidebar.selectbox(key="arch").value == "digits_cnn_twin"
    assert "digits_cnn_twin · MSP" in at.multiselect(key="curves.pairs").value


# ---------------------------------------------------------------- leaderboard and curves


def test_a_damaged_stored_table_does_not_block_the_leaderboard(demo_cache, tmp_path, monkeypatch):
    """Fitted states and per-split tables are recomputed on use: the leaderboard never reports them as a damaged run."""
    from oodcore import detectors as M
    from oodcore.detectors.persist import attach
    from oodcore.store import cache

    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    data = cache.load_benchmark(root, "demo", "digits_cnn")
    attach(data, cache.arch_dir(root, "demo", "digits_cnn"))
    M.get("knn").score_id_ood(data)  # stores knn's tables
    (table,) = (cache.arch_dir(root, "demo", "digits_cnn") / "fitted").glob("knn.table-id-*.arrays")
    (table / "dist.npy").write_bytes(b"garbage")
    monkeypatch.setenv("OODCORE_CACHE", str(root))
    at = app()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert "KNN" in set(at.dataframe[0].value["method"])


def test_leaderboard_rows_say_protocol_counts_and_tuning(demo_cache):
    at = app()
    no_exception(at)
    table = at.dataframe[0].value
    from oodcore import detectors as methods

    assert {"MSP", "MaxLogit", "Energy", "ODIN", "ODIN (tuned)"} <= set(table["method"])
    assert len(table) >= len(methods.REGISTRY)
    assert set(table["protocol"]) == {"digits 0-4 vs 5-9"}
    assert set(table["n_id"]) == {360}
    tuned = table[table["method"] == "ODIN (tuned)"].iloc[0]
    assert tuned["n_ood"] == 448 and "exposure split" in tuned["tuned with OOD data"]
    assert (table[table["method"] == "MSP"]["tuned with OOD data"] == "no").all()
    for k in ("auroc", "aupr_out", "aupr_in", "fpr95", "fpr95_in"):
        assert (table[f"{k}_lo"] <= table[k] + 1e-9).all() and (table[k] <= table[f"{k}_hi"] + 1e-9).all()
    assert [b.label for b in at.download_button] == ["Download CSV"]


def test_curves_empty_selection_is_a_message(demo_cache):
    at = goto(app(), "pages/curves.py")
    at.multiselect(key="curves.pairs").set_value([]).run()
    no_exception(at)
    assert any("Pick at least one" in i.value for i in at.info)


# ---------------------------------------------------------------- ODIN tuner


def engine_auroc(data, T, eps) -> float:
    from oodcore import detectors as methods

    s_id, s_ood = methods.get("odin").score_id_ood(data, T=T, eps=eps)
    y = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
    return roc_auc_score(y, np.r_[s_id, s_ood])


def test_odin_sliders_drive_the_metrics(demo_cache, demo_data):
    at = goto(app(), "pages/odin_tuner.py")
    default = metric(at, "AUROC")
    assert default == f"{100 * engine_auroc(demo_data, 1000.0, 0.0):.2f}%"
    started = time.perf_counter()
    at.select_slider(key="T").set_value(10.0).run()
    record("apptest_odin_T_slider_move_seconds", round(time.perf_counter() - started, 3))
    no_exception(at)
    assert metric(at, "AUROC") == f"{100 * engine_auroc(demo_data, 10.0, 0.0):.2f}%" != default
    started = time.perf_counter()
    at.select_slider(key="eps").set_value(0.001).run()
    record("apptest_odin_eps_slider_move_seconds", round(time.perf_counter() - started, 3))
    no_exception(at)
    assert metric(at, "AUROC") == f"{100 * engine_auroc(demo_data, 10.0, 0.001):.2f}%"
    # eps > 0 at a T off the cached grid: a message, not an error
    at.select_slider(key="T").set_value(20.0).run()
    no_exception(at)
    assert any("precomputed only at" in w.value for w in at.warning)


def test_odin_setting_comes_from_the_url(demo_cache, demo_data):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/odin_tuner.py")
    at.query_params.update({"T": "100", "eps": "0.0005"})
    at.run()
    no_exception(at)
    assert at.select_slider(key="T").value == 100.0 and at.select_slider(key="eps").value == 0.0005
    assert metric(at, "AUROC") == f"{100 * engine_auroc(demo_data, 100.0, 0.0005):.2f}%"


def test_odin_honest_vs_naive_tuning(demo_cache, demo_data):
    from oodcore import detectors as methods
    from oodcore.data import splits
    from oodcore.evaluation import report as evaluation

    at = goto(app(), "pages/odin_tuner.py")
    split = splits.ood_split(len(demo_data.ood))
    best, _ = evaluation.tune_on_exposure(methods.get("odin"), demo_data, split)
    s_id, s_ood = methods.get("odin").score_id_ood(demo_data, **best)
    y = np.r_[np.zeros(len(s_id)), np.ones(len(split.heldout))]
    honest = roc_auc_score(y, np.r_[s_id, s_ood[split.heldout]])
    assert metric(at, "Tuned on the exposure split → held-out AUROC") == f"{100 * honest:.2f}%"
    naive = float(metric(at, "Tuned on the test set (naive) → AUROC").rstrip("%"))
    assert naive >= round(100 * honest, 2)  # choosing on the test set can only look better
    at.button[0].click().run()  # "Use the honest setting" moves the sliders
    no_exception(at)
    assert at.select_slider(key="T").value == best["T"] and at.select_slider(key="eps").value == best["eps"]


def test_odin_without_a_grid_fixes_eps_and_says_how(demo_cache, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    run_file = root / "demo" / "digits_cnn" / "run.json"
    run = json.loads(run_file.read_text())
    for k in ("odin_id", "odin_ood"):
        run["files"].pop(k)
    run_file.write_text(json.dumps(run))
    monkeypatch.setenv("OODCORE_CACHE", str(root))
    at = goto(app(), "pages/odin_tuner.py")
    assert any("--odin-grid" in i.value for i in at.info)
    assert [s.key for s in at.select_slider] == ["T"]
    at.select_slider(key="T").set_value(50.0).run()  # any T works at eps = 0
    no_exception(at)
    from oodcore.store import cache

    data = cache.load_benchmark(root, "demo", "digits_cnn")
    assert metric(at, "AUROC") == f"{100 * engine_auroc(data, 50.0, 0.0):.2f}%"


# ---------------------------------------------------------------- misfires


def test_misfire_gallery_filters_by_predicted_class(demo_cache, demo_data):
    at = goto(app(), "pages/misfires.py")
    captions = [c for img in at.image for c in img.captions]
    assert len(captions) >= 24  # both galleries render thumbnails
    names = demo_data.class_names
    k = int(np.bincount(demo_data.ood.preds).argmax())
    at.multiselect(key="mis.classes").set_value([k]).run()
    no_exception(at)
    captions = [c for img in at.image for c in img.captions]
    assert captions and all(c.startswith(f"{names[k]} (") for c in captions)
    # the class table counts OOD images passing as ID at the 95%-TPR threshold
    table = [d.value for d in at.dataframe if "OOD passing as ID" in d.value.columns][0]
    assert table["OOD passing as ID"].sum() == int(metric(at, "OOD passing as ID").split(" of ")[0].replace(",", ""))


def test_misfires_method_sliders_come_from_the_param_spec(demo_cache):
    at = goto(app(), "pages/misfires.py")
    from oodcore import detectors as methods

    odin = methods.get("odin")
    at.selectbox(key="mis.method").select_index(list(methods.REGISTRY).index("odin")).run()
    no_exception(at)
    assert {f"mis.odin.{p.name}" for p in odin.params} <= {s.key for s in at.select_slider}
    at.select_slider(key="mis.odin.eps").set_value(0.0014).run()
    no_exception(at)
    at.radio(key="mis.point").set_value("id").run()
    no_exception(at)


@pytest.fixture
def extra_method():
    """A method registered after the pages were written (a log-scale and a linear parameter)."""
    from oodcore import detectors as M

    @M.register(
        "test_margin",
        "Margin (test)",
        params=(M.Param("scale", "scale s", 1.0, 0.01, 100.0, "log"), M.Param("shift", "shift b", 0.0, -1.0, 1.0)),
    )
    def margin(data, split, scale, shift):
        top2 = np.sort(np.asarray(split.logits, dtype=np.float64), axis=1)[:, -2:]
        return -(top2[:, 1] - top2[:, 0]) * scale + shift

    yield M.get("test_margin")
    M.REGISTRY.pop("test_margin")


@pytest.mark.slow
def test_a_new_method_needs_no_page_edit(demo_cache, extra_method):
    at = app()
    no_exception(at)
    assert "Margin (test)" in set(at.dataframe[0].value["method"])
    goto(at, "pages/misfires.py")
    at.selectbox(key="mis.method").select_index(len(at.selectbox(key="mis.method").options) - 1).run()
    no_exception(at)
    assert at.select_slider(key="mis.test_margin.scale").value == 1.0  # log scale: a 1-2-5 ladder
    assert (
        0.01 in at.select_slider(key="mis.test_margin.scale").options
        or "0.01" in at.select_slider(key="mis.test_margin.scale").options
    )
    at.select_slider(key="mis.test_margin.scale").set_value(10.0).run()
    at.slider(key="mis.test_margin.shift").set_value(0.5).run()
    no_exception(at)
    goto(at, "pages/curves.py")
    assert "digits_cnn · Margin (test)" in at.multiselect(key="curves.pairs").options
    at.multiselect(key="curves.pairs").select("digits_cnn · Margin (test)").run()
    no_exception(at)


@pytest.mark.slow
def test_an_ood_trained_detector_is_scored_on_held_out_rows_only(demo_cache, demo_data, tmp_path, monkeypatch):
    from oodcore import detectors as methods
    from oodcore.data import splits
    from oodcore.store import cache

    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    s_id, s_ood = methods.get("energy").score_id_ood(demo_data)
    cache.save_trained(cache.arch_dir(root, "demo", "digits_cnn"), "fake_oe", s_id, s_ood, {"label": "Fake OE"})
    monkeypatch.setenv("OODCORE_CACHE", str(root))
    at = app()
    no_exception(at)
    table = at.dataframe[0].value
    row = table[table["method"] == "Fake OE (trained)"].iloc[0]
    heldout = splits.ood_split(len(s_ood)).heldout
    assert row["n_ood"] == len(heldout)
    y = np.r_[np.zeros(len(s_id)), np.ones(len(heldout))]
    assert row["auroc"] == pytest.approx(100 * roc_auc_score(y, np.r_[s_id, s_ood[heldout]]))
    goto(at, "pages/misfires.py")
    at.selectbox(key="mis.method").select_index(len(at.selectbox(key="mis.method").options) - 1).run()
    no_exception(at)
    assert metric(at, "OOD passing as ID").endswith(f"of {len(heldout)}")
    assert any("trained with OOD data" in c.value for c in at.caption)


# ---------------------------------------------------------------- score an image


def png_bytes(size=(48, 48), color="black") -> bytes:
    img = Image.new("RGB", size, "white")
    img.paste(color, (size[0] // 3, 4, size[0] // 3 + 6, size[1] - 4))  # a "1"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def score_page(demo_cache):
    at = goto(app(), "pages/score_image.py")
    at.selectbox(key="score.model").set_value("digits_cnn").run()
    no_exception(at)
    return at


def scores_table(at):
    return [d.value for d in at.dataframe if "score" in d.value.columns][0]


def test_score_an_uploaded_image(score_page, demo_data):
    at = score_page
    at.file_uploader(key="score.upload").upload("one.png", png_bytes(), "image/png")
    at.run()
    no_exception(at)
    table = scores_table(at)
    assert set(table["method"]) >= {"MSP", "Energy", "ODIN"}
    assert table["score"].notna().all()
    pct = table["more OOD-like than % of ID"]
    assert pct.between(0, 100).all()


@pytest.mark.parametrize(
    "name, payload, reason",
    [
        ("notes.png", b"this is not an image", "not an image"),
        ("cut.png", png_bytes()[:60], "cut short"),
        ("bomb.png", None, "megapixels"),
    ],
)
def test_bad_uploads_show_a_message(score_page, name, payload, reason):
    if payload is None:  # 8000 x 6000 = 48 MP: over the 40 MP limit, yet a tiny file
        buf = io.BytesIO()
        Image.new("1", (8000, 6000)).save(buf, "PNG")
        payload = buf.getvalue()
    at = score_page
    at.file_uploader(key="score.upload").upload(name, payload, "image/png")
    at.run()
    no_exception(at)
    assert any(reason in e.value for e in at.error), [e.value for e in at.error]


def test_score_a_bundled_example(score_page):
    at = score_page
    at.selectbox(key="score.example").set_value("flower.jpg").run()
    no_exception(at)
    assert scores_table(at)["score"].notna().all()


def test_scoring_function_matches_the_cache(demo_data):
    """A cached image's logits, scored as a 'new' image, give the cached score."""
    from oodcore import detectors as methods
    from oodcore.evaluation import analysis

    row = analysis.score_new_image(demo_data, demo_data.ood.logits[3], demo_data.ood.features[3])
    scored = [r for r in row if r["score"] is not None]
    # every registered method the run can serve scores a new image; only trained detectors need their checkpoint
    assert {r["method"] for r in scored} == {m.name for m in methods.REGISTRY.values() if m.available(demo_data)}
    assert all("checkpoint" in r["why"] for r in row if r["score"] is None)
    for r in scored:
        expected = methods.get(r["method"]).score(demo_data, demo_data.ood, **r["params"])[3]
        # float32 matrix products on one row vs a batch may differ in the last bits
        assert r["score"] == pytest.approx(expected, rel=1e-4, abs=1e-6), r["method"]


def test_imagenet_model_scores_an_example(score_page):
    pytest.importorskip("oodcore.models")
    at = score_page
    at.selectbox(key="score.model").set_value("efficientnet_lite0")
    at.selectbox(key="score.example").set_value("china.jpg").run(timeout=180)
    no_exception(at)
    if at.error:
        pytest.skip(f"efficientnet_lite0 unavailable here: {at.error[0].value}")
    top5 = [d.value for d in at.dataframe if "probability" in d.value.columns][0]
    assert len(top5) == 5 and top5["class"].str.len().gt(0).all()


# ---------------------------------------------------------------- speed and imports


def synthetic(n_id=10_000, n_ood=2_000, k=200, seed=0):
    from oodcore.store.rundata import BenchmarkData, OdinGrid, SplitArrays

    rng = np.random.default_rng(seed)

    def split(n, ood):
        logits = rng.normal(size=(n, k)).astype(np.float32)
        labels = np.full(n, -1) if ood else rng.integers(0, k, n)
        if not ood:
            logits[np.arange(n), labels] += 3
        return SplitArrays(logits, None, labels, np.array([f"{i}.jpg" for i in range(n)]))

    data = BenchmarkData(
        "synthetic",
        "x",
        "imagenet-o",
        [str(i) for i in range(k)],
        [f"c{i}" for i in range(k)],
        split(n_id, False),
        split(n_ood, True),
    )
    temps, eps = np.array([1.0, 10.0, 100.0, 1000.0]), np.array([0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005])
    data.odin = OdinGrid(temps, eps, -rng.random((n_id, 4, 7)), -rng.random((n_ood, 4, 7)) + 0.1)
    return data


def test_slider_work_matches_the_engine():
    """metrics_for (what one slider move runs; timed in `python -m oodcore bench`) equals the engine's numbers."""
    from oodcore import detectors as M
    from oodcore.evaluation import analysis
    from oodcore.evaluation.metrics import compute_metrics, threshold_at_tpr

    data = synthetic()
    for method, params in [
        ("msp", {}),
        ("energy", {"T": 1.0}),
        ("odin", {"T": 1000.0, "eps": 0.0}),
        ("odin", {"T": 10.0, "eps": 0.0014}),
    ]:
        out = analysis.metrics_for(data, method, params)
        s_id, s_ood = M.get(method).score_id_ood(data, **params)
        assert out["metrics"] == pytest.approx(compute_metrics(s_id, s_ood))
        assert out["threshold"] == threshold_at_tpr(s_id, s_ood)
        hist = analysis.histogram_frame(out["scores_id"], out["scores_ood"])
        assert len(hist) > 0


@pytest.mark.slow
@pytest.mark.subprocess
def test_cache_pages_do_not_import_torch(first_run):
    root, _ = first_run
    script = textwrap.dedent(f"""
        import json, sys
        from streamlit.testing.v1 import AppTest
        out = {{}}
        at = AppTest.from_file({APP!r}, default_timeout=120).run()
        out["app.py"] = [bool(at.exception), "torch" in sys.modules, "timm" in sys.modules]
        for page in {CACHE_PAGES!r}:
            at.switch_page(page).run()
            out[page] = [bool(at.exception), "torch" in sys.modules, "timm" in sys.modules]
        print(json.dumps(out))
    """)
    env = {**os.environ, "OODCORE_CACHE": str(root)}
    env.pop("OODCORE_READONLY", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result and all(v == [False, False, False] for v in result.values()), result
