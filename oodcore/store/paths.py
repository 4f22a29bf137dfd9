"""Where the cache lives: one rule shared by the CLI and the app."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "OODCORE_CACHE"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """`--cache-dir` wins, then `$OODCORE_CACHE`, then `./cache`."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path("cache").resolve()
