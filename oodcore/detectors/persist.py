"""Fitted detector state saved beside the run, so it is fitted once per run, not once per process.

`attach(data, folder)` gives a run's fit context a StateStore over `<folder>/fitted/`; from then on
`fitting.fitted_state` reads a method's state from `<method>-<key>.npz` when present and writes it
(atomically, pickle-free) after fitting.  The key covers the run's key and artifact files, this
package's version, FIT_VERSION (bumped whenever a fit changes) and the fit parameters, so a changed
run, fit or parameter is refitted, never served stale.

Only *plain* states are stored: dicts (nested allowed) of numpy arrays and numbers, a bare array
or a number.  States holding references to the run's own arrays or per-split memos (KNN, NNGuide,
ASH/SCALE) are cheap to rebuild and are not stored.  A state that cannot be written (read-only
folder, full disk) is simply not stored; a stored file that cannot be read is refitted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from oodcore.detectors.fitting import context_of
from oodcore.store.atomic import write_npz
from oodcore.store.cache import key_of
from oodcore.store.integrity import CacheError, load_arrays
from oodcore.store.rundata import BenchmarkData

FIT_VERSION = 1
FITTED_DIR = "fitted"
_SEP = "/"


def _flatten(state: Any, prefix: str, out: dict) -> bool:
    """state -> {"path/to/leaf": array}; False when some leaf is not an array or a number."""
    if isinstance(state, dict):
        if not state or not all(isinstance(k, str) and _SEP not in k for k in state):
            return False
        return all(_flatten(v, f"{prefix}{k}{_SEP}", out) for k, v in state.items())
    if isinstance(state, np.ndarray) and state.dtype != object:
        out[prefix.rstrip(_SEP) or "_"] = state
        return True
    if isinstance(state, (bool, int, float, np.integer, np.floating)) and not isinstance(state, np.bool_):
        out[(prefix.rstrip(_SEP) or "_") + "#scalar"] = np.asarray(state)
        return True
    return False


def _unflatten(arrays: dict[str, np.ndarray]) -> Any:
    if set(arrays) == {"_"}:
        return arrays["_"]
    if set(arrays) == {"_#scalar"}:
        return arrays["_#scalar"].item()
    out: dict = {}
    for name, value in arrays.items():
        scalar = name.endswith("#scalar")
        parts = name.removesuffix("#scalar").split(_SEP)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value.item() if scalar else value
    return out


def _shares_run_arrays(arrays: dict[str, np.ndarray], data_arrays: list[np.ndarray]) -> bool:
    return any(np.shares_memory(a, b) for a in arrays.values() for b in data_arrays if isinstance(b, np.ndarray))


class StateStore:
    """Fitted states of one run under `folder` (its `fitted/` directory)."""

    def __init__(self, folder: Path, run: dict, run_arrays: list[np.ndarray], writable: bool = True):
        from oodcore import __version__

        self.folder = Path(folder)
        self.base = {"run": run.get("key"), "files": run.get("files"), "version": __version__, "fit": FIT_VERSION}
        self.run_arrays = run_arrays
        self.writable = writable
        self.saved: list[str] = []
        self.loaded: list[str] = []

    def path(self, method: str, fit_params: dict) -> Path:
        key = key_of({**self.base, "method": method, "params": sorted(fit_params.items())})
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}-{key}.npz"

    def load(self, method: str, fit_params: dict) -> Any | None:
        path = self.path(method, fit_params)
        if not path.is_file():
            return None
        try:
            arrays = load_arrays(path)  # the store's one load function: any bad file is one CacheError
        except (CacheError, OSError):  # damaged: refit (and overwrite)
            return None
        self.loaded.append(method)
        return _unflatten(arrays)

    def save(self, method: str, fit_params: dict, state: Any) -> bool:
        arrays: dict[str, np.ndarray] = {}
        if not self.writable or not _flatten(state, "", arrays) or _shares_run_arrays(arrays, self.run_arrays):
            return False
        try:
            write_npz(self.path(method, fit_params), arrays)
        except OSError:  # read-only or full: keep the state in memory only
            return False
        self.saved.append(method)
        return True


def attach(data: BenchmarkData, folder: Path, writable: bool = True) -> StateStore:
    """Store `data`'s fitted states in `<folder>/fitted/` (the run's folder), reading them back when present."""
    run_arrays = []
    for split in (data.id, data.ood, data.fit):
        if split is not None:
            run_arrays += [split.logits, split.features]
    run_arrays += [data.head_weight, data.head_bias]
    store = StateStore(Path(folder) / FITTED_DIR, data.meta or {}, [a for a in run_arrays if a is not None], writable)
    context_of(data).store = store
    return store
