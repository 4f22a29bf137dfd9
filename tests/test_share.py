"""`oodcore share` (bundle, share folder, the light install) and `oodcore report`, against the session's demo cache."""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from oodcore import detectors as M
from oodcore.cli.main import main
from oodcore.evaluation.report import evaluate_run
from oodcore.share import bundle as B
from oodcore.share.build import build_bundle
from oodcore.share.folder import ENTRY, READONLY_PAGES, make_share
from oodcore.store import cache as C

REPO = Path(__file__).resolve().parents[1]
ENGINE_IMPORTS = ("torch", "torchvision", "timm", "sklearn")
# Installs an import blocker, then runs the shared app's pages with AppTest from the current folder (the share folder).
BLOCKED_RUN = """
import importlib.abc, json, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked: the shared app must run without it")
        return None
sys.meta_path.insert(0, Blocker())
for name in list(sys.modules):
    if name.split(".")[0] in {blocked!r}:
        del sys.modules[name]
from streamlit.testing.v1 import AppTest
import oodcore
out = {{"oodcore": oodcore.__file__, "pages": {{}}}}
at = AppTest.from_file({entry!r}, default_timeout=120).run()
out["pages"]["entry"] = [e.value for e in at.exception] + [e.value for e in at.error]
out["titles"] = [t.value for t in at.title]
for page in {pages!r}:
    at.switch_page("pages/" + page).run()
    out["pages"][page] = [e.value for e in at.exception] + [e.value for e in at.error]
at.switch_page("pages/odin_tuner.py").run()
before = [m.value for m in at.metric][:1]
at.select_slider(key="T").set_value(10.0).run()
out["slider"] = [before, [m.value for m in at.metric][:1], [e.value for e in at.exception]]
out["loaded"] = sorted({{n.split(".")[0] for n in sys.modules}} & set({blocked!r}))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bundle_dir(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_bundle(demo_cache, "demo", None, out)
    return out


@pytest.fixture(scope="module")
def share_dir(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "app"
    make_share(demo_cache, "demo", None, out)
    return out


def test_arrays_are_split_into_parts_under_the_limit(tmp_path):
    array = np.arange(10_000, dtype=np.float64).reshape(2_500, 4)
    entry = B.save_array(tmp_path, "x", array, part_bytes=20_000)
    assert len(entry["parts"]) > 1
    assert all((tmp_path / p).stat().st_size <= 20_000 for p in entry["parts"])
    np.testing.assert_array_equal(B.load_array(tmp_path, entry), array)
    with pytest.raises(TypeError):
        B.save_array(tmp_path, "o", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        B.load_array(tmp_path, {**entry, "parts": ["../x.000.npy"]})
    with pytest.raises(ValueError):  # a part that does not add up to the recorded shape is refused
        B.load_array(tmp_path, {**entry, "parts": entry["parts"][:1]})


def test_bundle_reproduces_the_cache_report(demo_cache, bundle_dir):
    cached = C.load_benchmark(demo_cache, "demo", "digits_cnn")
    shared = B.load_benchmark(bundle_dir, "demo", "digits_cnn")
    assert shared.id.logits.dtype == np.float16 and shared.id.features is None
    np.testing.assert_array_equal(shared.id.preds, cached.id.preds)
    np.testing.assert_array_equal(shared.ood.paths, cached.ood.paths)
    names = [m.name for m in M.available_methods(cached)]
    assert [m.name for m in M.available_methods(shared)] == names  # fitted methods too, from stored defaults
    a, b = evaluate_run(cached, names, n_boot=0), evaluate_run(shared, names, n_boot=0)
    for x, y in zip(a["results"], b["results"]):
        assert (x["method"], x["params"]) == (y["method"], y["params"])
        if x["tuned_on"]:  # a tuned setting is not the default: scored live from the float16 logits
            assert y["auroc"] == pytest.approx(x["auroc"], abs=1e-3) and x["params"] != M.get(x["method"]).defaults()
        else:  # default settings: the stored full-precision scores, exactly
            assert x["auroc"] == y["auroc"] and x["fpr95"] == y["fpr95"], x["method"]
    # live from float16 logits: Energy at another T, ODIN at ε = 0
    for method, params in (("energy", {"T": 10.0}), ("odin", {"T": 10.0, "eps": 0.0})):
        s = M.get(method).score_id_ood(shared, **params)
        c = M.get(method).score_id_ood(cached, **params)
        assert np.max(np.abs(s[0] - c[0])) < 5e-3 * max(1.0, np.max(np.abs(c[0])))
    # ε > 0 comes from the bundled grid, exactly
    np.testing.assert_allclose(
        M.get("odin").score(shared, shared.ood, T=1000.0, eps=0.0014),
        M.get("odin").score(cached, cached.ood, T=1000.0, eps=0.0014),
        rtol=1e-6,
    )
    # the leaderboard's report travels, computed from the full-precision cache
    stored = shared.meta["bundle"]["report"]
    assert stored["n_boot"] == 200 and stored["registry"] == M.registry.registry_key()
    assert [(r["method"], r["auroc"]) for r in stored["report"]["results"]] == [
        (r["method"], r["auroc"]) for r in a["results"]
    ]
    # a fitted method at another setting needs the features this bundle lacks: a clear MethodUnavailable
    with pytest.raises(M.MethodUnavailable, match="only its default setting"):
        M.get("react").score_id_ood(shared, p=80.0)


def test_bundle_has_no_server_paths_or_pickles(demo_cache, bundle_dir):
    texts = [p.read_text() for p in bundle_dir.rglob("*.json")]
    assert texts and not any(str(demo_cache) in t or "id_root" in t for t in texts)
    for part in bundle_dir.rglob("*.npy"):
        np.load(part, allow_pickle=False)  # raises on an object array
    assert {p.suffix for p in bundle_dir.rglob("*") if p.is_file()} == {".json", ".npy"}


@pytest.mark.slow
def test_with_features_keeps_fitted_sliders_live_and_trained_detectors_travel(demo_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(demo_cache, root)
    folder = C.arch_dir(root, "demo", "digits_cnn")
    data = C.load_benchmark(root, "demo", "digits_cnn")
    rng = np.random.default_rng(0)
    C.save_trained(folder, "flow_x", rng.normal(size=len(data.id)), rng.normal(size=len(data.ood)), {"label": "Flow"})
    out = tmp_path / "b"
    build_bundle(root, "demo", ["digits_cnn"], out, with_features=True)
    shared = B.load_benchmark(out, "demo", "digits_cnn")
    cached = C.load_benchmark(root, "demo", "digits_cnn")
    assert shared.id.features is not None and shared.fit is not None and shared.head_weight is not None
    s = M.get("react").score(shared, shared.ood, p=80.0)
    c = M.get("react").score(cached, cached.ood, p=80.0)
    np.testing.assert_allclose(s, c, rtol=2e-2, atol=2e-2)
    assert list(shared.trained) == ["flow_x"]
    np.testing.assert_array_equal(shared.trained["flow_x"].ood, cached.trained["flow_x"].ood)
    report = evaluate_run(shared, ["flow_x"], n_boot=0)
    assert report["results"][0]["tuned_on"]  # trained with OOD data: held-out rows only, as in the cache


def test_share_folder_is_self_contained_and_light(share_dir):
    assert (share_dir / ENTRY).is_file() and (share_dir / "README.md").is_file()
    assert sorted(p.name for p in (share_dir / "pages").glob("*.py")) == sorted(READONLY_PAGES)
    reqs = (share_dir / "requirements.txt").read_text().lower()
    names = {line.split(">=")[0].strip() for line in reqs.splitlines() if line and not line.startswith("#")}
    assert names == {"numpy", "xxhash", "pandas", "pyarrow", "pillow", "altair", "streamlit"}
    config = (share_dir / ".streamlit" / "config.toml").read_text()
    assert 'showErrorDetails = "none"' in config and "maxUploadSize = 1" in config
    for bad in ("uv.lock", "Pipfile", "environment.yml", "pyproject.toml"):  # would take precedence on Community Cloud
        assert not (share_dir / bad).exists()
    readme = (share_dir / "README.md").read_text()
    assert "digits_cnn" in readme and "| 360 | 896 |" in readme and "oodcore 0." in readme
    assert all(p.stat().st_size < 50 * 10**6 for p in share_dir.rglob("*") if p.is_file())
    assert not (share_dir / "oodcore" / "extraction").exists() and not (share_dir / "oodcore" / "training").exists()
    # no copied module imports the engine at module level
    for path in (share_dir / "oodcore").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] in ENGINE_IMPORTS}, path


def test_cli_share_and_report_errors(demo_cache, tmp_path, capsys):
    assert main(["share", "--benchmark", "nope", "--out", str(tmp_path / "s"), "--cache-dir", str(demo_cache)]) == 2
    assert "no cached run of benchmark 'nope'" in capsys.readouterr().err
    args = ["share", "--benchmark", "demo", "--arch", "x", "--out", str(tmp_path / "s"), "--cache-dir", str(demo_cache)]
    assert main(args) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    args = ["share", "--benchmark", "demo", "--out", str(tmp_path / "busy"), "--cache-dir", str(demo_cache)]
    assert main(args) == 2 and (tmp_path / "busy" / "keep.txt").is_file()  # never deletes someone else's folder
    assert "not a share folder" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_share_prints_the_size_report(demo_cache, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["share", "--benchmark", "demo", "--out", str(out), "--cache-dir", str(demo_cache)]) == 0
    text = capsys.readouterr().out
    assert "size:" in text and "largest file" in text and "digits_cnn: 360 ID / 896 OOD" in text
    assert main(["share", "--benchmark", "demo", "--out", str(out), "--cache-dir", str(demo_cache)]) == 0  # re-share


@pytest.mark.slow
@pytest.mark.subprocess
def test_shared_app_runs_every_page_without_torch_or_sklearn(share_dir):
    """The shared app's pages under AppTest in a process where importing torch, torchvision, timm or sklearn fails."""
    script = BLOCKED_RUN.format(blocked=ENGINE_IMPORTS, entry=ENTRY, pages=list(READONLY_PAGES))
    env = {k: v for k, v in os.environ.items() if k not in ("OODCORE_CACHE", "OODCORE_READONLY")}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=share_dir, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["oodcore"].startswith(str(share_dir))  # the copy beside the entry script, not an installed oodcore
    assert all(v == [] for v in out["pages"].values()), out["pages"]
    assert out["titles"] == ["Leaderboard"] and out["loaded"] == []
    before, after, errors = out["slider"]
    assert errors == [] and before != after  # ODIN's T slider is live from the float16 logits


