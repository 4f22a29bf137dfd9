"""End to end: the static report in headless Chromium with no network, and the shared app from a fresh
virtualenv built from its own requirements.txt (no torch), rendered in headless Chromium.

`measure_share_app` is also how the README's budgets were measured (first render time, server RSS after
opening every page): `python -c "from tests.test_share_e2e import measure_cli; measure_cli()" FOLDER [PYTHON]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oodcore.cli.appserver import CHROMIUM, streamlit_server
from oodcore.cli.bench_rss import proc_status_mb
from tests.helpers import record

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
PAGES = ("Leaderboard", "Study", "Curves", "ODIN tuner", "Misfires")
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution", "timed out")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(1200)]


def rss_mb(pid: int) -> float:
    mb = proc_status_mb("VmRSS", pid)
    return float("nan") if mb is None else mb


def measure_share_app(folder: Path, python: str, browser, shots: str | None = None) -> dict:
    """`streamlit run streamlit_app.py` with `python` from the share folder; open every page in Chromium.

    Returns first_render_seconds (process start to the leaderboard's first metric), rss_mb after each
    page, and whether the ODIN slider moved the metric; screenshots go to artifacts/<shots>-*.png.
    """
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}  # nothing of ours
    ARTIFACTS.mkdir(exist_ok=True)
    out = {"rss_mb": {}}
    with streamlit_server(
        "streamlit_app.py", cwd=folder, env=env, python=python, log=ARTIFACTS / "share-server.log", timeout=120
    ) as server:
        page = browser.new_page(viewport={"width": 1440, "height": 1600})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.get_by_role("heading", name="Leaderboard").wait_for(timeout=600_000)
        page.locator('[data-testid="stMetricValue"]').first.wait_for(timeout=600_000)
        out["first_render_seconds"] = round(time.perf_counter() - server.started, 1)
        for name in PAGES:
            if name != "Leaderboard":
                page.locator('[data-testid="stSidebarNav"] a', has_text=name).click()
                page.get_by_role("heading", name=name).wait_for(timeout=300_000)
            page.locator('[data-testid="stMetricValue"], .vega-embed').first.wait_for(timeout=300_000)
            time.sleep(2.0)  # let the page's charts and images finish
            out["rss_mb"][name] = round(rss_mb(server.proc.pid), 1)
            if shots:
                page.screenshot(path=str(ARTIFACTS / f"{shots}-{name.replace(' ', '_').lower()}.png"), full_page=True)
            if name == "ODIN tuner":
                values = "() => [...document.querySelectorAll('[data-testid=\"stMetricValue\"]')].map(m => m.innerText).join('|')"
                before = page.evaluate(values)
                page.get_by_role("slider").first.focus()
                page.keyboard.press("ArrowLeft")  # T one step down (neighbouring T can round AUROC alike, not all five)
                page.wait_for_function(f"(before) => ({values})() !== before", arg=before, timeout=60_000)
                out["odin_slider_moved"] = True
        out["exceptions"] = page.locator('[data-testid="stException"]').count()
        out["page_errors"] = errors
        out["max_rss_mb"] = max(out["rss_mb"].values())
        page.close()
        return out


def measure_cli() -> None:
    """Measure a share folder from the command line (argv: FOLDER [PYTHON]); prints JSON."""
    from playwright.sync_api import sync_playwright

    folder = Path(sys.argv[1])
    python = sys.argv[2] if len(sys.argv) > 2 else sys.executable
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            print(json.dumps(measure_share_app(folder, python, b, shots=folder.name)))
        finally:
            b.close()


def test_report_renders_offline_in_chromium(demo_cache, tmp_path, browser):
    from oodcore.share.report import make_report

    make_report(demo_cache, "demo", None, tmp_path / "report", n_boot=50)
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    outside = []

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_files)
    page.goto((tmp_path / "report" / "index.html").as_uri())
    page.wait_for_load_state("load")
    sizes = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert outside == []
    assert len(sizes) >= 6 + 8 and all(w > 0 for _, w in sizes), sizes
    assert page.get_by_role("heading", name="Leaderboard").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-demo.png"), full_page=True)
    page.close()


def test_shared_app_from_a_fresh_virtualenv(demo_cache, tmp_path, browser):
    """The dependency file alone (no torch, no system site packages) runs the shared app with working sliders."""
    from oodcore.share.folder import make_share

    folder = tmp_path / "app"
    make_share(demo_cache, "demo", None, folder)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    started = time.perf_counter()
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(folder / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if pip.returncode != 0 and any(e in pip.stderr for e in NETWORK_ERRORS):
        pytest.skip(f"no package index reachable: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    record("share_venv_install_seconds", round(time.perf_counter() - started, 1))
    for banned in ("torch", "torchvision", "timm", "sklearn"):
        probe = subprocess.run([python, "-c", f"import {banned}"], capture_output=True, timeout=60)
        assert probe.returncode != 0, f"{banned} is importable in the shared app's environment"
    result = measure_share_app(folder, python, browser, shots="share-demo")
    record("share_demo_app", result)
    assert result["exceptions"] == 0 and not result["page_errors"], result
    assert result["odin_slider_moved"] and set(result["rss_mb"]) == set(PAGES)
    assert result["max_rss_mb"] < 1024, result
