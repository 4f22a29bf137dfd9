"""Post-hoc OOD detectors as pure functions of the cache, plus their registry.

A method is one function `fn(data, split, **params) -> scores` (higher = more OOD)
and one `register(...)` entry with its parameter spec; the CLI and every app page
read the registry, so a new method needs no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .data import BenchmarkData, SplitArrays


class MethodUnavailable(RuntimeError):
    """The cache lacks what this method (or this parameter setting) needs."""


@dataclass(frozen=True)
class Param:
    """A tunable parameter: what a slider or a CLI flag needs to know."""

    name: str
    label: str
    default: float
    low: float
    high: float
    scale: str = "linear"  # "linear" or "log"
    choices: tuple[float, ...] | None = None  # values precomputed on a grid (sliders snap to them)
    help: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    fn: Callable[..., np.ndarray]
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

    def available(self, data: BenchmarkData) -> bool:
        return not missing_needs(self, data)

    def score(self, data: BenchmarkData, split: SplitArrays, **params) -> np.ndarray:
        missing = missing_needs(self, data)
        if missing:
            raise MethodUnavailable(f"{self.name} needs {', '.join(sorted(missing))}, which this cache lacks")
        scores = np.asarray(self.fn(data, split, **self.resolve(params)), dtype=np.float64)
        if scores.shape != (len(split),):
            raise AssertionError(f"{self.name} returned shape {scores.shape}, expected ({len(split)},)")
        return scores

    def score_id_ood(self, data: BenchmarkData, **params) -> tuple[np.ndarray, np.ndarray]:
        return self.score(data, data.id, **params), self.score(data, data.ood, **params)


REGISTRY: dict[str, Method] = {}


def register(name: str, label: str, *, params=(), needs=("logits",), paper="", summary="", tune_grid=False):
    """Decorator: add `fn(data, split, **params)` to the registry under `name`."""

    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        REGISTRY[name] = Method(name, label, fn, tuple(params), frozenset(needs), paper, summary or (fn.__doc__ or "").strip(), tune_grid)
        return fn

    return wrap


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


def trained_method(data: BenchmarkData, name: str) -> Method:
    """A trained detector (oodcore.data.TrainedScores) as a parameter-free method."""
    meta = data.trained[name].meta

    def fn(data, split):
        scores = data.trained[name]
        if split is data.id:
            return scores.id
        if split is data.ood:
            return scores.ood
        raise MethodUnavailable(f"{name} scores only the cached images; new images need its checkpoint")

    return Method(name, meta.get("label", name), fn, needs=frozenset({"logits"}), paper=meta.get("paper", ""),
                  summary=meta.get("summary", ""), trained_on_ood=True)


def get_for(data: BenchmarkData, name: str) -> Method:
    """Look a method up among the registry and the run's trained detectors."""
    if name in data.trained:
        return trained_method(data, name)
    return get(name)


# ---------------------------------------------------------------- numerics


def logsumexp(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Stable log-sum-exp in float64 (float32 overflows at ImageNet logit scales / small T)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def max_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """max_k softmax(logits / T)_k, computed as exp(max - logsumexp) for stability."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(z.max(axis=1) - logsumexp(z))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- methods

STUDY_TEMPERATURES = (1.0, 10.0, 100.0, 1000.0)
STUDY_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005)


@register("msp", "MSP", paper="Hendrycks & Gimpel 2017, A Baseline for Detecting Misclassified and OOD Examples")
def msp(data, split):
    """Negative maximum softmax probability."""
    return -max_softmax(split.logits)


@register("maxlogit", "MaxLogit", paper="Hendrycks et al. 2022, Scaling OOD Detection to Real-World Settings")
def maxlogit(data, split):
    """Negative maximum logit (no softmax normalisation)."""
    return -np.asarray(split.logits, dtype=np.float64).max(axis=1)


@register(
    "energy",
    "Energy",
    params=(Param("T", "temperature T", 1.0, 0.1, 1000.0, "log", help="E(x) = -T logsumexp(f(x)/T)"),),
    paper="Liu et al. 2020, Energy-based Out-of-distribution Detection",
)
def energy(data, split, T):
    """The free energy E(x) = -T logsumexp(f(x)/T); high energy = OOD."""
    return -T * logsumexp(np.asarray(split.logits, dtype=np.float64) / T)


@register(
    "odin",
    "ODIN",
    params=(
        Param("T", "temperature T", 1000.0, 1.0, 1000.0, "log", STUDY_TEMPERATURES, "softmax temperature"),
        Param("eps", "noise ε (pixels)", 0.0, 0.0, 0.005, "linear", STUDY_EPSILONS,
              "input perturbation in [0,1] pixel units; ε > 0 needs the precomputed grid"),
    ),
    paper="Liang et al. 2018, Enhancing the Reliability of OOD Image Detection in Neural Networks",
    tune_grid=True,
)
def odin(data, split, T, eps):
    """-max softmax(f(x~)/T) with x~ the input nudged towards its predicted class."""
    if eps == 0.0:
        return -max_softmax(split.logits, T)
    grid = data.odin
    if grid is None:
        raise MethodUnavailable("ODIN with ε > 0 needs the precomputed grid: rerun with --odin-grid")
    where = grid.index(T, eps)
    if where is None:
        raise MethodUnavailable(
            f"ODIN (T={T:g}, ε={eps:g}) is not on the cached grid T∈{list(grid.temps)}, ε∈{list(grid.eps)}"
        )
    if split is data.id:
        return grid.id[:, where[0], where[1]]
    if split is data.ood:
        return grid.ood[:, where[0], where[1]]
    raise MethodUnavailable("ODIN with ε > 0 on new images needs the network (see oodcore.odin)")


from . import methods_logits, methods_features, methods_distance  # noqa: E402,F401
