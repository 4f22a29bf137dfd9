"""The detector registry: a method's entry, its parameter spec and what it needs.

A detector follows a fit/score contract (in the spirit of scikit-learn and pytorch-ood):

* ``fit(ctx, **fit_params) -> state``: everything learned from the run's ID fit split and
  head (``ctx`` is a :class:`oodcore.detectors.fitting.FitContext`); a small object of
  arrays and numbers, memoised by the caller per run and fit parameters;
* ``score(state, rows, **score_params) -> scores``: one float64 per row of ``rows`` (a
  SplitArrays: cached ID/OOD rows, or one new image), higher = more OOD.

A parameter marked ``fit=True`` changes the fitted state (e.g. ReAct's percentile); the
others only change scoring, so a slider over them never refits. What a method needs
(logits, features, head, fit split, the precomputed ODIN grid) and whether it is tuned or
trained with OOD data is declared on its entry; no code tests a method's name. A new
detector is one function pair plus one ``register(...)`` call, and the CLI and every
page pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from oodcore.detectors.errors import MethodUnavailable
from oodcore.detectors.fitting import fitted_state
from oodcore.store.rundata import BenchmarkData, SplitArrays

__all__ = ["NEEDS", "MethodUnavailable", "Param", "Method", "REGISTRY", "register", "get", "get_for"]

NEEDS = ("logits", "features", "head", "fit", "odin_grid")

# A split's per-row scores of a method at its default setting, stored by a pass that had what the
# method needs (a shared bundle: `oodcore share`); `precomputed[DEFAULT_SCORES + name]`.
DEFAULT_SCORES = "default/"


@dataclass(frozen=True)
class Param:
    """A tunable parameter: what a slider or a CLI flag needs to know."""

    name: str
    label: str
    default: float
    low: float
    high: float
    scale: str = "linear"  # "linear" or "log"
    choices: tuple[float, ...] | None = None  # values to tune over (sliders snap to them)
    help: str = ""
    fit: bool = False  # changes the fitted state (fitted once per value), not only the scoring
    grid: str | None = None  # "temps" / "eps": values beyond `without_grid` come from the precomputed ODIN grid
    without_grid: tuple[float, ...] | None = None  # the values that work without that grid (None: any)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    score_fn: Callable[..., np.ndarray]
    fit_fn: Callable[..., Any] | None = None
    params: tuple[Param, ...] = ()
    needs: frozenset[str] = frozenset({"logits"})
    paper: str = ""
    summary: str = ""
    tune_grid: bool = False  # has a grid of settings chosen on the OOD exposure split
    trained_on_ood: bool = False  # saw the OOD exposure split: evaluate on held-out OOD rows only

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}

    def resolve(self, params: dict | None) -> dict[str, float]:
        """Defaults overridden by `params`; unknown names are an error, not silently dropped."""
        out = self.defaults()
        for key, value in (params or {}).items():
            if key not in out:
                raise ValueError(f"{self.name} has no parameter {key!r}; it takes {sorted(out) or 'none'}")
            out[key] = float(value)
        return out

    def fit_params(self, resolved: dict[str, float]) -> dict[str, float]:
        return {p.name: resolved[p.name] for p in self.params if p.fit}

    def score_params(self, resolved: dict[str, float]) -> dict[str, float]:
        return {p.name: resolved[p.name] for p in self.params if not p.fit}

    def available(self, data: BenchmarkData) -> bool:
        return not missing_needs(self, data) or self.has_stored_defaults(data)

    def has_stored_defaults(self, data: BenchmarkData) -> bool:
        """Both splits carry this method's precomputed default-setting scores (see DEFAULT_SCORES)."""
        key = DEFAULT_SCORES + self.name
        return key in data.id.precomputed and key in data.ood.precomputed

    def stored_scores(self, rows: SplitArrays, params: dict | None) -> np.ndarray | None:
        """The rows' precomputed scores when `params` resolve to the defaults they were computed at."""
        values = rows.precomputed.get(DEFAULT_SCORES + self.name)
        if values is None or self.resolve(params) != self.defaults():
            return None
        return np.asarray(values, dtype=np.float64)

    def state(self, data: BenchmarkData, **params) -> Any:
        """The fitted state for these parameters, fitted once per run (see oodcore.detectors.fitting)."""
        missing = missing_needs(self, data)
        if missing:
            only = (
                "; only its default setting's precomputed scores are stored" if self.has_stored_defaults(data) else ""
            )
            raise MethodUnavailable(f"{self.name} needs {', '.join(sorted(missing))}, which this cache lacks{only}")
        return fitted_state(self, data, self.fit_params(self.resolve(params)))

    def score_rows(self, state: Any, rows: SplitArrays, **params) -> np.ndarray:
        """Score any rows (cached or new) with an already fitted state."""
        resolved = self.resolve(params)
        scores = np.asarray(self.score_fn(state, rows, **self.score_params(resolved)), dtype=np.float64)
        if scores.shape != (len(rows),):
            raise AssertionError(f"{self.name} returned shape {scores.shape}, expected ({len(rows)},)")
        return scores

    def score(self, data: BenchmarkData, rows: SplitArrays, **params) -> np.ndarray:
        """Fit (memoised) on `data`, then score `rows`: data.id, data.ood, or a new image's row.

        Rows that carry this method's stored default-setting scores return them at that setting.
        """
        stored = self.stored_scores(rows, params)
        if stored is not None:
            return stored
        return self.score_rows(self.state(data, **params), rows, **params)

    def score_id_ood(self, data: BenchmarkData, **params) -> tuple[np.ndarray, np.ndarray]:
        s_id, s_ood = self.stored_scores(data.id, params), self.stored_scores(data.ood, params)
        if s_id is not None and s_ood is not None:
            return s_id, s_ood
        state = self.state(data, **params)
        return self.score_rows(state, data.id, **params), self.score_rows(state, data.ood, **params)


REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    label: str,
    *,
    fit: Callable[..., Any] | None = None,
    params=(),
    needs=("logits",),
    paper="",
    summary="",
    tune_grid=False,
):
    """Decorator: add the scoring function `score(state, rows, **params)` (with its `fit`) to the registry."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"method {name!r} declares unknown needs {sorted(unknown)}; known: {NEEDS}")
    if any(p.fit for p in params) and fit is None:
        raise ValueError(f"method {name!r} has fit parameters but no fit function")

    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        doc = summary or (fn.__doc__ or "").strip()
        REGISTRY[name] = Method(name, label, fn, fit, tuple(params), frozenset(needs), paper, doc, tune_grid)
        return fn

    return wrap


def registry_key() -> str:
    """The registered methods and their parameter specs: a new or changed method invalidates stored reports.

    Stable across processes (needs sorted: a frozenset's order follows the per-process string hash).
    """
    return repr([(m.name, m.params, sorted(m.needs), m.tune_grid) for m in REGISTRY.values()])


def grid_values(param: Param, data: BenchmarkData | None) -> list[float] | None:
    """For a parameter read from the precomputed ODIN grid: the values this run offers (None otherwise).

    With the grid: its axis (plus the values that need no grid); without it: only the values that
    need no grid (ε = 0), or the parameter's own choices (any T works at ε = 0).
    """
    if param.grid is None:
        return None
    grid = data.odin if data is not None else None
    free = param.without_grid or ()
    if grid is not None:
        return sorted({float(v) for v in getattr(grid, param.grid)} | {float(v) for v in free})
    return sorted(float(v) for v in (free or param.choices or (param.default,)))


def get(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None


def missing_needs(method: Method, data: BenchmarkData) -> set[str]:
    have = {"logits"}
    if data.id.features is not None and data.ood.features is not None:
        have.add("features")
    if data.head_weight is not None:
        have.add("head")
    if data.fit is not None and len(data.fit) > 0:  # a --limit run can leave the fit split empty
        have.add("fit")
    if data.odin is not None:
        have.add("odin_grid")
    return set(method.needs) - have


def available_methods(data: BenchmarkData) -> list[Method]:
    """Registered methods the cache can serve, then the run's trained detectors."""
    return [m for m in REGISTRY.values() if m.available(data)] + [trained_method(data, n) for n in data.trained]


def _trained_scores(state: str, rows: SplitArrays) -> np.ndarray:
    scores = rows.precomputed.get(f"trained/{state}")
    if scores is None:
        raise MethodUnavailable(f"{state} scores only the cached images; new images need its checkpoint")
    return scores


def trained_method(data: BenchmarkData, name: str) -> Method:
    """A trained detector (oodcore.store.rundata.TrainedScores) as a parameter-free method.

    Its 'state' is its name: the scores are per-row values of the cached splits.
    """
    meta = data.trained[name].meta
    return Method(
        name,
        meta.get("label", name),
        _trained_scores,
        fit_fn=lambda ctx, _name=name: _name,
        paper=meta.get("paper", ""),
        summary=meta.get("summary", ""),
        trained_on_ood=True,
    )


def get_for(data: BenchmarkData, name: str) -> Method:
    """Look a method up among the registry and the run's trained detectors."""
    if name in data.trained:
        return trained_method(data, name)
    return get(name)
