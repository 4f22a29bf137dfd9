"""Artifacts as folders of `.npy` files: written chunk by chunk, read through memory maps.

Layout of one artifact (cache format 2)::

    <arch dir>/<role>-<key>.arrays/<array>.npy   one file per array (logits, features, labels, paths,
                                                 index, thumb_data, thumb_offsets, ...; the head's
                                                 weight/bias; the ODIN grid's temps/eps/scores)
    <arch dir>/<role>-<key>.arrays/integrity.json  each file's size and xxh3 checksum, made at finalize

Reading (`read_arrays`) opens every `.npy` with `mmap_mode="r"`: nothing is read until a page,
detector or export touches the rows and columns it needs, and the OS shares the pages between
processes. Arrays come back read-only.

Writing, for extraction that streams (the writer API other modules use)::

    with ArtifactWriter(folder / artifact_name("ood", key)) as w:   # a hidden temp folder until the end
        for chunk in chunks:
            w.append(logits=..., features=..., index=...)           # rows appended to each .npy on disk
        w.put(thumb_offsets=...)                                    # a whole array at once
    # leaving the block normally finalizes: headers written, files synced, checksums recorded, and the
    # folder renamed into place atomically; an exception discards the temp folder instead.

String arrays (`paths`) are buffered in memory until finalize (their width is only known then);
numeric rows go straight to disk, so peak memory follows the chunk, not the split.
`write_arrays(path, arrays)` writes a dict of whole arrays the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from oodcore.store.files import clean_stale_temps, digest

SUFFIX = ".arrays"
INTEGRITY_FILE = "integrity.json"
_MAGIC = b"\x93NUMPY\x01\x00"
HEADER_BYTES = 256  # fixed, so the header can be written last, once the row count is known


def artifact_name(role: str, key: str) -> str:
    return f"{role}-{key}{SUFFIX}"


def is_array_dir(path: Path) -> bool:
    return Path(path).suffix == SUFFIX


def _header(dtype: np.dtype, shape: tuple) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    body = text.encode("latin1")
    pad = HEADER_BYTES - len(_MAGIC) - 2 - len(body) - 1
    if pad < 0:
        raise ValueError(f"array header too long: {text}")
    return _MAGIC + struct.pack("<H", len(body) + pad + 1) + body + b" " * pad + b"\n"


class ArtifactWriter:
    """Write one artifact folder chunk by chunk; see the module docstring."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.target.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent))
        self._streams: dict[str, list] = {}  # name -> [file, dtype, row shape, rows]
        self._buffered: dict[str, list[np.ndarray]] = {}
        self._whole: set[str] = set()
        self._empty: dict[str, np.ndarray] = {}
        self.done = False

    def append(self, **arrays: np.ndarray) -> None:
        """Append rows (axis 0) to each named array."""
        for name, value in arrays.items():
            value = np.asarray(value)
            self._check(name, value)
            if value.ndim == 0:
                raise ValueError(f"array {name!r}: append takes rows; use put() for a 0-d value")
            if len(value) == 0:  # an empty chunk fixes nothing (its dtype may be a default); kept only if alone
                if name not in self._streams and name not in self._buffered:
                    self._empty.setdefault(name, value)
                continue
            self._empty.pop(name, None)
            if value.dtype.kind in "US":
                self._buffered.setdefault(name, []).append(value)
                continue
            value = np.ascontiguousarray(value)
            if name not in self._streams:
                fh = open(self.tmp / f"{name}.npy", "wb")
                fh.write(b"\0" * HEADER_BYTES)
                self._streams[name] = [fh, value.dtype, value.shape[1:], 0]
            entry = self._streams[name]
            if value.dtype != entry[1] or value.shape[1:] != entry[2]:
                raise ValueError(f"array {name!r}: chunk of {value.dtype}{value.shape[1:]} after {entry[1]}{entry[2]}")
            entry[0].write(value.tobytes())
            entry[3] += len(value)

    def put(self, **arrays: np.ndarray) -> None:
        """Write whole arrays (any shape, including 0-d)."""
        for name, value in arrays.items():
            value = np.asarray(value)
            self._check(name, value)
            self._whole.add(name)
            with open(self.tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, value, allow_pickle=False)

    def _check(self, name: str, value: np.ndarray) -> None:
        if value.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; the cache stores no pickles")
        if not name.isidentifier():
            raise ValueError(f"unusable array name {name!r}")
        if name in self._whole or (name in self._streams and name in self._buffered):
            raise ValueError(f"array {name!r} written twice")

    def finalize(self) -> Path:
        """Write headers, sync, record checksums and move the folder into place; returns the target."""
        for name, (fh, dtype, row_shape, rows) in self._streams.items():
            fh.seek(0)
            fh.write(_header(dtype, (rows, *row_shape)))
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        for name, value in self._empty.items():
            with open(self.tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, value, allow_pickle=False)
        for name, parts in self._buffered.items():
            with open(self.tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, np.concatenate(parts) if parts else np.zeros(0, str), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        record = {"files": {p.name: digest(p) for p in sorted(self.tmp.glob("*.npy"))}}
        (self.tmp / INTEGRITY_FILE).write_text(json.dumps(record, indent=1) + "\n")
        os.chmod(self.tmp, 0o777 & ~_umask())
        replace_dir(self.tmp, self.target)
        self.done = True
        return self.target

    def abort(self) -> None:
        for fh, *_ in self._streams.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.done:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an old one (a damaged copy) is moved aside first, then deleted."""
    if target.exists():
        aside = target.with_name(f".{target.name}.{os.getpid()}.{time.time_ns()}.tmp")
        os.rename(target, aside)
        os.rename(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)  # a reader's open maps keep their pages (POSIX)
    else:
        os.rename(tmp, target)


def write_arrays(target: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write a dict of whole arrays as one artifact folder (numeric arrays stream, strings buffer)."""
    with ArtifactWriter(target) as w:
        for name, value in arrays.items():
            value = np.asarray(value)
            if value.ndim == 0:
                w.put(**{name: value})
            else:
                w.append(**{name: value})
    return Path(target)


def recorded_integrity(path: Path) -> dict | None:
    """The checksums an artifact folder recorded when it was written (None if absent or unreadable)."""
    try:
        record = json.loads((Path(path) / INTEGRITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def read_arrays(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only arrays of an artifact folder (all, or those of `keys` it has).

    Raises OSError/ValueError on a bad file; oodcore.store.integrity.load_arrays turns those into one error.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(2, "No such artifact folder", str(path))
    names = sorted(p.stem for p in path.glob("*.npy")) if keys is None else list(keys)
    out = {}
    for name in names:
        file = path / f"{name}.npy"
        if not file.is_file():
            continue
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as exc:  # say which file; integrity.load_arrays words the rest
            raise ValueError(f"{file.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        out[name] = arr.view(np.ndarray) if isinstance(arr, np.memmap) else arr
    return out


def write_members(target: str | os.PathLike, members: Mapping) -> Path:
    """Write {name: (dtype, shape, pieces)} (pieces: a function yielding row blocks) as one artifact folder."""
    with ArtifactWriter(target) as w:
        for name, (dtype, shape, pieces) in members.items():
            dtype, rows = np.dtype(dtype), 0
            for piece in pieces():
                piece = np.asarray(piece, dtype=dtype).reshape(-1, *shape[1:])
                w.append(**{name: piece})
                rows += len(piece)
            if rows != shape[0]:
                raise ValueError(f"array {name!r}: pieces gave {rows} rows, its shape {tuple(shape)} needs {shape[0]}")
            if rows == 0:
                w.append(**{name: np.zeros(shape, dtype)})
    return Path(target)
