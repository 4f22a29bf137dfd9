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
