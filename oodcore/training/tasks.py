"""What a trainer provides to the job loop (a Task), and the demo's cached pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from oodcore.training.files import JobError


class Task:
    """One detector's training problem; oodcore.training.energy / oodcore.training.flow implement it.

    `batches(epoch)` must be deterministic given the epoch (seeded per epoch), so a resumed
    run sees the same batches as an uninterrupted one.
    """

    name: str = ""
    label: str = ""
    summary: str = ""
    paper: str = ""
    baseline: tuple[str, dict] = ("msp", {})  # a registered method: the untuned reference
    baseline_note: str = ""
    terms: tuple[str, str] = ("id term", "ood term")  # what loss.csv's id_term / ood_term mean
    trained_on: dict = {}
    model: Any = None

    def n_batches(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterable:
        raise NotImplementedError

    def loss(self, batch) -> tuple[Any, float, float]:
        """(loss tensor, id term, ood term)."""
        raise NotImplementedError

    def score(self) -> tuple[np.ndarray, np.ndarray]:
        """OOD scores (higher = more OOD) of the trained model on every ID eval and every OOD row."""
        raise NotImplementedError

    def extra_meta(self) -> dict:
        return {}


def demo_pixels(data) -> dict[str, np.ndarray]:
    """The demo's 16x16 pixels of the cached fit / id / ood rows, in the cache's row order.

    The cache keeps no pixels, but the demo's rows are oodcore.demo.demo_splits() in order; this is
    checked against the cached paths (`digit<d>/<original index>.png`) rather than assumed.
    """
    from oodcore.extraction import demo

    splits = demo.demo_splits()
    out = {}
    for name in ("fit", "id", "ood"):
        rows = getattr(data, name)
        pixels, _, original = splits[name]
        if rows is None:
            raise JobError(f"the demo cache has no {name} split; rebuild it with `python -m oodcore demo --rebuild`")
        cached = np.asarray([int(Path(str(p)).stem) for p in rows.paths])
        if len(cached) != len(original) or not np.array_equal(cached, original):
            raise JobError(
                f"the cached demo {name} rows do not match oodcore.demo.demo_splits(); "
                "rebuild the demo with `python -m oodcore demo --rebuild`"
            )
        out[name] = pixels
    return out
