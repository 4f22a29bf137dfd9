"""Several OOD sets per benchmark: named, grouped test sets, an optional tuning set and NINCO's subsets.

A set is an image folder in one of two shapes:
- ImageNet-O-shaped, ``<root>/<wnid>/<image>`` with ImageNet-1K wnids: under the ``imagenet-o``
  protocol the class mask comes from such a folder;
- flat, ``<root>/<image>`` (at any depth, e.g. Textures' ``<category>/<image>``, SSB-hard's
  ImageNet-21K folders), as NINCO, Textures, iNaturalist and OpenImage-O ship: no wnid needed.

OpenOOD v1.5's ImageNet-1K layout (``--openood-root``): ``images_largescale/{ssb_hard, ninco}``
(near-OOD), ``images_largescale/{inaturalist, openimage_o}`` and ``images_classic/texture``
(far-OOD), with the image lists ``benchmark_imglist/imagenet/test_<set>.txt`` selecting each test
set's files (OpenImage-O's folder also holds its validation images, listed in ``val_openimage_o.txt``,
which is the tuning set OpenOOD uses).
"""

from __future__ import annotations

import csv
import functools
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from oodcore.data.folders import DatasetError, FileEntry, _wnid_dirs
from oodcore.data.imagenet import is_imagenet_wnid, is_wnid
from oodcore.data.images import is_image_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_GROUP = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
OOD_SUBSETS = ("ninco-clean", "ninco-contaminated")
NINCO_CSV = "imagenet_o_annotations.csv"


@dataclass(frozen=True)
class OodSetArg:
    """One `--ood NAME=PATH[:GROUP]` (or `--tune-ood NAME=PATH`); `imglist` keeps only the files it lists."""

    name: str
    path: str
    group: str | None = None
    imglist: str | None = None


def parse_ood_arg(text: str, *, flag: str = "--ood", allow_group: bool = True) -> OodSetArg:
    """`NAME=PATH[:GROUP]` -> OodSetArg; a clear one-line error otherwise."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not rest:
        raise DatasetError(f"{flag} expects NAME=PATH{'[:GROUP]' if allow_group else ''}, got {text!r}")
    if not _NAME.match(name):
        raise DatasetError(f"{flag}: set name {name!r} must be letters, digits, '.', '_', '+' or '-'")
    group = None
    head, colon, tail = rest.rpartition(":")
    if allow_group and colon and _GROUP.match(tail) and not Path(rest).exists():
        rest, group = head, tail
    return OodSetArg(name=name, path=rest, group=group)


def is_imagenet_shaped(path: str | os.PathLike) -> bool:
    """Wnid sub-folders, all of them ImageNet-1K classes (ImageNet-O as released)."""
    wnids = _wnid_dirs(Path(path).expanduser())
    return bool(wnids) and all(is_imagenet_wnid(w) for w in wnids)


def scan_flat_folder(root: str | os.PathLike) -> tuple[Path, list[FileEntry], list[str]]:
    """Every image under `root` at any depth (hidden files/folders skipped): (root, entries, ignored).

    An entry's wnid is its top folder's name when that is wnid-shaped (SSB-hard), else ''.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"OOD folder does not exist or is not a folder: {root}")
    entries, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for fn in filenames:
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
            if fn.startswith(".") or not is_image_file(fn):
                ignored.append(rel)
                continue
            try:
                st = os.stat(os.path.join(dirpath, fn))
            except OSError:
                ignored.append(rel + " (unreadable or broken link)")
                continue
            top = rel.split("/", 1)[0] if "/" in rel else ""
            entries.append(FileEntry(rel, top if is_wnid(top) else "", int(st.st_size), int(st.st_mtime_ns)))
    if not entries:
        raise DatasetError(f"no images found under {root}")
    entries.sort(key=lambda e: e.relpath)
    return root, entries, sorted(ignored)


