"""The in-memory view of one cached (benchmark, architecture) run.

Every method is a pure function of this object; nothing here imports torch, so
pages that only read the cache stay light.
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

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    def __len__(self) -> int:
        return len(self.logits)


@dataclass
class OdinGrid:
    """ODIN scores precomputed on the (T, eps) grid: shape (N, len(temps), len(eps))."""

    temps: np.ndarray
    eps: np.ndarray
    id: np.ndarray
    ood: np.ndarray

    def index(self, temperature: float, epsilon: float) -> tuple[int, int] | None:
        ti = np.flatnonzero(np.isclose(self.temps, temperature, rtol=1e-6, atol=0))
        ei = np.flatnonzero(np.isclose(self.eps, epsilon, rtol=1e-6, atol=1e-12))
        if len(ti) == 0 or len(ei) == 0:
            return None
        return int(ti[0]), int(ei[0])


@dataclass
class TrainedScores:
    """Scores of a detector trained by a training run (energy fine-tuning, a flow).

    It was trained with the OOD exposure split, so it is only ever evaluated on
    the held-out OOD rows (see oodcore.splits); `meta` says what it was trained on.
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

    @property
    def n_classes(self) -> int:
        return len(self.class_ids)

    def id_top1(self) -> float:
        return float(np.mean(self.id.preds == self.id.labels)) if len(self.id) else float("nan")
