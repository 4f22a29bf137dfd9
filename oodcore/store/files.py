"""Plain file helpers under the rest of oodcore.store: checksums and the sweep of stale temp files.

`digest(path)` is the size and xxh3 checksum that integrity records (oodcore.store.integrity);
`clean_stale_temps(folder)` deletes temp files and folders (`.<name>.<random>.tmp`) that an
interrupted write left behind, once they are over an hour old; every atomic write and every
artifact writer sweeps its folder first (at most once a minute per folder and process).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import xxhash

CHECKSUM = "xxh3_64"
_BLOCK = 1 << 22


def digest(path: str | os.PathLike) -> dict:
    """{"size": bytes, "xxh3_64": hex} of a file, read in 4 MB blocks."""
    h, size = xxhash.xxh3_64(), 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
            size += len(block)
    return {"size": size, CHECKSUM: h.hexdigest()}


STALE_TEMP_SECONDS = 3600  # a temp file this old belongs to a write that was interrupted
_SWEPT: dict[str, float] = {}


def clean_stale_temps(folder: Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete our temp files and folders (`.<name>.<random>.tmp`) older than `max_age` seconds; returns them."""
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime <= max_age:
                    continue
                if entry.is_dir(follow_symlinks=False):  # an artifact folder's unfinished write
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                continue
    return removed


def _sweep(folder: Path) -> None:
    """Clean stale temp files on the first write into a folder (then at most once a minute per process)."""
    key, now = str(folder), time.monotonic()
    if now - _SWEPT.get(key, -1e9) > 60:
        _SWEPT[key] = now
        clean_stale_temps(folder)
