"""Fixed, seeded splits that keep OOD tuning honest.

Anything chosen or trained with OOD data sees only the *exposure* part of the
OOD set and is reported on the *held-out* part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_SEED = 0
EXPOSURE_FRACTION = 0.5


@dataclass(frozen=True)
class OodSplit:
    exposure: np.ndarray  # indices into the OOD rows
    heldout: np.ndarray
    seed: int
    fraction: float

    def describe(self) -> str:
        return (
            f"tuned on the OOD exposure split ({len(self.exposure)} images, "
            f"{self.fraction:.0%}, seed {self.seed}); scored on the held-out {len(self.heldout)}"
        )

    def tag(self) -> str:
        return f"ood-exposure-{self.fraction:g}-seed{self.seed}"

    uses_tune_set = False

    def restricted(self, base_rows: np.ndarray) -> "OodSplit":
        """This split seen from a subset of the OOD rows (`base_rows`: each subset row's index in the full set)."""
        base_rows = np.asarray(base_rows)
        return OodSplit(
            np.flatnonzero(np.isin(base_rows, self.exposure)),
            np.flatnonzero(np.isin(base_rows, self.heldout)),
            self.seed,
            self.fraction,
        )


@dataclass(frozen=True)
class TuneSetSplit:
    """A separate OOD tuning set (--tune-ood): OOD-tuned choices use all of it; every test row is scored."""

    name: str
    n_tune: int
    heldout: np.ndarray  # every row of the OOD test set(s)
    exposure = None
    uses_tune_set = True

    def describe(self) -> str:
        return f"tuned on the separate OOD tuning set {self.name!r} ({self.n_tune} images); scored on all {len(self.heldout)} test OOD images"

    def tag(self) -> str:
        return f"tune-set:{self.name}"


def ood_split(n_ood: int, seed: int = SPLIT_SEED, fraction: float = EXPOSURE_FRACTION) -> OodSplit:
    """Split OOD row indices into exposure / held-out parts, reproducibly."""
    if n_ood < 2:
        raise ValueError("need at least 2 OOD images to split them into exposure and held-out parts")
    perm = np.random.default_rng(seed).permutation(n_ood)
    n_exp = min(max(1, int(round(n_ood * fraction))), n_ood - 1)
    return OodSplit(np.sort(perm[:n_exp]), np.sort(perm[n_exp:]), seed, fraction)


FIT_FRACTION = 0.2


def id_fit_split(
    labels: np.ndarray, fraction: float = FIT_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of ID rows into (fit, eval) indices.

    Fitted detectors (class means, covariances, percentiles, neighbours) see only
    the fit rows, which are never evaluated; every method is scored on the eval rows.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fit fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    fit = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = int(round(fraction * len(rows)))
        fit.append(rng.permutation(rows)[:take])
    fit_idx = np.sort(np.concatenate(fit)) if fit else np.zeros(0, np.int64)
    eval_idx = np.setdiff1d(np.arange(len(labels)), fit_idx)
    return fit_idx, eval_idx


FIT_PER_CLASS = 10


def find_train_root(id_dir: str | Path, id_root: Path) -> Path | None:
    """`train/` beside the ID images when the ID folder is an ImageNet root (`<root>/train`, `<root>/val`)."""
    for candidate in (Path(id_dir) / "train", Path(id_root).parent / "train" if Path(id_root).name == "val" else None):
        if candidate is not None and candidate.is_dir() and candidate.resolve() != Path(id_root).resolve():
            return candidate.resolve()
    return None


def sample_train(train_root: Path, class_wnids: list[str], per_class: int = FIT_PER_CLASS, seed: int = SPLIT_SEED):
    """A seeded sample of `per_class` images of each class from `train/<wnid>/` -> (entries, labels).

    Each class draws from its own seed (seed, ImageNet class index), so the sample of a class does
    not depend on which other classes are masked. Labels index `class_wnids`. Only the class folders
    of the mask are listed, never the whole train set.
    """
    import os

    from oodcore.data.folders import FileEntry
    from oodcore.data.imagenet import wnid_to_index
    from oodcore.data.images import is_image_file

    w2i = wnid_to_index()
    entries, labels = [], []
    for label, wnid in enumerate(class_wnids):
        folder = Path(train_root) / wnid
        if not folder.is_dir():
            continue
        names = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name) and e.name[0] != ".")
        rng = np.random.default_rng([seed, w2i.get(wnid, label)])
        for name in sorted(names[i] for i in rng.permutation(len(names))[:per_class]):
            st = os.stat(folder / name)
            entries.append(FileEntry(f"{wnid}/{name}", wnid, int(st.st_size), int(st.st_mtime_ns)))
            labels.append(label)
    return entries, np.asarray(labels, dtype=np.int64)


def outlier_source(split) -> str:
    """Words for where OOD training data came from."""
    return f"the OOD tuning set {split.name!r}" if split.uses_tune_set else "the OOD exposure split"


def outlier_features(data, split) -> np.ndarray:
    """The OOD rows a training run may learn from: the tuning set's features, or the exposure split's."""
    if split.uses_tune_set:
        if data.tune.features is None:
            raise ValueError("the OOD tuning set has no cached features")
        return data.tune.features
    return data.ood.features[split.exposure]
