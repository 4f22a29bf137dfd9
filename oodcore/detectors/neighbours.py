"""NNGuide: energy guided by the nearest energy-scaled fit features (search: oodcore.detectors.search).

NNGuide's score needs, per query row, the mean of its top-k similarities: the state keeps, per
split, that mean for every k the slider offers (one search), so a k slider reads a column.  numpy (+ optional faiss).
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import logsumexp, slider_values
from oodcore.detectors.registry import Param, register
from oodcore.detectors.search import QUERY_BATCH, TABLE_K_MAX, RowMemo, normalised32, top_similarities

# ----------------------------------------------------------------------------- NNGuide

NNGUIDE_K = Param(
    "k",
    "neighbour k",
    100.0,
    1.0,
    500.0,
    "log",
    help="guidance = mean of the k largest similarities to the energy-scaled fit bank (clipped to the fit size); the paper uses 100 on ImageNet",
)


def fit_nnguide(ctx: FitContext) -> dict:
    """The guidance bank: every fit feature normalised and scaled by its confidence logsumexp(logits), float32."""
    fit = ctx.require_fit(features=True)
    conf = logsumexp(np.asarray(fit.logits, dtype=np.float64))
    bank = normalised32(fit.features) * conf.astype(np.float32)[:, None]
    return {"bank": bank, "memo": RowMemo()}


def _guidance_table(state: dict, feats: np.ndarray) -> dict[int, np.ndarray]:
    """Per split, once: the mean of the top-k bank similarities for every k the slider offers up to TABLE_K_MAX."""
    n_bank = len(state["bank"])
    ks = sorted({int(min(max(1, round(v)), n_bank)) for v in slider_values(NNGUIDE_K) if v <= TABLE_K_MAX})
    out = {k: np.empty(len(feats)) for k in ks}
    for start in range(0, len(feats), QUERY_BATCH):
        sims = top_similarities(normalised32(feats[start : start + QUERY_BATCH]), state["bank"], ks[-1])
        sums = np.cumsum(sims, axis=1, dtype=np.float64)
        for k in ks:
            out[k][start : start + len(sims)] = sums[:, k - 1] / k
    return out


@register(
    "nnguide",
    "NNGuide",
    fit=fit_nnguide,
    params=(NNGUIDE_K,),
    needs=("logits", "features", "fit"),
    paper="Park et al. 2023 (ICCV), Nearest Neighbor Guidance for Out-of-Distribution Detection",
)
def nnguide(state, rows, k):
    """-E(x) · mean_k⟨f̂(x), E(z) f̂(z)⟩: the energy confidence guided by the k nearest energy-scaled fit features.

    E = logsumexp of the logits (the confidence, higher for ID), f̂ = f / ||f||.  The bank holds
    every fit row (the paper samples 1% of ImageNet train; fit on a subset for that).  The top-k
    search is exact (faiss flat inner-product index, or numpy); per split, the guidance of every k
    the slider offers comes from one search, so a slider move is a column read.
    """
    feats = split_features(rows)
    kk = int(min(max(1, round(k)), len(state["bank"])))
    conf = logsumexp(np.asarray(rows.logits, dtype=np.float64))
    table = state["memo"].get("guidance", feats, lambda: _guidance_table(state, feats))
    if kk in table:
        guidance = table[kk]
    else:
        sims = np.concatenate(
            [
                top_similarities(normalised32(feats[b : b + QUERY_BATCH]), state["bank"], kk)
                for b in range(0, len(feats), QUERY_BATCH)
            ]
        )
        guidance = sims.sum(axis=1, dtype=np.float64) / kk
    return -guidance * conf
