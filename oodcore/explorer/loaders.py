"""Memoised reads of the cache for the pages (Streamlit's cache_resource / cache_data) and the sidebar's selection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import streamlit as st

from oodcore import detectors as M
from oodcore.evaluation.analysis import (
    honest_vs_naive,
    metrics_for,
    odin_auroc_grid,
    softmax_confidence,
)
from oodcore.explorer import settings
from oodcore.explorer.settings import readonly
from oodcore.share import bundle as shared_bundle
from oodcore.store import cache as C
from oodcore.store import scopes
from oodcore.store.rundata import BenchmarkData


def store_of(root: Path):
    """What reads `root`: a shared bundle's reader (`oodcore share`) or the cache; both give BenchmarkData."""
    return shared_bundle if shared_bundle.is_bundle(Path(root)) else C


def run_token(run: dict, root: Path | None = None) -> str:
    """What identifies a run's content: its key, artifact file names (themselves keyed) and trained detectors."""
    trained = []
    if root is not None:
        try:
            folder = C.arch_dir(Path(root), run["benchmark"], run["arch"]) / C.TRAINED_DIR
            trained = sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json"))
        except (OSError, ValueError):
            pass
    return json.dumps({"key": run.get("key"), "files": run.get("files", {}), "trained": trained}, sort_keys=True)


@dataclass
class Selection:
    """The benchmark/architecture picked in the sidebar."""

    root: Path
    run: dict
    runs: list[dict] = field(default_factory=list)  # every run of this benchmark (all architectures)
    scope: str = scopes.ALL  # the OOD set or group picked in the sidebar (oodcore.store.scopes)

    @property
    def benchmark(self) -> str:
        return self.run["benchmark"]

    @property
    def arch(self) -> str:
        return self.run["arch"]

    def data(self, run: dict | None = None) -> BenchmarkData:
        """The run's arrays; a run whose files vanished or broke becomes a message, not a traceback."""
        return load_data(self.root, run or self.run, self.scope)


def cache_error_text(exc: BaseException, run: dict | None = None) -> str:
    """What a page says about a damaged or missing run: which run, what broke, the repair command.

    Read-only deployments never show server paths (CacheError.public()).
    """
    name = f"{run.get('benchmark', '?')} · {run.get('arch', '?')}" if run else "this run"
    if isinstance(exc, C.CacheError):
        detail = exc.public() if readonly() else str(exc)
    else:  # an OSError or a malformed entry: say what kind, never the path in read-only mode
        detail = type(exc).__name__ if readonly() else f"{type(exc).__name__}: {exc}"
        detail += "; repair: python -m oodcore verify --repair"
    return f"The cached run {name} cannot be read: {detail}"


def stop_on_cache_error(exc: BaseException, run: dict | None = None):
    st.error(cache_error_text(exc, run), icon=":material/broken_image:")
    st.stop()


def _freeze(data: BenchmarkData) -> BenchmarkData:
    """Shared (cache_resource) arrays must never be modified in place by a page."""
    for split in (data.id, data.ood, data.fit):
        if split is None:
            continue
        for arr in (split.logits, split.features, split.labels, split.paths):
            if isinstance(arr, np.ndarray):
                arr.setflags(write=False)
    for arr in (data.head_weight, data.head_bias):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    if data.odin is not None:
        for arr in (data.odin.id, data.odin.ood, data.odin.temps, data.odin.eps):
            arr.setflags(write=False)
    for scores in getattr(data, "trained", {}).values():
        for arr in (scores.id, scores.ood):
            if isinstance(arr, np.ndarray):
                arr.setflags(write=False)
    return data


def _cached(kind: str, **kwargs):
    """A memoised read; a damaged or vanished run stops the page (or fragment) with a message, not a traceback."""
    try:
        return _loaders()[kind](**kwargs)
    except (C.CacheError, OSError, KeyError) as exc:
        stop_on_cache_error(exc, {"benchmark": kwargs.get("benchmark"), "arch": kwargs.get("arch")})


