"""Nearest-neighbour search over the ID fit split, and NNGuide.

`top_similarities(queries, bank, k)` returns each query's k largest inner products with the
bank rows, sorted descending: through faiss (an exact flat inner-product index, batched
queries; GPU when faiss-gpu and a GPU are present) when faiss is installed, else numpy (one
float32 product per row chunk and a partition).  Both are exact float32 searches.

NNGuide's score needs, per query row, the mean of its top-k similarities: the state keeps, per
split, the running sums of the top-k_max similarities (computed once), so a k slider reads a
column.  numpy (+ optional faiss).
"""

from __future__ import annotations

import numpy as np

from oodcore.detectors.features import split_features
from oodcore.detectors.fitting import FitContext
from oodcore.detectors.numerics import logsumexp, row_chunks
from oodcore.detectors.registry import Param, register
from oodcore.detectors.shaping import RowMemo

QUERY_BATCH = 4096


def faiss_module():
    """faiss when installed (faiss-cpu or faiss-gpu), else None."""
    try:
        import faiss
    except ImportError:  # the light core runs without it: numpy search
        return None
    return faiss


def _faiss_index(faiss, bank: np.ndarray):
    index = faiss.IndexFlatIP(bank.shape[1])
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # faiss-gpu
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(bank)
    return index


def top_similarities(queries: np.ndarray, bank: np.ndarray, k: int, use_faiss: bool | None = None) -> np.ndarray:
    """(N, k) float32: each query row's k largest inner products with the bank rows, descending (exact search)."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    k = int(min(max(1, k), len(bank)))
    out = np.empty((len(queries), k), dtype=np.float32)
    faiss = faiss_module() if use_faiss in (None, True) else None
    if use_faiss and faiss is None:
        raise RuntimeError("faiss is not installed: pip install faiss-cpu")
    if faiss is not None and k <= 2048:  # faiss's flat-index search caps k at 2048 (GPU) / heap size
        index = _faiss_index(faiss, bank)
        for start in range(0, len(queries), QUERY_BATCH):
            q = np.ascontiguousarray(queries[start : start + QUERY_BATCH], dtype=np.float32)
            sims, _ = index.search(q, k)
            out[start : start + len(q)] = sims
        return out
    for sl in row_chunks(len(queries), len(bank) + queries.shape[1], 4):
        sims = np.asarray(queries[sl], dtype=np.float32) @ bank.T
        if k < len(bank):
            sims = np.partition(sims, len(bank) - k, axis=1)[:, len(bank) - k :]
        out[sl] = -np.sort(-sims, axis=1)
    return out


def normalised32(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float64 norms), as float32."""
    out = np.empty(x.shape, dtype=np.float32)
    for sl in row_chunks(len(x), x.shape[1]):
        r = np.asarray(x[sl], dtype=np.float64)
        out[sl] = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return out


# ----------------------------------------------------------------------------- NNGuide

NNGUIDE_K_MAX = 500


def fit_nnguide(ctx: FitContext) -> dict:
    """The guidance bank: every fit feature normalised and scaled by its confidence logsumexp(logits), float32."""
    fit = ctx.require_fit(features=True)
    conf = logsumexp(np.asarray(fit.logits, dtype=np.float64))
    bank = normalised32(fit.features) * conf.astype(np.float32)[:, None]
    return {"bank": bank, "k_max": int(min(NNGUIDE_K_MAX, len(bank))), "memo": RowMemo()}


def _guidance_sums(state: dict, feats: np.ndarray) -> np.ndarray:
    """(N, k_max) float64 running sums of each row's top-k_max bank similarities (computed once per split)."""

    def build():
        sims = top_similarities(normalised32(feats), state["bank"], state["k_max"])
        return np.cumsum(sims, axis=1, dtype=np.float64)

    return state["memo"].get("guidance", feats, build)


@register(
    "nnguide",
    "NNGuide",
    fit=fit_nnguide,
    params=(
        Param(
            "k",
            "neighbour k",
            100.0,
            1.0,
            float(NNGUIDE_K_MAX),
            "log",
            help="guidance = mean of the k largest similarities to the energy-scaled fit bank (clipped to the fit size); the paper uses 100 on ImageNet",
        ),
    ),
    needs=("logits", "features", "fit"),
    paper="Park et al. 2023 (ICCV), Nearest Neighbor Guidance for Out-of-Distribution Detection",
)
def nnguide(state, rows, k):
    """-E(x) · mean_k⟨f̂(x), E(z) f̂(z)⟩: the energy confidence guided by the k nearest energy-scaled fit features.

    E = logsumexp of the logits (the confidence, higher for ID), f̂ = f / ||f||.  The bank holds
    every fit row (the paper samples 1% of ImageNet train; fit on a subset for that).  The top-k
    search is exact (faiss flat inner-product index, or numpy).
    """
    feats = split_features(rows)
    kk = int(min(max(1, round(k)), len(state["bank"])))
    conf = logsumexp(np.asarray(rows.logits, dtype=np.float64))
    if kk <= state["k_max"]:
        guidance = _guidance_sums(state, feats)[:, kk - 1] / kk
    else:
        guidance = top_similarities(normalised32(feats), state["bank"], kk).sum(axis=1, dtype=np.float64) / kk
    return -guidance * conf
