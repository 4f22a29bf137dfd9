"""Post-hoc OOD detectors: the registry with parameter specs, shared numerics, one module per family.

A new detector is one function in a family module plus its `register(...)` entry; importing
this package imports every family, so the registry is complete for the CLI and every page.
"""

# The families' import order is the registry's order: logits, features, distances, then the
# newer activation-shaping, class-geometry and nearest-neighbour-guidance families.
# isort: off
from oodcore.detectors import logits  # noqa: F401
from oodcore.detectors import features  # noqa: F401
from oodcore.detectors import distance  # noqa: F401
from oodcore.detectors import shaping  # noqa: F401
from oodcore.detectors import boundary  # noqa: F401
from oodcore.detectors import neighbours  # noqa: F401
# isort: on

from oodcore.detectors.errors import MethodUnavailable
from oodcore.detectors.logits import STUDY_EPSILONS, STUDY_TEMPERATURES
from oodcore.detectors.numerics import logsumexp, max_softmax, softmax
from oodcore.detectors.registry import (
    REGISTRY,
    Method,
    Param,
    available_methods,
    get,
    get_for,
    grid_values,
    missing_needs,
    register,
    trained_method,
)

__all__ = [
    "REGISTRY",
    "Method",
    "MethodUnavailable",
    "Param",
    "available_methods",
    "get",
    "get_for",
    "grid_values",
    "missing_needs",
    "register",
    "trained_method",
    "logsumexp",
    "max_softmax",
    "softmax",
    "STUDY_EPSILONS",
    "STUDY_TEMPERATURES",
]
