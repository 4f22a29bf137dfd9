"""Integrity of cached files: sizes and checksums recorded when a run is published, verified on read.

* `digest(path)` -> {"size", "xxh3_64"}: what `run.json["integrity"][filename]` records for every
  artifact file a run points at (and a trained detector's JSON for its scores file); an artifact
  folder of `.npy` files (oodcore.store.arrays) records {"files": {name: digest}}, made when it was written.
* `verify(path, record)` checks the size on every open (one stat) and the checksum the first time a
  file is opened in a process (memoised on path, size and mtime), so a page rerun costs nothing.
* `load_arrays(path, ...)` is the one way an array file is read: pickles refused, and any bad file
  (missing, truncated, garbled, a flipped byte caught by the checksum or the zip CRC) becomes one
  typed error, `ArtifactDamaged`, naming the file and the command that repairs it, never numpy's
  own exception or its `allow_pickle=True` hint.

Error hierarchy (all `CacheError`): `CacheMissing` (nothing cached under that name; also a
FileNotFoundError), `CacheDamaged` (a run.json or artifact is unusable; also a ValueError) and
its `ArtifactDamaged`. `str(exc)` is the full one-line message (with the file's path, for the
CLI); `exc.public()` leaves server paths out (for a public, read-only app).
"""

from __future__ import annotations

import os
import threading
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from oodcore.store.files import CHECKSUM, digest

PUBLIC_REPAIR = "python -m oodcore verify --repair on the server (it prints the exact command for this run)"


class CacheError(Exception):
    """A cache problem the user can act on: `what` happened, to which run, and how to `repair` it."""

    def __init__(self, what: str, *, path: str | os.PathLike | None = None, repair: str | None = None):
        self.what, self.path, self.repair = what, (None if path is None else str(path)), repair
        super().__init__(self._text(with_path=True))

    def _text(self, with_path: bool) -> str:
        text = self.what + (f" [{self.path}]" if with_path and self.path else "")
        return text + (f"; repair: {self.repair}" if self.repair else "")

    def public(self) -> str:
        """The message without server paths (what a read-only deployment may show)."""
        text = self.what
        if self.repair:
            repair = self.repair if "/" not in self.repair else PUBLIC_REPAIR
            text += f"; repair: {repair}"
        return text


class CacheMissing(CacheError, FileNotFoundError):
    """Nothing cached under that name: the message says which command creates it."""


class CacheDamaged(CacheError, ValueError):
    """A run.json or an artifact cannot be used as it is; the message says which and how to repair it."""


class ArtifactDamaged(CacheDamaged):
    """One artifact file is missing, truncated, altered or unreadable."""


def artifact_digest(path: str | os.PathLike) -> dict:
    """The record of an artifact: `digest` of a file; of a `.arrays` folder, the checksums it recorded when
    it was written ({"files": {name: digest}}), or computed now when it has none."""
    from oodcore.store.arrays import is_array_dir, recorded_integrity

    path = Path(path)
    if is_array_dir(path):
        return recorded_integrity(path) or {"files": {p.name: digest(p) for p in sorted(path.glob("*.npy"))}}
    return digest(path)


_VERIFIED: dict[str, tuple] = {}
_VERIFIED_LOCK = threading.Lock()


