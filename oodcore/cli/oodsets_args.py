"""`run`'s OOD-set options: --ood NAME=PATH[:GROUP], --openood-root, --ood-subset, --tune-ood (oodcore.data.oodsets)."""

from __future__ import annotations

import argparse
import sys

from oodcore.data.folders import DatasetError
from oodcore.data.oodsets import OOD_SUBSETS, openood_sets, parse_ood_arg


def add_ood_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME=PATH[:GROUP]",
        help="a named OOD test set (repeatable), ImageNet-O-shaped or flat (<root>/<image>); GROUP e.g. near, far",
    )
    p.add_argument(
        "--openood-root",
        default=None,
        metavar="DIR",
        help="OpenOOD v1.5's data root: adds its ImageNet-1K OOD sets (ssb_hard, ninco -> near; inaturalist, "
        "textures, openimage_o -> far) selected by benchmark_imglist/imagenet/test_*.txt, and OpenImage-O's val "
        "list as the tuning set unless --tune-ood is given",
    )
    p.add_argument(
        "--ood-subset",
        action="append",
        default=[],
        metavar="[NAME=]KIND",
        help="ninco-clean (the 309 ImageNet-O images NINCO judged clean) or ninco-contaminated (the 78 holding an "
        "ImageNet object); applies to every ImageNet-O-shaped set, or to set NAME",
    )
    p.add_argument(
        "--tune-ood",
        default=None,
        metavar="NAME=PATH",
        help="a separate OOD tuning set: ODIN's (T, eps) and OOD-trained detectors use it and are then scored on "
        "every full test set; it is never evaluated (default: the test set's exposure split)",
    )


def ood_sets_from_args(args):
    """(--ood and --openood-root sets, the tuning set, --ood-subset by set name or None for all ImageNet-O-shaped)."""
    sets = [parse_ood_arg(text) for text in args.ood]
    tune = parse_ood_arg(args.tune_ood, flag="--tune-ood", allow_group=False) if args.tune_ood else None
    if args.openood_root:
        extra, openood_tune, notes = openood_sets(args.openood_root)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        sets += extra
        if tune is None and openood_tune is not None:
            tune = openood_tune
            print(f"note: tuning set: OpenOOD's OpenImage-O val list ({tune.imglist})", file=sys.stderr)
    if not sets and not args.ood_dir:
        raise DatasetError("give the OOD images: --ood-dir PATH, --ood NAME=PATH[:GROUP] or --openood-root DIR")
    subsets: dict[str | None, str] = {}
    for text in args.ood_subset:
        name, _, kind = text.rpartition("=")
        if kind not in OOD_SUBSETS:
            raise DatasetError(f"--ood-subset {text}: choose {' or '.join(OOD_SUBSETS)} (optionally NAME=KIND)")
        subsets[name or None] = kind
    return sets, tune, subsets
