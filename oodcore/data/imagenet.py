"""ImageNet-1K class metadata, taken from timm rather than hand-written.

A hand-typed class list is the classic source of silent off-by-one label bugs;
timm ships the canonical synset list (the same one its pretrained heads use),
so the class index here is exactly the index of the model's logit.
The standard ImageNet-1K index is the sorted order of the 1000 wnids.
"""

from __future__ import annotations

import re
from functools import lru_cache

NUM_CLASSES = 1000
WNID_RE = re.compile(r"^n\d{8}$")


def is_wnid(name: str) -> bool:
    """True for a WordNet id such as ``n01440764`` (any synset, not only ImageNet-1K)."""
    return bool(WNID_RE.match(name))


@lru_cache(maxsize=1)
def _info():
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@lru_cache(maxsize=1)
def _wnids() -> tuple[str, ...]:
    wnids = tuple(_info().label_names())
    # Guard the invariants everything downstream relies on (logit i <-> wnids[i]).
    if len(wnids) != NUM_CLASSES or len(set(wnids)) != NUM_CLASSES:
        raise RuntimeError(f"timm returned {len(wnids)} ImageNet-1K wnids ({len(set(wnids))} unique), expected 1000")
    if list(wnids) != sorted(wnids):
        raise RuntimeError("timm's ImageNet-1K wnids are not in sorted (standard index) order")
    return wnids


@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    info = _info()
    # Descriptions look like "tench, Tinca tinca"; the first lemma is the short name.
    # Note: two names repeat in ImageNet-1K ("crane" x2, "maillot" x2); use wnids as keys.
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(NUM_CLASSES))


@lru_cache(maxsize=1)
def _wnid_to_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(_wnids())}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K wnids in standard class-index order (a fresh list each call)."""
    return list(_wnids())


def imagenet_names() -> list[str]:
    """Short human-readable class names (first WordNet lemma, e.g. "tench"), index-aligned with wnids."""
    return list(_names())


def wnid_to_index() -> dict[str, int]:
    """Map wnid -> standard class index (a fresh dict each call, so callers may mutate it)."""
    return dict(_wnid_to_index())


def is_imagenet_wnid(wnid: str) -> bool:
    """True when ``wnid`` is one of the 1000 ImageNet-1K classes."""
    return wnid in _wnid_to_index()


def class_name(wnid: str) -> str:
    """Short name of an ImageNet-1K class; KeyError with a clear message for other wnids."""
    try:
        return _names()[_wnid_to_index()[wnid]]
    except KeyError:
        raise KeyError(f"{wnid!r} is not an ImageNet-1K wnid") from None


def class_description(wnid: str) -> str:
    """Full WordNet lemma list of an ImageNet-1K class, e.g. "tench, Tinca tinca"."""
    try:
        return _info().index_to_description(_wnid_to_index()[wnid])
    except KeyError:
        raise KeyError(f"{wnid!r} is not an ImageNet-1K wnid") from None