def _loaders() -> dict[str, Callable]:
    """Build the memoised loaders once (so this module imports without Streamlit)."""
    global _LOADERS
    if _LOADERS is None:
        # BenchmarkData is held once per process (cache_resource, read-only arrays): pickling
        # copies of features on every rerun (cache_data) would cost more than the slider's work.
        @st.cache_resource(max_entries=16, show_spinner="Loading the cached run…")
        def load(root: str, benchmark: str, arch: str, token: str) -> BenchmarkData:
            from oodcore.detectors.persist import attach
            from oodcore.explorer.settings import readonly

            store = store_of(root)
            data = _freeze(store.load_benchmark(Path(root), benchmark, arch))
            # fitted states come from / go to the run's fitted/ folder (read only in a read-only deployment
            # and in a shared bundle, whose float16 features must not overwrite the cache's states)
            attach(data, C.arch_dir(Path(root), benchmark, arch), writable=store is C and not readonly())
            return data

        @st.cache_resource(max_entries=32, show_spinner=False)
        def view(root: str, benchmark: str, arch: str, token: str, scope: str) -> BenchmarkData:
            data = load(root, benchmark, arch, token)
            return data if scope == scopes.ALL else _freeze(scopes.select(data, scope))

        @st.cache_resource(max_entries=16, show_spinner=False)
        def thumbs(root: str, benchmark: str, arch: str, split: str, token: str):
            return store_of(root).load_thumbnails(Path(root), benchmark, arch, split)

        @st.cache_data(max_entries=512, show_spinner=False)
        def metrics(root: str, benchmark: str, arch: str, token: str, scope: str, method: str, params: tuple) -> dict:
            return metrics_for(view(root, benchmark, arch, token, scope), method, dict(params))

        @st.cache_data(max_entries=64, show_spinner=False)
        def report(root: str, benchmark: str, arch: str, token: str, scope: str, n_boot: int, registry: str) -> dict:
            from oodcore.evaluation.report import evaluate_run
            from oodcore.evaluation.sets import evaluate_scope
            from oodcore.evaluation.stored import stored_report

            single = store_of(root) is not C or len(C.ood_set_entries(C.read_run(Path(root), benchmark, arch))) <= 1
            if scope == scopes.ALL and single:
                if store_of(root) is not C:  # a shared bundle: the report made when it was shared, never written here
                    data = load(root, benchmark, arch, token)
                    stored = data.meta.get("bundle", {}).get("report")
                    if stored and stored.get("n_boot") == n_boot and stored.get("registry") == registry:
                        return json.loads(json.dumps(stored["report"]))
                    from oodcore.evaluation.stored import full_report

                    return full_report(data, n_boot)
                # the report stored beside the run when it is current (no array is read, but the run's
                # files are verified first, so a damaged run is named here as on every other page);
                # otherwise computed from the run's data and stored for the next reader (unless read-only)
                # size always, checksum once per process (fitted states and tables are recomputed on use)
                problems = C.verify_run(Path(root), benchmark, arch, full=False)
                if problems:
                    raise problems[0]
                return stored_report(
                    Path(root),
                    benchmark,
                    arch,
                    n_boot,
                    load=lambda: load(root, benchmark, arch, token),
                    write=not settings.readonly(),
                )[0]
            data = load(root, benchmark, arch, token)
            scopes.sets_of(data, scope)  # a scope this architecture lacks: a clear error
            # one method at a time, so a method the cache cannot serve (e.g. an empty fit split)
            # is listed as unavailable instead of sinking the whole architecture
            report, rows, unavailable, sets_rows = None, [], [], []
            for method in M.available_methods(data):
                try:
                    part = evaluate_scope(data, scope, [method.name], n_boot=n_boot)
                except M.MethodUnavailable as exc:
                    unavailable.append({"method": method.name, "label": method.label, "why": str(exc)})
                    continue
                for row in part["results"]:
                    row["label"], row["trained_on_ood"] = method.label, bool(getattr(method, "trained_on_ood", False))
                rows += part["results"]
                for s_part, s_rows in zip(sets_rows, part.get("sets", [])):
                    s_part["results"] += s_rows["results"]
                if not sets_rows and part.get("sets"):
                    sets_rows = [{**p, "results": list(p["results"])} for p in part["sets"]]
                report = report or part
            report = report or evaluate_run(scopes.select(data, scope), [], n_boot=n_boot)
            if sets_rows:
                report["sets"] = sets_rows
            report["results"], report["unavailable"] = rows, unavailable
            return report

        @st.cache_data(max_entries=32, show_spinner=False)
        def honest(root: str, benchmark: str, arch: str, token: str, scope: str) -> dict:
            return honest_vs_naive(view(root, benchmark, arch, token, scope))

        @st.cache_data(max_entries=32, show_spinner=False)
        def odin_grid(root: str, benchmark: str, arch: str, token: str, scope: str):
            return odin_auroc_grid(view(root, benchmark, arch, token, scope))

        @st.cache_data(max_entries=32, show_spinner=False)
        def confidences(root: str, benchmark: str, arch: str, token: str, scope: str) -> dict:
            data = view(root, benchmark, arch, token, scope)
            return {"id": softmax_confidence(data.id.logits), "ood": softmax_confidence(data.ood.logits)}

        _LOADERS = {
            "load": load,
            "view": view,
            "thumbs": thumbs,
            "metrics": metrics,
            "report": report,
            "honest": honest,
            "odin_grid": odin_grid,
            "confidences": confidences,
        }
    return _LOADERS


