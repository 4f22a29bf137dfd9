import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    """`../shared` beside the checkout; tests that need it skip cleanly when absent."""
    if not (SHARED / "imagenet-sample").is_dir():
        pytest.skip("../shared/imagenet-sample is absent")
    return SHARED


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A demo cache built once per test session (seconds); tests must not modify it."""
    from oodcore import demo

    root = tmp_path_factory.mktemp("demo-cache")
    demo.build_demo(root)
    return root
