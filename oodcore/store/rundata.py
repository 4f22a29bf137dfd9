"""The in-memory view of one cached (benchmark, architecture) run.

Detectors are fitted on its fit split and head and score its rows (oodcore.detectors);
nothing here imports torch, so pages that only read the cache stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SplitArrays:
    """Rows of one split (id, ood or fit); logits are already restricted to the protocol's classes."""

    logits: np.ndarray  # (N, K) float32
    features: np.ndarray | None  # (N, D) float32, penultimate layer
    labels: np.ndarray  # (N,) int64, index within the K classes; -1 for OOD
    paths: np.ndarray  # (N,) str, relative to the split's root
    # Per-row values computed by a pass over the images, not from logits/features: "odin" -> OdinRows,
    # "trained/<name>" -> (N,) scores of a trained detector. A new image has none of them.
    precomputed: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Predictions stored beside reduced-precision logits (a shared bundle's float16 logits can tie or
    # round differently from the network's); None: the argmax of the logits.
    predictions: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(axis=1) if self.predictions is None else self.predictions

    def __len__(self) -> int:
        return len(self.logits)


@dataclass
class OdinRows:
    """One split's rows of the ODIN grid: values (N, len(temps), len(eps))."""

    temps: np.ndarray
    eps: np.ndarray
    values: np.ndarray

    def index(self, temperature: float, epsilon: float) -> tuple[int, int] | None:
        ti = np.flatnonzero(np.isclose(self.temps, temperature, rtol=1e-6, atol=0))
        ei = np.flatnonzero(np.isclose(self.eps, epsilon, rtol=1e-6, atol=1e-12))
        if len(ti) == 0 or len(ei) == 0:
            return None
        return int(ti[0]), int(ei[0])


@dataclass
class OdinGrid:
    """ODIN scores precomputed on the (T, eps) grid: shape (N, len(temps), len(eps))."""

    temps: np.ndarray
    eps: np.ndarray
    id: np.ndarray
    ood: np.ndarray
    tune: np.ndarray | None = None  # the tuning set's rows, when the run has one

    def index(self, temperature: float, epsilon: float) -> tuple[int, int] | None:
        return OdinRows(self.temps, self.eps, self.id).index(temperature, epsilon)

    def rows(self, split: str) -> OdinRows:
        return OdinRows(self.temps, self.eps, {"id": self.id, "ood": self.ood, "tune": self.tune}[split])


@dataclass(frozen=True)
class OodSet:
    """A named OOD test set: rows [start, stop) of the run's `ood` split, with its group (near, far, ...)."""

    name: str
    group: str | None
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.start, self.stop)


@dataclass
class TrainedScores:
    """Scores of a detector trained by a training run (energy fine-tuning, a flow).

    It was trained with the OOD exposure split, so it is only ever evaluated on
    the held-out OOD rows (see oodcore.data.splits); `meta` says what it was trained on.
    """

    id: np.ndarray
    ood: np.ndarray
    meta: dict[str, Any]


@dataclass
class BenchmarkData:
    benchmark: str
    arch: str
    protocol: str
    class_ids: list[str]  # wnids (or demo class ids), K of them
    class_names: list[str]
    id: SplitArrays
    ood: SplitArrays
    head_weight: np.ndarray | None = None  # (K, D)
    head_bias: np.ndarray | None = None  # (K,)
    fit: SplitArrays | None = None
    odin: OdinGrid | None = None
    trained: dict[str, "TrainedScores"] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # Fitted detector state of this run, memoised by method and fit parameters (oodcore.detectors.fitting).
    states: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The OOD test sets `ood` concatenates, in order (one set for a single-set run); see oodcore.store.scopes.
    ood_sets: list[OodSet] = field(default_factory=list)
    # The OOD tuning set (--tune-ood): OOD-tuned choices and training use it; it is never evaluated.
    tune: SplitArrays | None = None
    tune_name: str | None = None
    # A view on some of the sets (oodcore.store.scopes.select): each `ood` row's position in the full run's `ood`.
    ood_base: np.ndarray | None = field(default=None, repr=False, compare=False)
    n_ood_all: int | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting the splits, the ODIN grid or the trained scores keeps each split's per-row values in step."""
        super().__setattr__(name, value)
        if name in ("id", "ood", "odin", "trained", "tune") and all(
            k in self.__dict__ for k in ("id", "ood", "odin", "trained", "tune")
        ):
            self.attach_precomputed()

    def attach_precomputed(self) -> None:
        """Give the ID and OOD splits their rows of the ODIN grid and of every trained detector's scores."""
        for split in ("id", "ood", "tune"):
            rows = getattr(self, split)
            if rows is None:
                continue
            rows.precomputed = {k: v for k, v in rows.precomputed.items() if not k.startswith(("odin", "trained/"))}
            if self.odin is not None and (split != "tune" or self.odin.tune is not None):
                rows.precomputed["odin"] = self.odin.rows(split)
            for name, scores in self.trained.items():
                if split != "tune":
                    rows.precomputed[f"trained/{name}"] = getattr(scores, split)

    @property
    def n_classes(self) -> int:
        return len(self.class_ids)

    def tuning_split(self):
        """Where OOD-tuned choices learn and what they are then scored on (oodcore.data.splits).

        With a tuning set: all of it, and every test row. Without: the seeded exposure/held-out
        split of the run's full `ood` rows, restricted to this view's rows.
        """
        from oodcore.data.splits import TuneSetSplit, ood_split

        if self.tune is not None:
            return TuneSetSplit(self.tune_name or "tune", len(self.tune), np.arange(len(self.ood)))
        n_all = self.n_ood_all if self.n_ood_all is not None else len(self.ood)
        if n_all < 2:
            return None
        split = ood_split(n_all)
        if self.ood_base is None:
            return split
        return split.restricted(self.ood_base)

    def id_top1(self) -> float:
        return float(np.mean(self.id.preds == self.id.labels)) if len(self.id) else float("nan")
