"""Fitted detector state saved beside the run, so it is fitted once per run, not once per process.

`attach(data, folder)` gives a run's fit context a StateStore over `<folder>/fitted/`; from then on
`fitting.fitted_state` reads a method's state from `<method>-<key>.npz` when present and writes it
(atomically, pickle-free) after fitting.  The key covers the run's key and artifact files, this
package's version, FIT_VERSION (bumped whenever a fit changes) and the fit parameters, so a changed
run, fit or parameter is refitted, never served stale.

Only *plain* states are stored: dicts (nested allowed) of numpy arrays and numbers, a bare array
or a number.  States holding references to the run's own arrays or per-split memos (KNN, NNGuide,
ASH/SCALE, ViM) are cheap to rebuild and are not stored; their per-split tables (what a slider only
slices: KNN's k-th distances for every k the slider offers, ViM's residual norm for every D', ...)
are, as `<memo>.<table>-<split>-<key>.arrays` folders read through memory maps, for the run's own
ID / OOD / tuning splits (not for a view on some of its rows, nor for a new image).  A state or
table that cannot be written (read-only folder, full disk) is simply not stored; a stored file that
cannot be read is recomputed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from oodcore.detectors.fitting import context_of
from oodcore.detectors.search import RowMemo
from oodcore.store.atomic import write_npz
from oodcore.store.cache import key_of
from oodcore.store.integrity import CacheError, load_arrays
from oodcore.store.rundata import BenchmarkData

FIT_VERSION = 3  # 2: per-split tables stored; ViM's state is the full eigenbasis; 3: triangular whitening factors
FITTED_DIR = "fitted"
_SEP = "/"


_MEMO = "#memo"


def _flatten(state: Any, prefix: str, out: dict) -> bool:
    """state -> {"path/to/leaf": array}; False when some leaf is not an array or a number.

    A per-split memo (RowMemo) is stored as its name only: its tables are stored on their own, and a
    loaded state gets a fresh memo of that name (see `_unflatten`)."""
    if isinstance(state, RowMemo):
        if not state.name:
            return False
        out[(prefix.rstrip(_SEP) or "_") + _MEMO] = np.asarray(state.name)
        return True
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


def _unflatten(arrays: dict[str, np.ndarray], memo=None) -> Any:
    """The inverse of `_flatten`; `memo(name)` makes the fresh per-split memo a stored memo name stands for."""
    if set(arrays) == {"_"}:
        return arrays["_"]
    if set(arrays) == {"_#scalar"}:
        return arrays["_#scalar"].item()
    out: dict = {}
    for name, value in arrays.items():
        scalar, is_memo = name.endswith("#scalar"), name.endswith(_MEMO)
        parts = name.removesuffix("#scalar").removesuffix(_MEMO).split(_SEP)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if is_memo:
            if memo is None:
                raise ValueError("a stored state with a per-split memo needs the fit context to load")
            node[parts[-1]] = memo(str(value))
        else:
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
        self._splits: list[tuple[Any, str]] = []  # (weak reference to a split's array, split name)

    def name_splits(self, splits: dict[str, Any]) -> None:
        """Remember which arrays are the run's named splits (their features and logits), for split_name."""
        import weakref

        for name, rows in splits.items():
            for arr in (getattr(rows, "features", None), getattr(rows, "logits", None)):
                if isinstance(arr, np.ndarray):
                    self._splits.append((weakref.ref(arr), name))

    def split_name(self, array: Any) -> str | None:
        """ "id", "ood", ... when `array` is one of the run's named splits' arrays (the very object), else None."""
        return next((name for ref, name in self._splits if ref() is array), None)

    def table_path(self, table: str, split: str, params: dict) -> Path:
        key = key_of({**self.base, "table": table, "split": split, "params": sorted(params.items())})
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', table)}-{split}-{key}.arrays"

    def load_table(self, table: str, split: str, params: dict) -> dict | None:
        path = self.table_path(table, split, params)
        if not path.is_dir():
            return None
        try:  # sizes and xxh3 checksums against those recorded when it was written (once per process)
            from oodcore.store.integrity import check_file

            check_file(path, None)
            arrays = load_arrays(path)
        except (CacheError, OSError):  # damaged: recompute (and overwrite)
            return None
        self.loaded.append(f"{table}/{split}")
        return arrays

    def save_table(self, table: str, split: str, params: dict, value: Any) -> bool:
        if not self.writable or not isinstance(value, dict) or not value:
            return False
        if not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9_]+", k) for k in value):
            return False
        if not all(isinstance(v, np.ndarray) and v.dtype != object for v in value.values()):
            return False
        from oodcore.store.arrays import write_arrays

        try:
            write_arrays(self.table_path(table, split, params), value)
        except OSError:
            return False
        self.saved.append(f"{table}/{split}")
        return True

    def path(self, method: str, fit_params: dict) -> Path:
        key = key_of({**self.base, "method": method, "params": sorted(fit_params.items())})
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}-{key}.npz"

    def load(self, method: str, fit_params: dict, ctx=None) -> Any | None:
        """The stored state, or None (absent or damaged: refit); `ctx` makes the fresh memos of memo-holding states."""
        path = self.path(method, fit_params)
        if not path.is_file():
            return None
        try:
            arrays = load_arrays(path)  # the store's one load function: any bad file is one CacheError
            state = _unflatten(arrays, None if ctx is None else (lambda name: ctx.row_memo(name, **fit_params)))
        except (CacheError, OSError, ValueError):  # damaged: refit (and overwrite)
            return None
        self.loaded.append(method)
        return state

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
    store.name_splits({"id": data.id, "ood": data.ood, **({"tune": data.tune} if data.tune is not None else {})})
    context_of(data).store = store
    return store
