import os
from pathlib import Path

import pytest

from tests.helpers import demo_cache_dir, demo_is_built

# ../shared beside the checkout, or $OODCORE_SHARED (a git worktree elsewhere)
SHARED = Path(os.environ.get("OODCORE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def pytest_collection_modifyitems(items):
    """Tests that use ../shared carry the needs_shared marker (so `-m "not needs_shared"` deselects them)."""
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_shared)


@pytest.fixture(scope="session")
def shared_dir():
    """`../shared` beside the checkout; tests that need it skip cleanly when absent."""
    if not (SHARED / "imagenet-sample").is_dir():
        pytest.skip("../shared/imagenet-sample is absent")
    return SHARED


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """The session's demo cache (built once, seconds; the app's first-run test may have built it); read-only to tests."""
    root = demo_cache_dir(tmp_path_factory)
    if not demo_is_built(root):
        from oodcore.extraction import demo

        demo.build_demo(root)
    return root


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, through Playwright), one per test module; skips when either is missing."""
    from oodcore.cli.appserver import CHROMIUM

    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
