"""Zip a written folder (the share folder or the report) for a download."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path


def zip_folder(folder: Path, prefix: str | None = None) -> bytes:
    """The folder's files (hidden ones such as .streamlit/ included) as a zip, under `prefix/` (default: its name)."""
    folder = Path(folder)
    prefix = prefix if prefix is not None else folder.name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            zf.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return buf.getvalue()