def read_imglist(path: str | os.PathLike) -> list[str]:
    """An OpenOOD image list (`<relpath> <label>` a line): the relpaths."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"image list not found: {p}")
    return [line.split()[0] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- NINCO's annotation of ImageNet-O (shipped as package data, MIT) ----


@functools.lru_cache(maxsize=1)
def ninco_annotations() -> dict[str, str]:
    """`<wnid>/<file>` -> decision ('o' clean OOD, 'i' contains an ImageNet-1K object, 'u' unclear, 'q')."""
    text = resources.files("oodcore.data").joinpath("ninco", NINCO_CSV).read_text(encoding="utf-8")
    out = {}
    for row in csv.DictReader(text.splitlines()):
        parts = row["image_location"].replace("\\", "/").split("/")
        out["/".join(parts[-2:])] = row["decision"].strip()
    return out


def ninco_subset(kind: str) -> set[str]:
    """The `<wnid>/<file>` keys of `ninco-clean` (decision 'o') or `ninco-contaminated` (decision 'i')."""
    if kind not in OOD_SUBSETS:
        raise DatasetError(f"unknown --ood-subset {kind!r}; choose one of: {', '.join(OOD_SUBSETS)}")
    want = "o" if kind == "ninco-clean" else "i"
    return {k for k, v in ninco_annotations().items() if v == want}


def wnid_file_key(relpath: str) -> str:
    """`<wnid>/<file>` of a relpath (how NINCO's list is matched, whatever the folders above)."""
    return "/".join(relpath.replace("\\", "/").split("/")[-2:])


def apply_subset(entries: list[FileEntry], kind: str) -> tuple[list[FileEntry], str]:
    """Keep the entries NINCO lists under `kind`; (kept, a note saying how many listed files were found)."""
    listed = ninco_subset(kind)
    kept = [e for e in entries if wnid_file_key(e.relpath) in listed]
    note = f"--ood-subset {kind}: found {len(kept)} of the {len(listed)} listed files"
    return kept, note


# ---- OpenOOD v1.5, ImageNet-1K ----

OPENOOD_SETS = (  # (set name, folder under the data root, group)
    ("ssb_hard", "images_largescale/ssb_hard", "near"),
    ("ninco", "images_largescale/ninco", "near"),
    ("inaturalist", "images_largescale/inaturalist", "far"),
    ("textures", "images_classic/texture", "far"),
    ("openimage_o", "images_largescale/openimage_o", "far"),
)
OPENOOD_LISTS = "benchmark_imglist/imagenet"
OPENOOD_TUNE = ("openimage_o_val", "images_largescale/openimage_o", "val_openimage_o.txt")


def openood_sets(root: str | os.PathLike) -> tuple[list[OodSetArg], OodSetArg | None, list[str]]:
    """The test sets found under an OpenOOD v1.5 data root, its tuning set (if listed), and notes on what is absent."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"--openood-root {root} is not a folder")
    sets, notes = [], []
    for name, sub, group in OPENOOD_SETS:
        folder = root / sub
        if not folder.is_dir():
            notes.append(f"OpenOOD set {name} not found ({sub} is missing); skipped")
            continue
        listing = root / OPENOOD_LISTS / f"test_{name}.txt"
        sets.append(OodSetArg(name, str(folder), group, str(listing) if listing.is_file() else None))
    if not sets:
        raise DatasetError(
            f"--openood-root {root} holds none of OpenOOD v1.5's ImageNet-1K OOD folders "
            f"({', '.join(s for _, s, _ in OPENOOD_SETS)})"
        )
    name, sub, listname = OPENOOD_TUNE
    listing = root / OPENOOD_LISTS / listname
    tune = OodSetArg(name, str(root / sub), None, str(listing)) if listing.is_file() and (root / sub).is_dir() else None
    return sets, tune, notes


def keep_listed(entries: list[FileEntry], items: list[str], folder_name: str) -> tuple[list[FileEntry], str]:
    """Entries an image list names; list paths may carry the set's folder (`ssb_hard/x.jpg`) in front."""
    wanted = set()
    for item in items:
        parts = item.replace("\\", "/").strip("/").split("/")
        for k in range(len(parts)):
            wanted.add("/".join(parts[k:]))
    kept = [e for e in entries if e.relpath in wanted]
    return kept, f"image list of {folder_name}: kept {len(kept)} of {len(entries)} files ({len(items)} listed)"
