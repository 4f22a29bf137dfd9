"""Resolve a study's OOD sets (and tuning set) against one protocol: which files each set scores.

The protocol (class mask, ID files) is built once against the *primary* set: under ``imagenet-o``
the first ImageNet-O-shaped set (its wnid folders are the mask), otherwise the first set. Every
other set is scanned on its own (ImageNet-O-shaped or flat) and never changes the mask, so adding
a set later leaves the ID extraction's key, and so its cache, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodcore.data.folders import DatasetError, FileEntry, scan_image_folder
from oodcore.data.oodsets import (
    OodSetArg,
    apply_subset,
    is_imagenet_shaped,
    keep_listed,
    read_imglist,
    scan_flat_folder,
)
from oodcore.data.protocols import ProtocolSpec, build_protocol, stratified_subset


@dataclass
class ResolvedSet:
    name: str
    group: str | None
    root: Path
    files: list[FileEntry]
    imagenet_shaped: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "root": str(self.root),
            "n_files": len(self.files),
            "imagenet_shaped": self.imagenet_shaped,
            "notes": list(self.notes),
        }


def _subset_for(subsets: dict[str | None, str], name: str, imagenet_shaped: bool) -> str | None:
    """`--ood-subset KIND` applies to every ImageNet-O-shaped set; `--ood-subset NAME=KIND` to that set."""
    if name in subsets:
        return subsets[name]
    return subsets.get(None) if imagenet_shaped else None


def _scan_set(arg: OodSetArg, subset: str | None, limit: int | None, seed: int) -> ResolvedSet:
    shaped = is_imagenet_shaped(arg.path)
    notes: list[str] = []
    if shaped:
        scan = scan_image_folder(arg.path, strict_wnids=True)
        root, files = scan.root, list(scan.entries)
    else:
        root, files, _ = scan_flat_folder(arg.path)
    if arg.imglist:
        files, note = keep_listed(files, read_imglist(arg.imglist), Path(arg.path).name)
        notes.append(note)
    if subset is not None:
        if not shaped:
            raise DatasetError(f"--ood-subset {subset} matches <wnid>/<file>: set {arg.name!r} has no wnid folders")
        files, note = apply_subset(files, subset)
        notes.append(f"{arg.name}: {note}")
    if not files:
        raise DatasetError(f"OOD set {arg.name!r} ({arg.path}) has no images left to score")
    if limit is not None:
        n = len(files)
        files = stratified_subset(files, int(limit), seed)
        notes.append(f"{arg.name}: limit={limit}: {len(files)}/{n} images")
    return ResolvedSet(arg.name, arg.group, root, files, shaped, notes)


def resolve_study(
    id_dir: str,
    sets: list[OodSetArg],
    protocol: str,
    *,
    tune: OodSetArg | None = None,
    subsets: dict[str | None, str] | None = None,
    ood_list: str | None = None,
    ood_list_mode: str = "exclude",
    limit: int | None = None,
    seed: int = 0,
) -> tuple[ProtocolSpec, list[ResolvedSet], ResolvedSet | None]:
    """(protocol spec built on the primary set, every test set resolved in the given order, the tuning set)."""
    if not sets:
        raise DatasetError("no OOD set given (--ood-dir, --ood NAME=PATH or --openood-root)")
    names = [s.name for s in sets] + ([tune.name] if tune else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"OOD set names must be unique: {', '.join(dupes)} given twice")
    for s in [*sets, *([tune] if tune else [])]:
        if not Path(s.path).expanduser().is_dir():
            raise DatasetError(f"OOD set {s.name!r}: {s.path} is not a folder")
    subsets = dict(subsets or {})
    unknown = sorted(k for k in subsets if k is not None and k not in names)
    if unknown:
        raise DatasetError(f"--ood-subset names an unknown set: {', '.join(unknown)}")
    shaped = [is_imagenet_shaped(s.path) for s in sets]
    if protocol == "imagenet-o":
        if not any(shaped):
            raise DatasetError(
                "protocol 'imagenet-o' takes its class mask from an ImageNet-O-shaped OOD set (<root>/<wnid>/<image>), "
                "and none was given; add one or use --protocol full"
            )
        primary = shaped.index(True)
    else:
        primary = 0
    p = sets[primary]
    subset = _subset_for(subsets, p.name, shaped[primary])
    spec = build_protocol(
        id_dir,
        p.path,
        protocol,
        ood_list=ood_list,
        ood_list_mode=ood_list_mode,
        limit=limit,
        seed=seed,
        ood_subset=subset,
    )
    first = ResolvedSet(p.name, p.group, spec.ood_root, spec.ood_files, shaped[primary])
    if p.imglist:
        files, note = keep_listed(spec.ood_files, read_imglist(p.imglist), Path(p.path).name)
        first.files, spec.ood_files = files, files
        first.notes.append(note)
    resolved = []
    for i, s in enumerate(sets):
        if i == primary:
            resolved.append(first)
            continue
        if ood_list is not None:
            spec.notes.append(f"--ood-list applies to the primary set {p.name!r} only, not {s.name!r}")
        resolved.append(_scan_set(s, _subset_for(subsets, s.name, shaped[i]), limit, seed + 1 + i))
        spec.notes.extend(resolved[-1].notes)
    tuned = None
    if tune is not None:
        tuned = _scan_set(tune, subsets.get(tune.name), limit, seed + 101)
        spec.notes.extend(tuned.notes)
        shared = {str(s.root / e.relpath) for s in resolved for e in s.files} & {
            str(tuned.root / e.relpath) for e in tuned.files
        }
        if shared:
            raise DatasetError(
                f"the tuning set {tune.name!r} shares {len(shared)} image(s) with the test sets (e.g. "
                f"{sorted(shared)[0]}); a tuning set must be disjoint from what is scored"
            )
    if protocol == "imagenet-o":
        mask = set(spec.class_wnids)
        for s in resolved:
            outside = sorted({e.wnid for e in s.files if e.wnid} - mask) if s.imagenet_shaped else []
            if outside:
                spec.notes.append(f"set {s.name!r}: {len(outside)} wnid folder(s) outside the class mask (kept as OOD)")
    return spec, resolved, tuned


def ood_labels(n: int) -> np.ndarray:
    return np.full(n, -1, np.int64)