@pytest.mark.slow
def test_report_writes_every_figure_offline(demo_cache, tmp_path):
    from oodcore.share.report import make_report

    result = make_report(demo_cache, "demo", None, tmp_path / "r", n_boot=20)
    page = Path(result["index"]).read_text()
    for stem in ("auroc", "aupr_out", "fpr95", "top1_vs_auroc", "odin_grid-digits_cnn", "roc-digits_cnn"):
        for ext in ("png", "svg", "csv"):
            assert (tmp_path / "r" / "figures" / f"{stem}.{ext}").stat().st_size > 100, (stem, ext)
        assert f"figures/{stem}.svg" in page
    assert "FPR@95 (OOD+)" in page and "FPR@95 (ID+)" in page and "exposure" in page and "digits 0-4 vs 5-9" in page
    assert "ODIN (tuned)" in page and "http://" not in page.replace("http://www.w3.org", "")
    assert "<script" not in page and "https://" not in page
    assert len(list((tmp_path / "r" / "img").glob("*.jpg"))) == 8
    assert (tmp_path / "r" / "figures" / "leaderboard.csv").is_file()


@pytest.mark.slow
def test_share_page_offers_both_downloads(demo_cache):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180).run()
    at.switch_page("pages/share.py").run()
    assert not at.exception and [t.value for t in at.title] == ["Share"]
    at.button(key="share.build_app").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    made = at.session_state["share.app"]
    names = zipfile.ZipFile(io.BytesIO(made["zip"])).namelist()
    assert "demo-app/streamlit_app.py" in names and "demo-app/.streamlit/config.toml" in names
    assert any(c.value.startswith("size:") for c in at.caption)
    at.button(key="share.build_report").click().run()
    assert not at.exception and not at.error
    names = zipfile.ZipFile(io.BytesIO(at.session_state["share.report"]["zip"])).namelist()
    assert "demo-report/index.html" in names and "demo-report/figures/auroc.svg" in names