def verify(
    path: str | os.PathLike,
    record: dict,
    *,
    full: bool = False,
    repair: str | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """Raise ArtifactDamaged unless `path` matches its record (size always; checksum once per process or `full`).

    For an artifact folder, each of its files (or only the arrays in `names`) is checked the same way.
    """
    path = Path(path)
    if "files" in record:
        if not path.is_dir():
            raise ArtifactDamaged(f"cache folder {path.name} is missing", path=path, repair=repair)
        wanted = None if names is None else {f"{n}.npy" for n in names}
        for fname, rec in sorted(record["files"].items()):
            if wanted is None or fname in wanted:
                verify(path / fname, rec, full=full, repair=repair)
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArtifactDamaged(f"cache file {_label(path)} is missing", path=path, repair=repair) from None
    except OSError as exc:
        raise ArtifactDamaged(f"cache file {_label(path)} cannot be read ({exc.strerror})", path=path, repair=repair)
    if st.st_size != record.get("size"):
        raise ArtifactDamaged(
            f"cache file {_label(path)} is damaged: {st.st_size} bytes where {record.get('size')} were written "
            "(truncated or overwritten)",
            path=path,
            repair=repair,
        )
    memo = (st.st_size, st.st_mtime_ns, record.get(CHECKSUM))
    with _VERIFIED_LOCK:
        if not full and _VERIFIED.get(str(path)) == memo:
            return
    try:
        actual = digest(path)[CHECKSUM]
    except OSError as exc:
        raise ArtifactDamaged(f"cache file {_label(path)} cannot be read ({exc.strerror})", path=path, repair=repair)
    if actual != record.get(CHECKSUM):
        raise ArtifactDamaged(
            f"cache file {_label(path)} is damaged: its checksum does not match the one recorded when it was written",
            path=path,
            repair=repair,
        )
    with _VERIFIED_LOCK:
        _VERIFIED[str(path)] = memo


def load_arrays(
    path: str | os.PathLike,
    keys: Iterable[str] | None = None,
    *,
    record: dict | None = None,
    repair: str | None = None,
    required: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """Read arrays from an .npz (all, or those of `keys` it has), pickles refused; any bad file -> ArtifactDamaged."""
    path = Path(path)
    keys = None if keys is None else list(keys)
    if record is not None:
        verify(path, record, repair=repair, names=keys)
    try:
        from oodcore.store.arrays import is_array_dir, read_arrays

        if is_array_dir(path):
            out = read_arrays(path, keys)
            if not out and not path.is_dir():
                raise FileNotFoundError(str(path))
            return _require(out, required, path, repair)
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("not an .npz archive")
            names = list(z.files) if keys is None else [k for k in keys if k in z.files]
            out = {k: z[k] for k in names}
    except FileNotFoundError:
        raise ArtifactDamaged(f"cache file {_label(path)} is missing", path=path, repair=repair) from None
    except (OSError, ValueError, EOFError, KeyError, IndexError, zipfile.BadZipFile, RuntimeError) as exc:
        raise ArtifactDamaged(
            f"cache file {_label(path)} is damaged: not a readable array file ({_reason(exc)})",
            path=path,
            repair=repair,
        ) from None
    return _require(out, required, path, repair)


def _require(out: dict, required: Iterable[str], path: Path, repair: str | None) -> dict:
    missing = [k for k in required if k not in out]
    if missing:
        raise ArtifactDamaged(
            f"cache file {_label(path)} is damaged: it lacks {', '.join(missing)}", path=path, repair=repair
        )
    return out


def check_file(path: str | os.PathLike, record: dict | None, *, repair: str | None = None) -> None:
    """Verify a file against its record, or without one, read it whole (an .npz's members are CRC-checked)."""
    path = Path(path)
    if record is None and path.suffix == ".arrays":
        from oodcore.store.arrays import recorded_integrity

        record = recorded_integrity(path)
        if record is None:
            raise ArtifactDamaged(f"cache folder {path.name} lacks its checksums", path=path, repair=repair)
    if record is not None:
        verify(path, record, repair=repair)
    elif path.suffix == ".npz":
        load_arrays(path, repair=repair)
    elif path.suffix == ".safetensors":
        _check_safetensors(path, repair)
    elif not path.is_file():
        raise ArtifactDamaged(f"cache file {_label(path)} is missing", path=path, repair=repair)


def _check_safetensors(path: Path, repair: str | None) -> None:
    try:
        from safetensors.numpy import load_file

        load_file(str(path))
    except FileNotFoundError:
        raise ArtifactDamaged(f"cache file {_label(path)} is missing", path=path, repair=repair) from None
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise ArtifactDamaged(
            f"cache file {_label(path)} is damaged: not a readable safetensors file ({_reason(exc)})",
            path=path,
            repair=repair,
        ) from None


def _label(path: Path) -> str:
    """A file's name, with its artifact folder when it sits in one (`ood-<key>.arrays/features.npy`)."""
    return f"{path.parent.name}/{path.name}" if path.parent.suffix == ".arrays" else path.name


def _reason(exc: BaseException) -> str:
    """A short reason, without numpy's suggestion to unpickle the file."""
    text = str(exc).split("\n")[0]
    if "pickle" in text.lower() or len(text) > 120 or not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}"
