"""NNGuide: energy guided by the nearest energy-scaled fit features (search: oodcore.detectors.search).

NNGuide's score needs, per query row, the mean of its top-k similarities: the state keeps, per
split, that mean for every k the slider offers (one search), so a k slider reads a column.  numpy (+ optional faiss).
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.logits import logit_stats, max_and_lse
from oodcore.detectors.numerics import logsumexp, slider_values
from oodcore.detectors.registry import Param, register
from oodcore.detectors.search import QUERY_BATCH, Bank, normalised32

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
    """The guidance bank: every fit feature normalised and scaled by its confidence logsumexp(logits) (float32),
    searched block by block (`search.Bank`), so a fit set of ImageNet-train size is never copied whole."""
    fit = ctx.require_fit(features=True)
    conf = logsumexp(fit.logits).astype(np.float32)
    return {"bank": Bank(fit.features, scale=conf), "memo": ctx.row_memo("nnguide"), "logits": logit_stats(ctx)}


def _guidance_table(state: dict, feats: np.ndarray) -> dict:
    """Per split, once (and stored beside the run): the mean of the top-k bank similarities for every k the
    slider offers, from one search per query batch.  {"ks": (m,) int64, "guidance": (N, m) float64}."""
    n_bank = len(state["bank"])
    ks = sorted({int(min(max(1, round(v)), n_bank)) for v in slider_values(NNGUIDE_K)})
    out = np.empty((len(feats), len(ks)))
    cols = np.asarray(ks) - 1
    for start in range(0, len(feats), QUERY_BATCH):
        sims = state["bank"].search(normalised32(feats[start : start + QUERY_BATCH]), ks[-1])[0]
        out[start : start + len(sims)] = np.cumsum(sims, axis=1, dtype=np.float64)[:, cols] / np.asarray(ks)
    return {"ks": np.asarray(ks, dtype=np.int64), "guidance": out}


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
    conf = max_and_lse(state.get("logits"), rows.logits)[1]  # shared with MSP and Energy
    table = state["memo"].get("guidance", feats, lambda: _guidance_table(state, feats))
    col = int(np.searchsorted(table["ks"], kk))
    if col < len(table["ks"]) and table["ks"][col] == kk:  # a value the slider offers: a column read
        guidance = np.asarray(table["guidance"][:, col], dtype=np.float64)
    else:
        sims = np.concatenate(
            [
                state["bank"].search(normalised32(feats[b : b + QUERY_BATCH]), kk)[0]
                for b in range(0, len(feats), QUERY_BATCH)
            ]
        )
        guidance = np.cumsum(sims, axis=1, dtype=np.float64)[:, -1] / kk  # as the table's columns
    return -guidance * conf
