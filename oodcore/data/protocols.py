"""The three evaluation protocols: which ID/OOD images are scored, and over which classes.

The class mask restricts the classifier to a subset of the 1000 logits. It matters:
the official ImageNet-O evaluation (Hendrycks et al., 2021) scores a 200-class
classifier, and numbers obtained with all 1000 classes are not comparable.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from oodcore.data.folders import DatasetError, FileEntry, ScanResult, _wnid_dirs, fingerprint, scan_image_folder
from oodcore.data.imagenet import imagenet_wnids, wnid_to_index

PROTOCOLS = ("imagenet-o", "full", "id-classes")

PROTOCOL_DESCRIPTIONS = {
    "imagenet-o": "official ImageNet-O: classifier masked to the OOD folder's 200 wnids; ID = ID images of those classes",
    "full": "all 1000 ImageNet-1K classes; every ID image is in-distribution",
    "id-classes": "held-out classes: classifier masked to the ID folder's wnids; OOD images come from other classes",
}

OOD_LIST_MODES = ("exclude", "keep")
_MAX_LISTED = 10  # how many unmatched list entries a note spells out


@dataclass
class ProtocolSpec:
    """Everything needed to extract and score one protocol; see ``to_json`` for a summary."""

    name: str
    class_wnids: list[str]  # class mask, standard ImageNet order
    class_indices: np.ndarray  # int64 indices into the 1000 logits, aligned with class_wnids
    id_root: Path
    ood_root: Path
    id_files: list[FileEntry]
    ood_files: list[FileEntry]
    id_labels: np.ndarray  # int64 label index WITHIN the mask, aligned with id_files
    ignored: list[str] = field(default_factory=list)  # non-image files seen (full paths)
    excluded: list[str] = field(default_factory=list)  # OOD relpaths dropped by the ood_list
    # files the scans could not list (broken symlinks, symlink loops): {"split", "path", "error"}
    scan_skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings worth showing the user

    @property
    def num_classes(self) -> int:
        return len(self.class_wnids)

    def to_json(self) -> dict:
        """A JSON-able summary (for reports and cache metadata)."""
        return {
            "name": self.name,
            "description": PROTOCOL_DESCRIPTIONS.get(self.name, ""),
            "n_classes": len(self.class_wnids),
            "class_wnids": list(self.class_wnids),
            "id_root": str(self.id_root),
            "ood_root": str(self.ood_root),
            "n_id": len(self.id_files),
            "n_ood": len(self.ood_files),
            "n_id_classes_present": int(len(np.unique(self.id_labels))),
            "n_ignored": len(self.ignored),
            "n_excluded": len(self.excluded),
            "id_fingerprint": fingerprint(self.id_files),
            "ood_fingerprint": fingerprint(self.ood_files),
            "notes": list(self.notes),
        }


def read_ood_list(path: Union[str, os.PathLike]) -> list[str]:
    """Parse a list file: one relpath or bare filename a line; blank lines and ``#`` comments skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"OOD list file not found: {p}")
    items = []
    for raw in p.read_text(encoding="utf-8-sig").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # Inline comments need whitespace before '#', so a '#' inside a filename survives.
        for sep in (" #", "\t#"):
            if sep in line:
                line = line.split(sep, 1)[0].strip()
        line = line.replace("\\", "/")
        while line.startswith("./"):
            line = line[2:]
        if line:
            items.append(line)
    return items


def _apply_ood_list(files: list[FileEntry], items: list[str], mode: str, notes: list[str]):
    """Return (kept, excluded_relpaths). Entries with '/' match a relpath (or its suffix, so a
    list written against ``imagenet-o/<wnid>/x.jpg`` still works); bare names match the basename."""
    by_rel = {e.relpath: i for i, e in enumerate(files)}
    by_base: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(files):
        by_base[e.relpath.rsplit("/", 1)[-1]].append(i)
    matched: set[int] = set()
    unmatched, ambiguous = [], []
    for item in items:
        if "/" in item:
            parts = item.split("/")
            hits = []
            for k in range(len(parts) - 1):  # drop leading folders one by one
                rel = "/".join(parts[k:])
                if rel in by_rel:
                    hits = [by_rel[rel]]
                    break
        else:
            hits = by_base.get(item, [])
            if len(hits) > 1:
                ambiguous.append(item)
        if not hits:
            unmatched.append(item)
        matched.update(hits)
    if unmatched:
        shown = ", ".join(unmatched[:_MAX_LISTED]) + (" ..." if len(unmatched) > _MAX_LISTED else "")
        notes.append(f"ood_list: {len(unmatched)} of {len(items)} entries matched no OOD file: {shown}")
    if ambiguous:
        notes.append(
            f"ood_list: {len(ambiguous)} bare filename(s) matched files in several folders; "
            f"all were {'kept' if mode == 'keep' else 'excluded'}: {', '.join(ambiguous[:_MAX_LISTED])}"
        )
    if mode == "exclude":
        kept = [e for i, e in enumerate(files) if i not in matched]
        excluded = [e.relpath for i, e in enumerate(files) if i in matched]
    else:
        kept = [e for i, e in enumerate(files) if i in matched]
        excluded = [e.relpath for i, e in enumerate(files) if i not in matched]
    return kept, excluded