def test_share_page_is_hidden_in_readonly_mode(demo_cache, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("OODCORE_READONLY", "1")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    with pytest.raises(ValueError):
        at.switch_page("pages/share.py")


@pytest.mark.slow
def test_disabled_sliders_say_why(share_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("OODCORE_CACHE", "unset")  # the entry script sets both; monkeypatch restores them after
    monkeypatch.setenv("OODCORE_READONLY", "0")
    at = AppTest.from_file(str(share_dir / ENTRY), default_timeout=120).run()
    at.switch_page("pages/misfires.py").run()
    at.selectbox(key="mis.method").select_index(at.selectbox(key="mis.method").options.index("ReAct")).run()
    assert not at.exception
    fixed = [s for s in at.slider if s.label == "clip percentile p"]
    assert fixed and fixed[0].disabled and fixed[0].value == 90.0
    assert any("--with-features" in c.value for c in at.caption)


@pytest.mark.slow
def test_the_leaderboard_serves_the_bundled_report(share_dir, tmp_path, monkeypatch):
    """The report stored at share time (full-precision scores, 200 bootstrap replicates) is what the app shows."""
    from streamlit.testing.v1 import AppTest

    copy = tmp_path / "app"
    shutil.copytree(share_dir, copy)
    run_json = copy / "bundle" / "demo" / "digits_cnn" / "run.json"
    run = json.loads(run_json.read_text())
    stored = run["bundle"]["report"]
    assert stored["n_boot"] == 200
    for row in stored["report"]["results"]:
        row["auroc"] = 0.987654 if row["method"] == "msp" else 0.5
    run_json.write_text(json.dumps(run))
    monkeypatch.setenv("OODCORE_CACHE", "unset")
    monkeypatch.setenv("OODCORE_READONLY", "0")
    at = AppTest.from_file(str(copy / ENTRY), default_timeout=120).run()
    assert not at.exception
    assert [m.value for m in at.metric if m.label.startswith("Best AUROC")] == ["98.77%"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_registry_key_is_the_same_in_every_process():
    """A bundle's stored report is matched by this key in another process (string hashing differs per process)."""
    code = "from oodcore.detectors.registry import registry_key; print(registry_key())"
    keys = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1 and next(iter(keys)).startswith("[('msp'")


def test_the_synthetic_study_generator_writes_cache_runs(tmp_path):
    from oodcore.cli.synthetic import main as synthetic

    args = ["--out", str(tmp_path), "--archs", "2", "--n-id", "40", "--n-ood", "12", "--n-fit", "20"]
    assert synthetic(args + ["--classes", "5", "--dim", "8"]) == 0
    runs = C.list_runs(tmp_path)
    assert [r["arch"] for r in runs] == ["synth_arch00", "synth_arch01"]
    data = C.load_benchmark(tmp_path, "synthetic", "synth_arch01")
    assert (len(data.id), len(data.ood), len(data.fit), data.n_classes) == (40, 12, 20, 5)
    assert data.odin.id.shape == (40, 4, 7) and data.head_weight.shape == (5, 8)
    a = C.load_thumbnails(tmp_path, "synthetic", "synth_arch00", "ood")
    b = C.load_thumbnails(tmp_path, "synthetic", "synth_arch01", "ood")
    np.testing.assert_array_equal(a[0], b[0])  # the same images for every architecture
