"""`python -m oodcore.explorer.probe CACHE`: time the app's first render of the leaderboard (for `bench`).

Runs app.py through Streamlit's AppTest in this process, with `OODCORE_CACHE=CACHE`, and prints
`{"leaderboard_render_seconds": ..., "rss_mb": ...}`. The benchmark runs it as a child process,
so the engine itself never imports Streamlit.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def render_seconds(app: Path, root: Path, timeout: float = 600) -> float:
    from streamlit.testing.v1 import AppTest

    os.environ["OODCORE_CACHE"] = str(root)
    at = AppTest.from_file(str(app), default_timeout=timeout)
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"the leaderboard failed: {at.exception[0].value}")
    return seconds


if __name__ == "__main__":
    app = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("app.py")
    seconds = render_seconds(app, Path(sys.argv[1]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"leaderboard_render_seconds": round(seconds, 2), "rss_mb": round(rss, 1)}))
