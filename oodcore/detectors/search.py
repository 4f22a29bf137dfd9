"""Nearest-neighbour search over the ID fit split and the per-split memo of what a slider only slices.

`top_neighbours(queries, bank, k)` returns each query's k largest inner products with the bank
rows (and their row indices), sorted descending: through faiss (an exact flat inner-product
index, batched queries; GPU when faiss-gpu and a GPU are present) when faiss is installed, else
numpy (one float32 product per row chunk and a partition).  Both are exact float32 searches.
No detector is registered here.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from oodcore.detectors.numerics import row_chunks


class RowMemo:
    """A per-array memo held by a fitted state: what a slider only slices, computed once per split.

    Keyed by the identity of the split's feature array (checked through a weak reference, so
    a new array at a recycled id is never served a stale entry); entries die with their array.
    """

    def __init__(self):
        self._store: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def get(self, name: str, array: np.ndarray, build):
        key = (name, id(array))
        with self._lock:
            hit = self._store.get(key)
            if hit is not None and hit[0]() is array:
                return hit[1]
        value = build()
        try:
            ref = weakref.ref(array, lambda _r, k=key, s=self._store: s.pop(k, None))
        except TypeError:  # not weak-referenceable (e.g. a memmap subclass edge case): no memo
            return value
        with self._lock:
            self._store[key] = (ref, value)
        return value


QUERY_BATCH = 4096
# The per-split neighbour tables cover the slider's k values up to this many neighbours: a deeper
# search (k = 500, 1000) costs several times the similarity product itself (selection, not BLAS,
# dominates), so those values are searched when asked for.
TABLE_K_MAX = 200


def faiss_module():
    """faiss when installed (faiss-cpu or faiss-gpu), else None."""
    try:
        import faiss
    except ImportError:  # the light core runs without it: numpy search
        return None
    return faiss


def faiss_index(bank: np.ndarray):
    """An exact flat inner-product faiss index over the float32 rows of `bank` (on the GPUs with faiss-gpu)."""
    faiss = faiss_module()
    index = faiss.IndexFlatIP(bank.shape[1])
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # faiss-gpu
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    return index


def top_neighbours(
    queries: np.ndarray, bank: np.ndarray, k: int, use_faiss: bool | None = None, index=None
) -> tuple[np.ndarray, np.ndarray]:
    """((N, k) float32 similarities, (N, k) int64 bank rows): each query's k largest inner products, descending.

    Exact search: faiss's flat inner-product index when available (`use_faiss` None) or asked (True),
    else numpy.  `index`: a prebuilt faiss index over `bank` (see `faiss_index`).
    """
    if bank is None and index is None:
        raise ValueError("top_neighbours needs the bank or a faiss index over it")
    bank = None if bank is None else np.ascontiguousarray(bank, dtype=np.float32)
    k = int(min(max(1, k), index.ntotal if bank is None else len(bank)))
    sims_out = np.empty((len(queries), k), dtype=np.float32)
    idx_out = np.empty((len(queries), k), dtype=np.int64)
    faiss = faiss_module() if use_faiss in (None, True) else None
    if use_faiss and faiss is None:
        raise RuntimeError("faiss is not installed: pip install faiss-cpu")
    if index is not None or (faiss is not None and k <= 2048):  # faiss caps k at 2048 on the GPU
        index = index if index is not None else faiss_index(bank)
        for start in range(0, len(queries), QUERY_BATCH):
            q = np.ascontiguousarray(queries[start : start + QUERY_BATCH], dtype=np.float32)
            sims, idx = index.search(q, k)
            sims_out[start : start + len(q)], idx_out[start : start + len(q)] = sims, idx
        return sims_out, idx_out
    for sl in row_chunks(len(queries), 2 * len(bank) + queries.shape[1], 4):
        sims = np.asarray(queries[sl], dtype=np.float32) @ bank.T
        cand = np.argpartition(sims, len(bank) - k, axis=1)[:, len(bank) - k :] if k < len(bank) else None
        if cand is None:
            cand = np.broadcast_to(np.arange(len(bank)), sims.shape)
        top = np.take_along_axis(sims, cand, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        sims_out[sl] = np.take_along_axis(top, order, axis=1)
        idx_out[sl] = np.take_along_axis(cand, order, axis=1)
    return sims_out, idx_out


def top_similarities(queries: np.ndarray, bank: np.ndarray, k: int, use_faiss: bool | None = None) -> np.ndarray:
    """(N, k) float32: each query row's k largest inner products with the bank rows, descending (exact search)."""
    return top_neighbours(queries, bank, k, use_faiss)[0]


def normalised32(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float64 norms), as float32."""
    out = np.empty(x.shape, dtype=np.float32)
    for sl in row_chunks(len(x), x.shape[1]):
        r = np.asarray(x[sl], dtype=np.float64)
        out[sl] = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return out