def stratified_subset(files: Sequence[FileEntry], limit: int, seed: int = 0) -> list[FileEntry]:
    """At most ``limit`` files, deterministic for (files, seed), spread over classes round-robin.

    Classes are visited in a seeded random order, each contributing its next seeded-random
    file, so with ``limit >= n_classes`` every class is represented. Result sorted by relpath.
    """
    files = sorted(files, key=lambda e: e.relpath)
    if limit >= len(files):
        return files
    rng = np.random.default_rng(seed)
    groups: dict[str, list[FileEntry]] = defaultdict(list)
    for e in files:
        groups[e.wnid].append(e)
    wnids = sorted(groups)
    queues = []
    for w in wnids:
        g = groups[w]
        queues.append([g[j] for j in rng.permutation(len(g))])
    order = [queues[j] for j in rng.permutation(len(queues))]
    chosen: list[FileEntry] = []
    depth = 0
    while len(chosen) < limit:
        for q in order:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == limit:
                    break
        depth += 1
    return sorted(chosen, key=lambda e: e.relpath)


def build_protocol(
    id_dir: Union[str, os.PathLike],
    ood_dir: Union[str, os.PathLike],
    protocol: str,
    ood_list: Optional[Union[str, os.PathLike]] = None,
    ood_list_mode: str = "exclude",
    limit: Optional[int] = None,
    seed: int = 0,
    ood_subset: Optional[str] = None,
) -> ProtocolSpec:
    """Scan both folders and apply ``protocol`` (one of PROTOCOLS).

    ``ood_list``: text file of OOD relpaths or bare filenames to exclude (``ood_list_mode=
    "exclude"``) or to keep exclusively (``"keep"``), e.g. a cleaned ImageNet-O subset.
    ``limit``: quick look with at most ``limit`` ID and ``limit`` OOD images (seeded,
    stratified over classes). ``ood_subset``: ``ninco-clean`` / ``ninco-contaminated`` keeps the
    ImageNet-O images NINCO judged so (oodcore.data.oodsets). The class mask never depends on
    ``ood_list``, ``ood_subset`` or ``limit``. Under ``full`` and ``id-classes`` the OOD folder may be
    flat (``<root>/<image>``).
    """
    from oodcore.data.oodsets import apply_subset, is_imagenet_shaped, scan_flat_folder

    if protocol not in PROTOCOLS:
        raise DatasetError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if ood_list_mode not in OOD_LIST_MODES:
        raise DatasetError(f"unknown ood_list_mode {ood_list_mode!r}; choose 'exclude' or 'keep'")
    if limit is not None and int(limit) <= 0:
        raise DatasetError(f"limit must be a positive number of images, got {limit}")
    notes: list[str] = []

    id_scan = scan_image_folder(id_dir, strict_wnids=True)  # ID labels need ImageNet-1K classes
    # Only imagenet-o builds its mask from the OOD folders, so only there must they be 1K classes.
    if protocol != "imagenet-o" and not _wnid_dirs(Path(ood_dir).expanduser()) and Path(ood_dir).is_dir():
        flat_root, flat_entries, flat_ignored = scan_flat_folder(ood_dir)
        ood_scan = ScanResult(flat_root, flat_entries, flat_ignored)
    else:
        if protocol == "imagenet-o" and Path(ood_dir).is_dir() and not is_imagenet_shaped(ood_dir):
            if not _wnid_dirs(Path(ood_dir).expanduser()):
                raise DatasetError(
                    f"{ood_dir} is a flat folder (no <wnid>/ class folders): protocol 'imagenet-o' takes its class "
                    "mask from an ImageNet-O-shaped set; add one (--ood-dir or --ood NAME=PATH) or use --protocol full"
                )
        ood_scan = scan_image_folder(ood_dir, strict_wnids=(protocol == "imagenet-o"))
    if ood_scan.non_imagenet_wnids:
        notes.append(
            f"OOD folder has {len(ood_scan.non_imagenet_wnids)} class folder(s) outside ImageNet-1K "
            f"(fine for protocol {protocol!r})"
        )
    ignored = [f"{id_scan.root.as_posix()}/{r}" for r in id_scan.ignored]
    ignored += [f"{ood_scan.root.as_posix()}/{r}" for r in ood_scan.ignored]
    if ignored:
        notes.append(f"{len(ignored)} non-image file(s)/folder(s) ignored")
    scan_skipped = [{"split": "id", **d} for d in id_scan.skipped] + [{"split": "ood", **d} for d in ood_scan.skipped]

    all_wnids = imagenet_wnids()
    w2i = wnid_to_index()
    if protocol == "imagenet-o":
        mask = ood_scan.class_wnids
        empty = sorted(set(mask) - {e.wnid for e in ood_scan.entries})
        if empty:
            notes.append(
                f"{len(empty)} OOD class folder(s) hold no image but still count in the mask: "
                + ", ".join(empty[:_MAX_LISTED])
            )
    elif protocol == "full":
        mask = all_wnids
    else:  # id-classes
        mask = id_scan.class_wnids
        overlap = sorted(set(mask) & set(ood_scan.class_wnids))
        if overlap:
            notes.append(
                f"{len(overlap)} OOD class folder(s) are also ID classes (allowed, but those OOD "
                f"images are not held-out classes): " + ", ".join(overlap[:_MAX_LISTED])
            )
    mask = sorted(set(mask), key=w2i.__getitem__)
    mask_pos = {w: j for j, w in enumerate(mask)}

    id_files = [e for e in id_scan.entries if e.wnid in mask_pos]
    if not id_files:
        if protocol == "imagenet-o":
            raise DatasetError(
                f"the ID folder {id_scan.root} has no image of the OOD folder's {len(mask)} classes; "
                "protocol 'imagenet-o' scores ID images of those classes only (is the ID folder the "
                "ImageNet-1K val set?)"
            )
        raise DatasetError(f"no ID images left for protocol {protocol!r} in {id_scan.root}")
    missing = len(set(mask) - {e.wnid for e in id_files})
    if missing:
        notes.append(f"{missing} of {len(mask)} masked classes have no ID image")

    ood_files = list(ood_scan.entries)
    excluded: list[str] = []
    if ood_list is not None:
        items = read_ood_list(ood_list)
        ood_files, excluded = _apply_ood_list(ood_files, items, ood_list_mode, notes)
        notes.append(f"ood_list ({ood_list_mode}): {len(ood_files)} OOD file(s) kept, {len(excluded)} excluded")
    if ood_subset is not None:
        before = {e.relpath for e in ood_files}
        ood_files, note = apply_subset(ood_files, ood_subset)
        kept = {e.relpath for e in ood_files}
        excluded += sorted(before - kept)
        notes.append(note)
    if not ood_files:
        raise DatasetError(
            f"no OOD images left in {ood_scan.root}"
            + (f" after applying the ood_list ({ood_list_mode})" if ood_list is not None else "")
            + (f" after --ood-subset {ood_subset}" if ood_subset is not None else "")
        )

    if limit is not None:
        n_id, n_ood = len(id_files), len(ood_files)
        id_files = stratified_subset(id_files, int(limit), seed)
        ood_files = stratified_subset(ood_files, int(limit), seed + 1)
        notes.append(
            f"limit={limit}: quick look with {len(id_files)}/{n_id} ID and {len(ood_files)}/{n_ood} OOD images"
        )

    return ProtocolSpec(
        name=protocol,
        class_wnids=mask,
        class_indices=np.array([w2i[w] for w in mask], dtype=np.int64),
        id_root=id_scan.root,
        ood_root=ood_scan.root,
        id_files=id_files,
        ood_files=ood_files,
        id_labels=np.array([mask_pos[e.wnid] for e in id_files], dtype=np.int64),
        ignored=ignored,
        excluded=excluded,
        notes=notes,
        scan_skipped=scan_skipped,
    )
