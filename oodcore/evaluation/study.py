"""The study across architectures (no Streamlit): ID accuracy vs AUROC per architecture, the
architecture x method AUROC matrix, and the OOD images that fool every architecture.

The leaderboard frames come from `analysis.report_frame` (metrics in percent); the images that
fool every architecture are matched by their path in the OOD folder, which every run of a
benchmark shares.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

UNTUNED = "no"


def default_rows(frame):
    """The leaderboard rows of every method at its default setting (no tuned or trained rows)."""
    return frame[frame["tuned with OOD data"] == UNTUNED]


def accuracy_vs_auroc(frame, method_label: str):
    """One row per architecture for `method_label`: ID top-1 (%), AUROC (%) with its CI, n_id, n_ood.

    The seed study's question (its Figures 2-4): do more accurate classifiers detect OOD better?
    """
    rows = default_rows(frame)
    rows = rows[rows["method"] == method_label]
    cols = ["architecture", "ID top-1 (%)", "auroc", "auroc_lo", "auroc_hi", "fpr95", "n_id", "n_ood"]
    return rows[cols].sort_values("ID top-1 (%)", kind="stable").reset_index(drop=True)


def accuracy_auroc_correlation(points) -> float | None:
    """Spearman rank correlation of ID top-1 and AUROC across architectures (None below 3 architectures)."""
    if len(points) < 3:
        return None
    a = points["ID top-1 (%)"].rank().to_numpy(dtype=float)
    b = points["auroc"].rank().to_numpy(dtype=float)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def auroc_matrix(frame):
    """Architecture x method AUROC (%) at default settings, long form (architecture, method, auroc), methods in registry order."""
    rows = default_rows(frame)
    return rows[["architecture", "method", "auroc"]].reset_index(drop=True)


def fools_every_architecture(runs: Sequence[dict]):
    """The OOD images every architecture passes as ID, one row per image.

    `runs`: one dict per architecture {"arch", "paths" (the scored OOD rows' paths), "passed"
    (bool per scored row), "preds" (predicted class name per scored row), "scores"}.  An image
    counts only if every architecture scored it (matched by path) and passed it as ID.  Returns
    a DataFrame: path, then "<arch>: predicted" and "<arch>: score" per architecture, sorted by
    the mean rank of the scores (most ID-like first); and the number of images all runs scored.
    """
    import pandas as pd

    if not runs:
        return pd.DataFrame(columns=["path"]), 0
    common = None
    for r in runs:
        paths = set(np.asarray(r["paths"])[np.asarray(r["passed"], dtype=bool)].tolist())
        common = paths if common is None else common & paths
    scored = set(np.asarray(runs[0]["paths"]).tolist())
    for r in runs[1:]:
        scored &= set(np.asarray(r["paths"]).tolist())
    order = [p for p in np.asarray(runs[0]["paths"]).tolist() if p in common]
    frame = pd.DataFrame({"path": order})
    rank_sum = np.zeros(len(order))
    for r in runs:
        paths = np.asarray(r["paths"]).tolist()
        where = {p: i for i, p in enumerate(paths)}
        idx = np.array([where[p] for p in order], dtype=int)
        scores = np.asarray(r["scores"], dtype=np.float64)
        ranks = np.empty(len(scores))
        ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1) / max(len(scores), 1)
        frame[f"{r['arch']}: predicted"] = [r["preds"][i] for i in idx] if len(idx) else []
        frame[f"{r['arch']}: score"] = scores[idx] if len(idx) else []
        rank_sum += ranks[idx] if len(idx) else 0.0
    frame["mean rank (%)"] = 100 * rank_sum / len(runs)
    frame = frame.sort_values("mean rank (%)", kind="stable").reset_index(drop=True)
    return frame, len(scored)
