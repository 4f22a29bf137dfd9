"""Folder datasets laid out ``<root>/<wnid>/<image>`` (ImageNet val, ImageNet-O).

Scanning is separated from loading so that the file list can be fingerprinted
(part of the feature-cache key) and filtered by a protocol before any pixel is read.

Sub-folder policy (documented decision):
- a sub-folder whose name is not wnid-shaped (``n`` + 8 digits), a hidden file, a loose
  file at the root, or a file with a non-image extension is *ignored and reported*
  (``ScanResult.ignored``) - these are README files, ``__MACOSX`` folders, CSVs, etc.;
- a wnid-shaped folder that is not one of the 1000 ImageNet-1K classes is an error when
  ``strict_wnids=True`` (the default), because such a folder cannot be given a label or be
  part of a class mask; with ``strict_wnids=False`` it is kept and listed in
  ``ScanResult.non_imagenet_wnids`` (useful for an OOD set drawn from ImageNet-21K).
ImageNet-O's 200 folders are all ImageNet-1K wnids, so it passes the strict check.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from oodcore.data.imagenet import is_imagenet_wnid, is_wnid
from oodcore.data.images import (
    is_image_file,
)


class DatasetError(ValueError):
    """A dataset folder that cannot be used as given; the message says what to fix."""


@dataclass(frozen=True)
class FileEntry:
    """One image file: ``relpath`` is POSIX-style, relative to the (resolved) dataset root."""

    relpath: str
    wnid: str
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    """Outcome of scanning a folder: the images plus everything that was skipped."""

    root: Path
    entries: list[FileEntry]
    ignored: list[str] = field(default_factory=list)  # relpaths; folders end with "/"
    class_wnids: list[str] = field(default_factory=list)  # every wnid folder, sorted (even empty)
    non_imagenet_wnids: list[str] = field(default_factory=list)  # only with strict_wnids=False
    # files that could not be listed: {"path": relpath, "error": why} (broken links, loops, unreadable)
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)


def _wnid_dirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if is_wnid(e.name) and e.is_dir())
    except OSError:
        return []


def resolve_root(path: Union[str, os.PathLike]) -> Path:
    """Return the folder that directly holds the ``<wnid>/`` class folders.

    Accepts ``<root>/<wnid>/<image>`` or the official ImageNet root read by torchvision's
    ``ImageNet(root, split="val")`` (``<root>/val/<wnid>/<image>``); meta.bin is never read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset folder does not exist: {p}")
    if not p.is_dir():
        raise DatasetError(f"dataset path is not a folder: {p}")
    if _wnid_dirs(p):
        return p
    val = p / "val"
    if val.is_dir() and _wnid_dirs(val):
        return val
    try:
        children = list(os.scandir(p))
    except OSError as e:
        raise DatasetError(f"cannot list dataset folder {p}: {e}") from None
    if not children:
        raise DatasetError(f"dataset folder is empty: {p}")
    n_img = sum(1 for c in children if c.is_file() and is_image_file(c.name))
    hint = f"; it holds {n_img} image file(s) directly - sort them into <wnid>/ class folders" if n_img else ""
    if val.is_dir() and not hint:
        n_val = sum(1 for c in os.scandir(val) if c.is_file() and is_image_file(c.name))
        if n_val:
            hint = (
                f"; {val} holds {n_val} unsorted image(s) - run torchvision's ImageNet(root, split='val') "
                "once (or use the devkit labels) to sort them into <wnid>/ folders"
            )
    raise DatasetError(
        f"{p} has no class sub-folders named by wnid (n + 8 digits); expected <root>/<wnid>/<image> "
        f"or <root>/val/<wnid>/<image>{hint}"
    )


