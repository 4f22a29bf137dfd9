"""Atomic, pickle-free file writes: a reader never sees half a file.

Everything is written to a temporary file in the target folder and moved into
place with `os.replace`, which is atomic on POSIX and Windows. Temp files left by
an interrupted write (a killed process) are deleted by the next write into the same
folder once they are over an hour old (`STALE_TEMP_SECONDS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np

from oodcore.store.files import STALE_TEMP_SECONDS, _sweep, clean_stale_temps  # noqa: F401  (re-exported)


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a cache is meant to be shared like any file
    return fd, Path(tmp)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, moved into place only if the block succeeds."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write a file through a temporary one, synced to disk before it replaces `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays as an uncompressed .npz (lazy per-array reads), atomically."""
    for key, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"array {key!r} has dtype object; the cache stores no pickles")
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every array of an .npz with pickles refused (a bad file raises integrity.ArtifactDamaged)."""
    from oodcore.store.integrity import load_arrays

    return load_arrays(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
