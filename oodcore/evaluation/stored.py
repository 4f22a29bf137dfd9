"""Precomputed reports: each run's full report stored beside it, keyed by what determines it.

`run`, `train` and the synthetic study compute a run's report once (every available method at
its defaults, the tuned rows, bootstrap CIs) and store it as `report.json` beside `run.json`,
written atomically. Its key hashes the report format, the detector registry (names, parameter
specs, needs, tuning grids), the run's artifact names (themselves content keys), its trained
detectors and the bootstrap settings, so the leaderboard reads it without loading any array and
recomputes only a run whose key changed or that has none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from oodcore import __version__
from oodcore import detectors as M
from oodcore.store import cache as C
from oodcore.store.atomic import read_json, write_json
from oodcore.store.rundata import BenchmarkData

REPORT_FILE = "report.json"
REPORT_FORMAT = 1


def registry_version() -> str:
    """The registered methods and their parameter specs: a new or changed method invalidates stored reports."""
    spec = [(m.name, [repr(p) for p in m.params], sorted(m.needs), bool(m.tune_grid)) for m in M.REGISTRY.values()]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]  # sorted needs: stable across processes


def _trained_listing(folder: Path) -> list:
    try:
        return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in (folder / C.TRAINED_DIR).glob("*"))
    except OSError:
        return []


def report_key(folder: Path, run: dict, n_boot: int, seed: int = 0, *, trained: bool = True) -> str:
    """What a run's report depends on, without reading any array (`trained=False`: all but trained detectors)."""
    blob = {
        "format": REPORT_FORMAT,
        "oodcore": __version__,
        "registry": registry_version(),
        "run": {k: v for k, v in run.items() if k != "seconds"},  # identity, artifacts, counts, fit source
        "trained": _trained_listing(folder) if trained else None,
        "n_boot": int(n_boot),
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_report(data: BenchmarkData, n_boot: int = 200, seed: int = 0, reuse: dict | None = None) -> dict:
    """Every available method (registry and trained) at its defaults plus tuned rows, one method at a time.

    A method the cache cannot serve (e.g. an empty fit split) is listed under `unavailable`
    with the reason instead of sinking the whole architecture. `reuse`: a report of the same run
    and registry whose registry methods' rows are taken as they are (only trained detectors are scored).
    """
    from oodcore.evaluation.report import evaluate_run

    report, rows, unavailable = None, [], []
    old_rows: dict[str, list] = {}
    old_unavailable: dict[str, dict] = {}
    if reuse:
        for row in reuse.get("results", []):
            old_rows.setdefault(row["method"], []).append(row)
        old_unavailable = {u["method"]: u for u in reuse.get("unavailable", [])}
    for method in M.available_methods(data):
        if method.name in M.REGISTRY and (method.name in old_rows or method.name in old_unavailable):
            rows += old_rows.get(method.name, [])
            if method.name in old_unavailable:
                unavailable.append(old_unavailable[method.name])
            report = report or {k: v for k, v in reuse.items() if k not in ("results", "unavailable")}
            continue
        try:
            part = evaluate_run(data, [method.name], n_boot=n_boot, seed=seed)
        except M.MethodUnavailable as exc:
            unavailable.append({"method": method.name, "label": method.label, "why": str(exc)})
            continue
        for row in part["results"]:
            row["label"], row["trained_on_ood"] = method.label, bool(getattr(method, "trained_on_ood", False))
        rows += part["results"]
        report = report or part
    report = report or evaluate_run(data, [], n_boot=n_boot, seed=seed)
    report["results"], report["unavailable"] = rows, unavailable
    return report


def read_stored(root: Path, benchmark: str, arch: str, n_boot: int = 200, run: dict | None = None) -> dict | None:
    """The stored report if it is current (its key matches the run as it is now), else None."""
    folder = C.arch_dir(Path(root), benchmark, arch)
    try:
        run = run or C.read_run(Path(root), benchmark, arch)
        stored = read_json(folder / REPORT_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != report_key(folder, run, n_boot):
        return None
    report = stored.get("report")
    return report if isinstance(report, dict) else None


def stored_report(
    root: Path,
    benchmark: str,
    arch: str,
    n_boot: int = 200,
    *,
    load: Callable[[], BenchmarkData] | None = None,
    write: bool = True,
) -> tuple[dict, bool]:
    """(report, computed_now): the stored report when current, else computed (and stored when `write`).

    `load` supplies the run's data when it must be computed (default: read it from the cache).
    A cache that cannot be written (read-only deployment) still gets the computed report.
    """
    root = Path(root)
    folder = C.arch_dir(root, benchmark, arch)
    run = C.read_run(root, benchmark, arch)
    found = read_stored(root, benchmark, arch, n_boot, run)
    if found is not None:
        return found, False
    key, base = report_key(folder, run, n_boot), report_key(folder, run, n_boot, trained=False)
    reuse = None
    try:  # only trained detectors changed (a training run finished): keep every other row
        old = read_json(folder / REPORT_FILE)
        reuse = old["report"] if isinstance(old, dict) and old.get("base") == base else None
    except (OSError, ValueError, KeyError):
        pass
    if load is not None:
        data = load()
    else:  # fitted states and per-split tables go beside the run too (computed once per run)
        from oodcore.detectors.persist import attach

        data = C.load_benchmark(root, benchmark, arch)
        attach(data, folder, writable=write)
    report = full_report(data, n_boot, reuse=reuse)
    if write:
        try:
            write_json(folder / REPORT_FILE, {"key": key, "base": base, "n_boot": int(n_boot), "report": report})
        except OSError:
            pass
    return report, True