def scan_image_folder(root: Union[str, os.PathLike], strict_wnids: bool = True) -> ScanResult:
    """List the images under ``root`` (resolved with resolve_root), sorted by relpath.

    Images may sit in nested folders below a class folder. Symlinked files and folders are
    followed, except a symlink to a folder that is the dataset root, one of its ancestors, or a
    folder already scanned (a loop): that one is listed in ``skipped`` with the reason, as are
    broken symlinks and unreadable files. Raises DatasetError when no image is found at all.
    """
    root = resolve_root(root)
    entries: list[FileEntry] = []
    ignored: list[str] = []
    skipped: list[dict] = []
    class_wnids: list[str] = []
    real_root = os.path.realpath(root)
    visited: set[str] = set()  # real paths of every folder scanned so far, across classes
    tops = sorted(os.scandir(root), key=lambda e: e.name)
    class_reals = {os.path.realpath(e.path) for e in tops if is_wnid(e.name) and e.is_dir()}
    for top in tops:
        name = top.name
        if not top.is_dir():
            if top.is_symlink() and not os.path.exists(top.path):
                skipped.append({"path": name, "error": f"broken symlink (-> {os.readlink(top.path)})"})
            else:
                ignored.append(name)
            continue
        if not is_wnid(name):
            ignored.append(name + "/")
            continue
        class_wnids.append(name)
        for dirpath, dirnames, filenames in os.walk(top.path, followlinks=True):
            real = os.path.realpath(dirpath)
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            loop = _loop_reason(real, real_root, visited)
            if not loop and dirpath != top.path and real in class_reals:
                loop = "symlink to another class folder (scanned as its own class)"
            if loop:  # a symlink back to an ancestor or to a folder already scanned: never followed
                skipped.append({"path": rel_dir + "/", "error": loop})
                dirnames[:] = []
                continue
            visited.add(real)
            hidden = [d for d in dirnames if d.startswith(".")]
            ignored.extend(f"{rel_dir}/{d}/" for d in hidden)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                rel = f"{rel_dir}/{fn}"
                full = os.path.join(dirpath, fn)
                if os.path.islink(full) and not os.path.exists(full):
                    skipped.append({"path": rel, "error": f"broken symlink (-> {os.readlink(full)})"})
                    continue
                if fn.startswith(".") or not is_image_file(fn):  # ".DS_Store", "._x.jpg" (AppleDouble)
                    ignored.append(rel)
                    continue
                try:
                    st = os.stat(full)
                except OSError as exc:
                    skipped.append({"path": rel, "error": f"unreadable ({exc.strerror})"})
                    continue
                entries.append(FileEntry(rel, name, int(st.st_size), int(st.st_mtime_ns)))
    non_1k = [w for w in class_wnids if not is_imagenet_wnid(w)]
    if non_1k and strict_wnids:
        shown = ", ".join(non_1k[:5]) + (f", ... ({len(non_1k)} in all)" if len(non_1k) > 5 else "")
        raise DatasetError(
            f"{root} has class folders that are not ImageNet-1K classes: {shown}. "
            "They cannot be labelled or masked; remove them or scan with strict_wnids=False."
        )
    if not entries:
        extra = f" ({len(ignored)} non-image item(s) ignored, e.g. {ignored[0]})" if ignored else ""
        raise DatasetError(f"no images found under {root}{extra}")
    entries.sort(key=lambda e: e.relpath)
    ignored.sort()
    skipped.sort(key=lambda d: d["path"])
    return ScanResult(root, entries, ignored, class_wnids, non_1k, skipped)


def _loop_reason(real: str, real_root: str, visited: set[str]) -> str | None:
    """Why the folder at real path `real` must not be scanned (again), or None."""
    if real in visited:
        return f"symlink loop: {real} was already scanned"
    if real == real_root or real_root.startswith(real.rstrip(os.sep) + os.sep):
        return "symlink loop: it points back to the dataset folder or one above it"
    return None


def fingerprint(entries: Sequence[FileEntry]) -> str:
    """sha256 hex of the ordered (relpath, size, mtime_ns) list.

    Part of the feature-cache key: touching, resizing, adding, removing or reordering a
    file changes it, so a stale cache is never reused.
    """
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.relpath}\t{e.size}\t{e.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
