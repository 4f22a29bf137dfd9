"""Nearest-neighbour search over the ID fit split and the per-split memo of what a slider only slices.

`top_neighbours(queries, bank, k)` returns each query's k largest inner products with the bank
rows (and their row indices), sorted descending: through faiss (an exact flat inner-product
index, batched queries; GPU when faiss-gpu and a GPU are present) when faiss is installed, else
numpy (one float32 product per row chunk and a partition).  Both are exact float32 searches.
`Bank` is a fit set searched that way: normalised (and scaled) once when it fits in one block of
BANK_ROWS rows, else block by block from its (memory-mapped) rows with the running top k merged,
so a fit set of ImageNet-train size is never copied whole.  No detector is registered here.
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
    Made by `FitContext.row_memo(name, **fit_params)`, a memo also reads and writes its tables
    beside the run (the context's StateStore, see oodcore.detectors.persist) for the run's own
    named splits, so a table is computed once per run, not once per process.  A stored table
    is a flat dict of arrays.  A name that starts with "~" marks a memo kept in memory only (what is
    shared between detectors within a process, e.g. Mahalanobis' class distances, but is a score
    rather than fitted state).
    """

    def __init__(self, name: str = "", params: dict | None = None, owner=None):
        self._store: dict[tuple, tuple] = {}
        self._lock = threading.Lock()
        self.name, self.params = name, dict(params or {})
        # the fit context that owns this memo (it holds the memo: a weak reference, so no reference cycle keeps
        # a finished run's arrays and tables alive until the garbage collector happens to run)
        self._owner = weakref.ref(owner) if owner is not None else None

    @property
    def owner(self):
        return self._owner() if self._owner is not None else None

    def _stored(self):
        return getattr(self.owner, "store", None) if self.name and not self.name.startswith("~") else None

    def get(self, name: str, array: np.ndarray, build):
        key = (name, id(array))
        with self._lock:
            hit = self._store.get(key)
            if hit is not None and hit[0]() is array:
                return hit[1]
        store = self._stored()
        split = store.split_name(array) if store is not None else None
        value = store.load_table(f"{self.name}.{name}", split, self.params) if split else None
        if value is None:
            value = build()
            if split:
                store.save_table(f"{self.name}.{name}", split, self.params, value)
        try:
            ref = weakref.ref(array, lambda _r, k=key, s=self._store: s.pop(k, None))
        except TypeError:  # not weak-referenceable (e.g. a memmap subclass edge case): no memo
            return value
        with self._lock:
            self._store[key] = (ref, value)
        return value


QUERY_BATCH = 4096
# Bank rows per block of an exact search over a large fit set: the search never holds more than one
# normalised block (BANK_ROWS x D x 4 bytes: 512 MB at D = 2048, and faiss's copy of it), whatever the fit size (ImageNet train:
# 1.28M rows, 10.5 GB as float32); a bank that fits in one block is normalised and indexed once.
BANK_ROWS = 1 << 16


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


def normalised32(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float64 norms), as float32."""
    out = np.empty(x.shape, dtype=np.float32)
    for sl in row_chunks(len(x), x.shape[1]):
        r = np.asarray(x[sl], dtype=np.float64)
        out[sl] = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return out


class Bank:
    """Fit rows searched by inner product: each row normalised and optionally scaled (`scale`, per row).

    `search(queries, k)` is exact: one cached index when the bank fits in one block (BANK_ROWS rows),
    else block by block (normalised on the fly from the, possibly memory-mapped, features) with the
    running top k merged, so memory follows the block, not the fit size.
    """

    def __init__(self, features: np.ndarray, scale: np.ndarray | None = None, block_rows: int = BANK_ROWS):
        self.features, self.scale, self.block_rows = features, scale, int(block_rows)
        self._whole: dict = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.features)

    def block(self, sl: slice) -> np.ndarray:
        rows = normalised32(self.features[sl])
        if self.scale is not None:
            rows *= np.asarray(self.scale[sl], dtype=np.float32)[:, None]
        return rows

    def _single(self):
        """The whole bank as one block: its faiss index (faiss installed) or its float32 rows."""
        with self._lock:
            if "bank" not in self._whole:
                rows = self.block(slice(0, len(self)))
                use = faiss_module() is not None
                self._whole["bank"] = (faiss_index(rows) if use else None, None if use else rows)
            return self._whole["bank"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """((N, k) float32 similarities, (N, k) int64 bank rows), descending, k clipped to the bank size."""
        k = int(min(max(1, k), len(self)))
        if len(self) <= self.block_rows:
            index, rows = self._single()
            return top_neighbours(queries, rows, k, index=index)
        best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((len(queries), 0), dtype=np.int64)
        for start in range(0, len(self), self.block_rows):
            block = self.block(slice(start, start + self.block_rows))
            sims, idx = top_neighbours(queries, block, min(k, len(block)))
            del block
            sims = np.concatenate([best_s, sims], axis=1)
            idx = np.concatenate([best_i, idx + start], axis=1)
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # earlier rows first among ties
            best_s, best_i = np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)
        return best_s, best_i
