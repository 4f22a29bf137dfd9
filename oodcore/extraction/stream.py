"""A split's artifact written from its chunks, and read back row-wise, without holding the split in memory.

An artifact is an ordinary uncompressed `.npz` (what `np.savez` writes: a zip of `.npy` members,
stored, not deflated), so `np.load(..., allow_pickle=False)` reads it as before. Here each member is
written piece by piece (the `.npy` header first, with the final shape, then the rows of one chunk at
a time), and an existing artifact's members can be memory-mapped, because stored members are plain
byte ranges of the file. Peak memory is one chunk, whatever the size of the split.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from numpy.lib import format as npformat

from oodcore.store.arrays import SUFFIX, write_members
from oodcore.store.atomic import atomic_open

# name -> (dtype, shape, a function returning the pieces in row order)
Member = tuple[np.dtype, tuple[int, ...], Callable[[], Iterable[np.ndarray]]]


def write_npz_stream(path: str | Path, members: Mapping[str, Member]) -> None:
    """Write an uncompressed .npz atomically, each member from its pieces; the pieces must add up to its shape.

    A `.arrays` path (the cache's format 2) is written as a folder of .npy files through the store's
    chunk writer instead (oodcore.store.arrays), piece by piece all the same.
    """
    if Path(path).suffix == SUFFIX:
        write_members(path, members)
        return
    with atomic_open(path, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (dtype, shape, pieces) in members.items():
                dtype = np.dtype(dtype)
                if dtype.hasobject:
                    raise TypeError(f"array {name!r} has dtype object; the cache stores no pickles")
                header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
                expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                written = 0
                with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                    npformat.write_array_header_2_0(out, header)
                    for piece in pieces():
                        raw = np.ascontiguousarray(piece, dtype=dtype)
                        out.write(raw.data if raw.size else b"")
                        written += raw.nbytes
                if written != expected:
                    raise ValueError(f"member {name!r}: wrote {written} bytes, its shape {shape} needs {expected}")


def open_npz_maps(path: str | Path) -> dict[str, np.ndarray]:
    """Read-only memory maps of every member of an uncompressed .npz (object dtypes refused)."""
    path = Path(path)
    maps: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path.name}: member {info.filename} is compressed; it cannot be memory-mapped")
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path.name}: bad local header for {info.filename}")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = npformat.read_magic(fh)
            read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            if dtype.hasobject:
                raise ValueError(f"{path.name}: member {info.filename} holds objects (pickles are refused)")
            key = info.filename[: -len(".npy")]
            if int(np.prod(shape)) == 0:
                maps[key] = np.zeros(shape, dtype=dtype)
            else:
                maps[key] = np.memmap(
                    path, dtype=dtype, mode="r", offset=fh.tell(), shape=shape, order="F" if fortran else "C"
                )
    return maps


def take_rows(array: np.ndarray, rows: np.ndarray, block: int = 4096) -> Callable[[], Iterable[np.ndarray]]:
    """Pieces of `array[rows]`, `block` rows at a time (rows in any order)."""

    def pieces():
        for start in range(0, len(rows), block):
            yield np.asarray(array[rows[start : start + block]])

    return pieces
