"""Fitted detector state: the fit context of a run and the per-run memo of fitted states.

`fit(ctx, **fit_params)` sees only the run's ID fit split and head through a FitContext;
what several detectors share (moments of the fit features, a PCA basis) is computed once per
context through `ctx.shared`. A run's fitted states live on its BenchmarkData (`data.states`),
keyed by method and fit parameters: a slider over a scoring parameter never refits, and a
new image is scored with the same state.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from oodcore.detectors.errors import MethodUnavailable
from oodcore.store.rundata import BenchmarkData, SplitArrays

CONTEXT_KEY = "__fit_context__"


@dataclass
class FitContext:
    """What a detector may learn from: the ID fit split, the final layer, the class count (never ID-eval or OOD rows)."""

    fit: SplitArrays | None
    head_weight: np.ndarray | None
    head_bias: np.ndarray | None
    n_classes: int
    calls: Counter = field(default_factory=Counter)  # how often each state or shared piece was built (tests)
    store: Any = None  # a persist.StateStore: fitted states saved beside the run (see oodcore.detectors.persist)
    _shared: dict = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def shared(self, key: Any, build: Callable[[], Any]) -> Any:
        """A piece several detectors use (moments, a basis), built once per context."""
        with self._lock:
            if key not in self._shared:
                self._shared[key] = build()
                self.calls[key if isinstance(key, str) else key[1] if key[0] == "state" else key[0]] += 1
            return self._shared[key]

    def row_memo(self, name: str, **fit_params) -> Any:
        """A per-split memo for a fitted state (see oodcore.detectors.search.RowMemo), stored beside the run
        under `name` and the fit parameters when the run has a StateStore; one per (name, parameters) and
        context, so states that share it (fresh or loaded from the store) share its tables."""
        from oodcore.detectors.search import RowMemo

        key = ("memo", name, tuple(sorted(fit_params.items())))
        with self._lock:
            if key not in self._shared:
                self._shared[key] = RowMemo(name, fit_params, owner=self)
            return self._shared[key]

    def require_fit(self, *, features: bool = False, labels: bool = False) -> SplitArrays:
        """The fit split, or a clear MethodUnavailable when it (or what is asked of it) is missing."""
        fit = self.fit
        if fit is None or len(fit) == 0:
            raise MethodUnavailable("this method is fitted on the ID fit split, which this cache lacks")
        if features and fit.features is None:
            raise MethodUnavailable("this method needs the fit split's features, which were not loaded")
        if labels and not np.any(np.asarray(fit.labels) >= 0):
            raise MethodUnavailable("this method needs labelled ID rows in the fit split")
        return fit

    def head(self) -> tuple[np.ndarray, np.ndarray]:
        if self.head_weight is None:
            raise MethodUnavailable("this method needs the final layer (head), which this cache lacks")
        w = np.asarray(self.head_weight)
        b = np.zeros(w.shape[0], w.dtype) if self.head_bias is None else np.asarray(self.head_bias)
        return w, b


def context_of(data: BenchmarkData) -> FitContext:
    """The run's fit context (one per BenchmarkData object)."""
    ctx = data.states.get(CONTEXT_KEY)
    if ctx is None:
        ctx = data.states.setdefault(
            CONTEXT_KEY, FitContext(data.fit, data.head_weight, data.head_bias, data.n_classes)
        )
    return ctx


def fitted_state(method, data: BenchmarkData, fit_params: dict[str, float]) -> Any:
    """`method.fit_fn(ctx, **fit_params)`, computed once per run and fit parameters (None when it fits nothing)."""
    if method.fit_fn is None:
        return None
    ctx = context_of(data)
    key = ("state", method.name, tuple(sorted(fit_params.items())))

    def build():
        store = ctx.store
        if store is not None:
            stored = store.load(method.name, fit_params, ctx)
            if stored is not None:
                return stored
        state = method.fit_fn(ctx, **fit_params)
        if store is not None:
            store.save(method.name, fit_params, state)
        return state

    return ctx.shared(key, build)