_LOADERS: dict[str, Callable] | None = None


def _args(root: Path, run: dict, scope: str | None = None) -> dict:
    args = {"root": str(root), "benchmark": run["benchmark"], "arch": run["arch"], "token": run_token(run, root)}
    return args if scope is None else {**args, "scope": scope}


def load_data(root: Path, run: dict, scope: str = scopes.ALL) -> BenchmarkData:
    """The run's arrays, restricted to one OOD scope (all sets by default)."""
    return _cached("view", **_args(root, run, scope))


def load_thumbs(root: Path, run: dict, split: str):
    """A split's thumbnails; errors reach the caller, which may go on without them (a bundle ships only some)."""
    return _loaders()["thumbs"](split=split, **_args(root, run))


def cached_metrics(sel: Selection, method: str, params: dict | None = None, run: dict | None = None) -> dict:
    """metrics_for, memoised per (run, method, parameters)."""
    registered = M.REGISTRY.get(method)
    resolved = registered.resolve(params) if registered is not None else dict(params or {})
    return _cached(
        "metrics", method=method, params=tuple(sorted(resolved.items())), **_args(sel.root, run or sel.run, sel.scope)
    )


def registry_key() -> str:
    """The registered methods and their parameter specs: a new method invalidates cached reports."""
    from oodcore.detectors.registry import registry_key as key

    return key()


def cached_report(sel: Selection, run: dict, n_boot: int = 200) -> dict:
    return _cached("report", n_boot=n_boot, registry=registry_key(), **_args(sel.root, run, sel.scope))


def cached_honest(sel: Selection) -> dict:
    return _cached("honest", **_args(sel.root, sel.run, sel.scope))


def cached_odin_grid(sel: Selection):
    return _cached("odin_grid", **_args(sel.root, sel.run, sel.scope))


def cached_confidences(sel: Selection) -> dict:
    return _cached("confidences", **_args(sel.root, sel.run, sel.scope))


def cached_runs(root: Path, damaged: list | None = None) -> list[dict]:
    """Usable runs under `root`; runs that cannot be used go to `damaged` (CacheError)."""
    try:
        store = store_of(root)
        return store.list_runs(root, damaged=damaged) if store is C else store.list_runs(root)
    except (OSError, ValueError):
        return []


def clear_run_caches() -> None:
    """Forget memoised runs, metrics and reports (a training job just published a detector)."""
    for key in ("load", "view", "metrics", "report"):
        fn = (_LOADERS or {}).get(key)
        if fn is not None:
            fn.clear()
