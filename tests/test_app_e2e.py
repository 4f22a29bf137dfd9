"""End to end: `streamlit run app.py` in a subprocess, driven by Playwright in headless Chromium.

Main path: leaderboard shows a metric -> ODIN tuner, move the T slider (metric and URL change)
-> misfire gallery shows thumbnails. Screenshots go to artifacts/ (gitignored); the cold-start
time (process start to first page rendered) goes to artifacts/timings.json.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from oodcore.cli.appserver import ServerDidNotStart, streamlit_server
from tests.helpers import record

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(demo_cache, browser):
    """`streamlit run app.py` on a free port; yields (url, seconds from launch to the server answering)."""
    env = {**os.environ, "OODCORE_CACHE": str(demo_cache)}
    env.pop("OODCORE_READONLY", None)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with streamlit_server("app.py", cwd=ROOT, env=env, log=ARTIFACTS / "e2e-server.log", timeout=60) as srv:
            yield srv.url, srv.started
    except ServerDidNotStart as exc:
        pytest.fail(str(exc))


def metric_value(page, label: str, exact: bool = True) -> str:
    """The value of the st.metric whose label is `label` (or starts with it, exact=False)."""
    pattern = re.compile(rf"^\s*{re.escape(label)}" + (r"\s*$" if exact else ""))
    card = (
        page.locator('[data-testid="stMetric"]')
        .filter(has=page.locator('[data-testid="stMetricLabel"]', has_text=pattern))
        .first
    )
    card.wait_for(timeout=60_000)
    return card.locator('[data-testid="stMetricValue"]').inner_text().strip()


def test_main_path_in_a_browser(server, browser):
    url, started = server
    page = browser.new_page(viewport={"width": 1440, "height": 1800})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # 1. leaderboard: a metric and the table
    page.goto(url)
    page.get_by_role("heading", name="Leaderboard").wait_for(timeout=90_000)
    page.locator('[data-testid="stMetricValue"]').first.wait_for(timeout=90_000)
    record("e2e_cold_start_seconds (streamlit run -> first page rendered)", round(time.perf_counter() - started, 1))
    assert re.fullmatch(r"\d+\.\d\d%", metric_value(page, "Best AUROC", exact=False))
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    page.locator(".vega-embed").first.wait_for()
    time.sleep(1.0)  # let the charts finish drawing
    page.screenshot(path=str(ARTIFACTS / "e2e_1_leaderboard.png"), full_page=True)

    # 2. ODIN tuner: move T one step left on the select slider
    page.locator('[data-testid="stSidebarNav"] a', has_text="ODIN tuner").click()
    page.get_by_role("heading", name="ODIN tuner").wait_for()
    before = metric_value(page, "AUPR-In")  # AUROC can round to the same 2 decimals at neighbouring T
    thumb = page.get_by_role("slider").first
    thumb.focus()
    started_move = time.perf_counter()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(
        """([label, before]) => {
            const cards = [...document.querySelectorAll('[data-testid="stMetric"]')];
            const card = cards.find(c => {
                const l = c.querySelector('[data-testid="stMetricLabel"]');
                return l && l.innerText.trim() === label;
            });
            return card && !card.innerText.includes(before);
        }""",
        arg=["AUPR-In", before],
        timeout=30_000,
    )
    record("e2e_slider_to_metric_seconds", round(time.perf_counter() - started_move, 2))
    after = metric_value(page, "AUPR-In")
    assert after != before
    page.wait_for_function("() => window.location.search.includes('T=')", timeout=10_000)
    assert re.search(r"[?&]T=500\b", page.url), page.url  # the setting lives in the URL
    time.sleep(1.0)
    page.screenshot(path=str(ARTIFACTS / "e2e_2_odin_tuner.png"), full_page=True)

    # the shared link reproduces the setting in a fresh tab
    other = browser.new_page(viewport={"width": 1440, "height": 1800})
    other.goto(page.url)
    other.get_by_role("heading", name="ODIN tuner").wait_for(timeout=60_000)
    other.wait_for_function(
        """([label, want]) => [...document.querySelectorAll('[data-testid="stMetric"]')].some(c => {
            const l = c.querySelector('[data-testid="stMetricLabel"]');
            const v = c.querySelector('[data-testid="stMetricValue"]');
            return l && v && l.innerText.trim() === label && v.innerText.trim() === want;
        })""",
        arg=["AUPR-In", after],
        timeout=60_000,
    )
    assert metric_value(other, "AUPR-In") == after
    other.close()

    # 3. misfires: the gallery shows thumbnails
    page.locator('[data-testid="stSidebarNav"] a', has_text="Misfires").click()
    page.get_by_role("heading", name="Misfires").wait_for()
    images = page.locator('[data-testid="stImage"] img')
    images.nth(7).wait_for(timeout=30_000)
    assert images.count() >= 8
    time.sleep(1.0)
    page.screenshot(path=str(ARTIFACTS / "e2e_3_misfires.png"), full_page=True)

    # 3b. the study view renders (one architecture here: its scatter point and heatmap row)
    page.locator('[data-testid="stSidebarNav"] a', has_text="Study").click()
    page.get_by_role("heading", name="Study").wait_for()
    page.locator(".vega-embed").nth(1).wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "e2e_3b_study.png"), full_page=True)

    # 4. curves render
    page.locator('[data-testid="stSidebarNav"] a', has_text="Curves").click()
    page.get_by_role("heading", name="Curves").wait_for()
    page.locator(".vega-embed").nth(2).wait_for(timeout=30_000)
    time.sleep(1.0)
    page.screenshot(path=str(ARTIFACTS / "e2e_4_curves.png"), full_page=True)

    assert not page.locator('[data-testid="stException"]').count()
    assert not errors, errors
    page.close()
