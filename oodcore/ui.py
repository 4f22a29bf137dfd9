"""Shared helpers of the Streamlit explorer (app.py and pages/*.py).

Two layers:

* pure functions (no Streamlit): what a slider move computes (`metrics_for`),
  histogram / curve frames, class tables, scoring one new image;
* Streamlit glue: memoised cache reads, the run picker in the sidebar, the
  first-run demo build, generic parameter sliders built from a method's Param spec.

Nothing here imports torch at module level: pages that only read the cache stay
light. The first-run build and the score page import it lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import cache as C
from . import methods as M
from .data import BenchmarkData, SplitArrays
from .metrics import (
    LOWER_IS_BETTER,
    METRIC_DESCRIPTIONS,
    METRIC_LABELS,
    METRIC_NAMES,
    compute_metrics,
    threshold_at_tpr,
)
from .paths import cache_root

APP_TITLE = "ImageNet-O explorer"
READONLY_ENV = "OODCORE_READONLY"
ID_COLOR = "#3574C4"  # in-distribution: blue everywhere
OOD_COLOR = "#E4572E"  # out-of-distribution: orange-red everywhere
SETS = ("ID", "OOD")
CONVENTIONS = ("**OOD is the positive class; a higher score means more OOD.** "
               "FPR@95 (OOD+): ID false-positive rate when 95% of OOD are caught. "
               "FPR@95 (ID+): OOD acceptance when 95% of ID are kept.")
MAX_UPLOAD_MB = 20
MAX_PIXELS = 40_000_000  # uploads above this (from the header, before decoding) are rejected as bombs
TPR = 0.95

# ------------------------------------------------------------------ settings


def readonly() -> bool:
    """Public deployments: `OODCORE_READONLY=1` (or `[oodcore] readonly = true` in secrets.toml)."""
    value = os.environ.get(READONLY_ENV, "")
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        import streamlit as st

        if st.secrets.load_if_toml_exists():
            section = st.secrets.get("oodcore", {}) or {}
            return bool(section.get("readonly", False))
    except Exception:  # no secrets file, or outside a Streamlit run
        pass
    return False


def fmt_pct(value: float, digits: int = 2) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{100 * value:.{digits}f}%"


def fmt_num(value: float) -> str:
    return f"{value:g}"


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


# ------------------------------------------------------------------ pure computations


def metrics_for(data: BenchmarkData, method: M.Method | str, params: dict | None = None) -> dict:
    """What one slider move computes: scores, the five metrics and the 95%-TPR threshold.

    Goes through `evaluation.eval_scores`, so a detector trained with OOD exposure is only
    scored on the held-out OOD rows. Returns {"metrics": {name: fraction}, "scores_id",
    "scores_ood", "ood_rows" (the data.ood rows scores_ood belongs to), "threshold", "note",
    "seconds"}. Raises MethodUnavailable when the cache lacks what this setting needs.
    """
    from .evaluation import eval_scores

    started = time.perf_counter()
    method = M.get_for(data, method) if isinstance(method, str) else method
    s_id, s_ood, split = eval_scores(method, data, **(params or {}))
    metrics = compute_metrics(s_id, s_ood)
    threshold = threshold_at_tpr(s_id, s_ood, TPR)
    return {"metrics": metrics, "scores_id": s_id, "scores_ood": s_ood, "threshold": threshold,
            "ood_rows": split.heldout if split is not None else np.arange(len(s_ood)),
            "note": split.describe() if split is not None else "",
            "seconds": time.perf_counter() - started}


def histogram_frame(scores_id: np.ndarray, scores_ood: np.ndarray, bins: int = 50):
    """ID and OOD score histograms on shared bins, as fractions of each set (sets differ in size)."""
    import pandas as pd

    both = np.concatenate([scores_id, scores_ood])
    lo, hi = float(np.min(both)), float(np.max(both))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    frames = []
    for name, s in zip(SETS, (scores_id, scores_ood)):
        counts, _ = np.histogram(s, bins=edges)
        frames.append(pd.DataFrame({"set": name, "start": edges[:-1], "end": edges[1:],
                                    "fraction": counts / max(len(s), 1), "count": counts}))
    return pd.concat(frames, ignore_index=True)


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability (T = 1) over the protocol's classes."""
    return M.max_softmax(logits, 1.0)


def id_threshold(scores_id: np.ndarray, scores_ood: np.ndarray, tpr: float = TPR) -> float:
    """Score t such that calling `score <= t` ID keeps >= tpr of the ID images (the ID+ operating point)."""
    return -threshold_at_tpr(-np.asarray(scores_ood), -np.asarray(scores_id), tpr)


def passes_as_id(scores: np.ndarray, scores_id: np.ndarray, scores_ood: np.ndarray, point: str) -> np.ndarray:
    """Which `scores` are called ID at an operating point: 'ood' (95% of OOD caught) or 'id' (95% of ID kept)."""
    if point == "ood":
        return np.asarray(scores) < threshold_at_tpr(scores_id, scores_ood, TPR)
    return np.asarray(scores) <= id_threshold(scores_id, scores_ood, TPR)


def misfire_class_table(data: BenchmarkData, scores_ood: np.ndarray, passed: np.ndarray, top: int | None = None,
                        ood_rows: np.ndarray | None = None):
    """Predicted classes that attract the OOD images passing as ID, most first.

    `scores_ood`/`passed` belong to the OOD rows `ood_rows` (default: all of them).
    """
    import pandas as pd

    rows_of = np.arange(len(data.ood)) if ood_rows is None else np.asarray(ood_rows)
    preds = data.ood.preds[rows_of]
    conf = softmax_confidence(data.ood.logits[rows_of])
    names = np.asarray(data.class_names, dtype=object)
    k = data.n_classes
    n_pass = np.bincount(preds[passed], minlength=k)
    n_all = np.bincount(preds, minlength=k)
    conf_sum = np.bincount(preds[passed], weights=conf[passed], minlength=k)
    id_count = np.bincount(data.id.labels[data.id.labels >= 0], minlength=k) if len(data.id) else np.zeros(k, int)
    rows = np.flatnonzero(n_pass)
    frame = pd.DataFrame({
        "predicted class": names[rows],
        "OOD passing as ID": n_pass[rows],
        "share of misfires (%)": 100 * n_pass[rows] / max(int(passed.sum()), 1),
        "OOD predicted as this class": n_all[rows],
        "pass rate (%)": 100 * n_pass[rows] / np.maximum(n_all[rows], 1),
        "mean confidence (%)": 100 * conf_sum[rows] / np.maximum(n_pass[rows], 1),
        "ID images of this class": id_count[rows],
    }).sort_values(["OOD passing as ID", "mean confidence (%)"], ascending=[False, False], kind="stable")
    frame = frame.reset_index(drop=True)
    return frame.head(top) if top else frame


def percentile_among(value: float, reference: np.ndarray) -> float:
    """Percent of `reference` scores below `value` (ties count half): 'more OOD-like than x% of ID'."""
    reference = np.asarray(reference)
    return 100.0 * (np.mean(reference < value) + 0.5 * np.mean(reference == value))


def log_ladder(low: float, high: float, extra: Iterable[float] = ()) -> list[float]:
    """1-2-5 values per decade within [low, high], plus `extra` (e.g. the default), sorted."""
    values = set(float(v) for v in extra)
    for decade in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for m in (1.0, 2.0, 5.0):
            v = float(f"{m * 10.0 ** decade:.6g}")
            if low * (1 - 1e-9) <= v <= high * (1 + 1e-9):
                values.add(v)
    values.update({float(low), float(high)})
    return sorted(values)


def param_options(method: M.Method, param: M.Param, data: BenchmarkData | None) -> list[float] | None:
    """The values a parameter's select_slider offers, or None for a plain linear slider.

    ODIN (a method with a precomputed grid) offers the cached grid's values; without a
    grid ε is fixed at 0. Params with `choices` offer them; log-scale params a 1-2-5 ladder.
    """
    if method.tune_grid and method.name == "odin":
        grid = data.odin if data is not None else None
        if param.name == "T":
            return sorted(float(t) for t in (grid.temps if grid is not None else (param.choices or (param.default,))))
        if param.name == "eps":
            return sorted({float(e) for e in grid.eps} | {0.0}) if grid is not None else [0.0]
    if param.choices:
        return sorted(float(c) for c in param.choices)
    if param.scale == "log":
        return log_ladder(param.low, param.high, [param.default])
    return None


def nearest(options: Sequence[float], value: float) -> float:
    return min(options, key=lambda o: abs(math.log10(o) - math.log10(value)) if o > 0 and value > 0 else abs(o - value))


def odin_temperature_options(data: BenchmarkData) -> list[float]:
    """T values for the ODIN tuner: the cached grid's plus a 1-2-5 ladder (ε = 0 works at any T)."""
    param = next(p for p in M.get("odin").params if p.name == "T")
    grid = [float(t) for t in data.odin.temps] if data.odin is not None else []
    return sorted(set(log_ladder(param.low, param.high, [param.default])) | set(grid))


def odin_auroc_grid(data: BenchmarkData, split_rows: np.ndarray | None = None):
    """AUROC of ODIN on every cached (T, ε) (ε = 0 only, over the study T's, without a grid)."""
    import pandas as pd
    from .evaluation import tuning_grid

    odin = M.get("odin")
    rows = []
    for params in tuning_grid(odin, data):
        s_id, s_ood = odin.score_id_ood(data, **params)
        if split_rows is not None:
            s_ood = s_ood[split_rows]
        rows.append({**params, "auroc": compute_metrics(s_id, s_ood)["auroc"]})
    return pd.DataFrame(rows)


def honest_vs_naive(data: BenchmarkData) -> dict:
    """ODIN tuned on the OOD exposure split vs tuned on the very images it is scored on (held-out split)."""
    from .evaluation import tune_on_exposure
    from .splits import ood_split

    odin = M.get("odin")
    split = ood_split(len(data.ood))
    best, exposure_auc = tune_on_exposure(odin, data, split)
    s_id, s_ood = odin.score_id_ood(data, **best)
    honest = compute_metrics(s_id, s_ood[split.heldout])["auroc"]
    table = odin_auroc_grid(data, split.heldout)
    top = table.loc[table["auroc"].idxmax()]
    return {
        "honest_params": {k: float(v) for k, v in best.items()},
        "honest_exposure_auroc": float(exposure_auc),
        "honest_heldout_auroc": float(honest),
        "naive_params": {"T": float(top["T"]), "eps": float(top["eps"])},
        "naive_heldout_auroc": float(top["auroc"]),
        "describe": split.describe(),
        "n_exposure": int(len(split.exposure)),
        "n_heldout": int(len(split.heldout)),
    }


def report_frame(reports: Sequence[dict]):
    """Leaderboard rows (metrics in percent) from `evaluate_run` reports, one per architecture."""
    import pandas as pd

    rows = []
    for report in reports:
        for r in report["results"]:
            method = M.REGISTRY.get(r["method"])
            label = r.get("label") or (method.label if method else r["method"])
            tuned = r.get("tuned_on")
            suffix = " (trained)" if r.get("trained_on_ood") else " (tuned)" if tuned else ""
            row = {
                "architecture": report["arch"],
                "method": label + suffix,
                "setting": params_text(r["params"]) or "—",
            }
            for k in METRIC_NAMES:
                row[k] = 100 * r[k]
                ci = (r.get("ci") or {}).get(k)
                row[f"{k}_lo"] = 100 * ci[0] if ci else np.nan
                row[f"{k}_hi"] = 100 * ci[1] if ci else np.nan
            row.update({
                "tuned with OOD data": f"yes: {r['note']}" if tuned else "no",
                "tuned on": tuned or "",
                "protocol": report["protocol"],
                "n_id": report["n_id"],
                "n_ood": r.get("n_ood_scored", report["n_ood"]),
                "ID top-1 (%)": 100 * report["id_top1"],
                "benchmark": report["benchmark"],
            })
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ scoring one new image


def restrict_to_run(logits_1000: np.ndarray, run: dict) -> np.ndarray:
    """1000 ImageNet logits -> the run's protocol classes (wnids), in the run's order."""
    from .imagenet_classes import wnid_to_index

    index = wnid_to_index()
    missing = [w for w in run["class_ids"] if w not in index]
    if missing:
        raise ValueError(f"the run's classes are not ImageNet-1K wnids (e.g. {missing[0]!r})")
    return np.asarray(logits_1000)[..., [index[w] for w in run["class_ids"]]]


def score_new_image(data: BenchmarkData, logits: np.ndarray, features: np.ndarray | None,
                    names: Iterable[str] | None = None) -> list[dict]:
    """Every method's default-parameter score on one image (logits already restricted to data's classes).

    Each row: {"method", "label", "params", "score"} or, when the method cannot score
    a new image, "score": None and "why".
    """
    logits = np.asarray(logits, dtype=np.float32).reshape(1, -1)
    if logits.shape[1] != data.n_classes:
        raise ValueError(f"got {logits.shape[1]} logits, the run has {data.n_classes} classes")
    feats = None if features is None else np.asarray(features, dtype=np.float32).reshape(1, -1)
    split = SplitArrays(logits=logits, features=feats, labels=np.array([-1]), paths=np.array(["new image"]))
    rows = []
    for name in (names if names is not None else [*M.REGISTRY, *data.trained]):
        method = M.get_for(data, name)
        row = {"method": method.name, "label": method.label, "params": method.defaults(), "score": None, "why": ""}
        missing = M.missing_needs(method, data)
        if "features" in method.needs and feats is None:
            missing.add("features")
        if missing:
            row["why"] = f"needs {', '.join(sorted(missing))}, which this model/run does not provide"
        else:
            try:
                row["score"] = float(method.score(data, split)[0])
            except M.MethodUnavailable as exc:
                row["why"] = str(exc)
            except Exception as exc:  # a method that assumes cached splits
                row["why"] = f"cannot score a new image ({type(exc).__name__}: {exc})"
        rows.append(row)
    return rows


def digits_input(img, mean: float, std: float, size: int = 32):
    """A photo as the demo CNN's input: grey, 32x32, ink bright (dark-on-light drawings are inverted)."""
    import torch

    grey = np.asarray(img.convert("L").resize((size, size)), dtype=np.float32) / 255.0
    if grey.mean() > 0.5:  # the digits are bright ink on a dark background; most drawings are the opposite
        grey = 1.0 - grey
    x = torch.from_numpy(grey)[None, None]
    return (x - mean) / std


# ------------------------------------------------------------------ Streamlit glue
# (imported lazily so the pure helpers above are usable without a Streamlit runtime)


def _st():
    import streamlit as st

    return st


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

    @property
    def benchmark(self) -> str:
        return self.run["benchmark"]

    @property
    def arch(self) -> str:
        return self.run["arch"]

    def data(self, run: dict | None = None) -> BenchmarkData:
        """The run's arrays; a run whose files vanished or broke becomes a message, not a traceback."""
        run = run or self.run
        try:
            return load_data(self.root, run)
        except (C.CacheMissing, OSError, KeyError, ValueError) as exc:
            st = _st()
            st.error(f"Cannot read the cached run {run['benchmark']} · {run['arch']}: {exc}. "
                     "Rerun the command that made it (`python -m oodcore list` shows what is cached).")
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
    """Build the memoised loaders once (so this module imports without Streamlit)."""
    st = _st()
    global _LOADERS
    if _LOADERS is None:
        # BenchmarkData is held once per process (cache_resource, read-only arrays): pickling
        # copies of features on every rerun (cache_data) would cost more than the slider's work.
        @st.cache_resource(max_entries=16, show_spinner="Loading the cached run…")
        def load(root: str, benchmark: str, arch: str, token: str) -> BenchmarkData:
            return _freeze(C.load_benchmark(Path(root), benchmark, arch))

        @st.cache_resource(max_entries=16, show_spinner=False)
        def thumbs(root: str, benchmark: str, arch: str, split: str, token: str):
            return C.load_thumbnails(Path(root), benchmark, arch, split)

        @st.cache_data(max_entries=512, show_spinner=False)
        def metrics(root: str, benchmark: str, arch: str, token: str, method: str, params: tuple) -> dict:
            return metrics_for(load(root, benchmark, arch, token), method, dict(params))

        @st.cache_data(max_entries=64, show_spinner=False)
        def report(root: str, benchmark: str, arch: str, token: str, n_boot: int, registry: str) -> dict:
            from .evaluation import evaluate_run

            data = load(root, benchmark, arch, token)
            # one method at a time, so a method the cache cannot serve (e.g. an empty fit split)
            # is listed as unavailable instead of sinking the whole architecture
            report, rows, unavailable = None, [], []
            for method in M.available_methods(data):
                try:
                    part = evaluate_run(data, [method.name], n_boot=n_boot)
                except M.MethodUnavailable as exc:
                    unavailable.append({"method": method.name, "label": method.label, "why": str(exc)})
                    continue
                for row in part["results"]:
                    row["label"], row["trained_on_ood"] = method.label, bool(getattr(method, "trained_on_ood", False))
                rows += part["results"]
                report = report or part
            report = report or evaluate_run(data, [], n_boot=n_boot)
            report["results"], report["unavailable"] = rows, unavailable
            return report

        @st.cache_data(max_entries=32, show_spinner=False)
        def honest(root: str, benchmark: str, arch: str, token: str) -> dict:
            return honest_vs_naive(load(root, benchmark, arch, token))

        @st.cache_data(max_entries=32, show_spinner=False)
        def odin_grid(root: str, benchmark: str, arch: str, token: str):
            return odin_auroc_grid(load(root, benchmark, arch, token))

        @st.cache_data(max_entries=32, show_spinner=False)
        def confidences(root: str, benchmark: str, arch: str, token: str) -> dict:
            data = load(root, benchmark, arch, token)
            return {"id": softmax_confidence(data.id.logits), "ood": softmax_confidence(data.ood.logits)}

        _LOADERS = {"load": load, "thumbs": thumbs, "metrics": metrics, "report": report,
                    "honest": honest, "odin_grid": odin_grid, "confidences": confidences}
    return _LOADERS[kind](**kwargs)


_LOADERS: dict[str, Callable] | None = None


def _args(root: Path, run: dict) -> dict:
    return {"root": str(root), "benchmark": run["benchmark"], "arch": run["arch"], "token": run_token(run, root)}


def load_data(root: Path, run: dict) -> BenchmarkData:
    return _cached("load", **_args(root, run))


def load_thumbs(root: Path, run: dict, split: str):
    return _cached("thumbs", split=split, **_args(root, run))


def cached_metrics(sel: Selection, method: str, params: dict | None = None, run: dict | None = None) -> dict:
    """metrics_for, memoised per (run, method, parameters)."""
    registered = M.REGISTRY.get(method)
    resolved = registered.resolve(params) if registered is not None else dict(params or {})
    return _cached("metrics", method=method, params=tuple(sorted(resolved.items())), **_args(sel.root, run or sel.run))


def registry_key() -> str:
    """The registered methods and their parameter specs: a new method invalidates cached reports."""
    return repr([(m.name, m.params, m.needs, m.tune_grid) for m in M.REGISTRY.values()])


def cached_report(sel: Selection, run: dict, n_boot: int = 200) -> dict:
    return _cached("report", n_boot=n_boot, registry=registry_key(), **_args(sel.root, run))


def cached_honest(sel: Selection) -> dict:
    return _cached("honest", **_args(sel.root, sel.run))


def cached_odin_grid(sel: Selection):
    return _cached("odin_grid", **_args(sel.root, sel.run))


def cached_confidences(sel: Selection) -> dict:
    return _cached("confidences", **_args(sel.root, sel.run))


# ------------------------------------------------------------------ first run, sidebar, pages

_BUILD_LOCK = threading.Lock()
# Phases of the demo build (by progress-message prefix) -> their share of the bar.
_PHASES = (("training", 0.0, 0.3), ("extracting", 0.3, 0.45), ("ODIN grid on id", 0.45, 0.6),
           ("ODIN grid on ood", 0.6, 1.0))


def _overall(message: str, fraction: float) -> float:
    for prefix, lo, hi in _PHASES:
        if message.startswith(prefix):
            return lo + (hi - lo) * min(max(fraction, 0.0), 1.0)
    return min(max(fraction, 0.0), 1.0)


def cached_runs(root: Path) -> list[dict]:
    try:
        return C.list_runs(root)
    except OSError:
        return []


def ensure_runs(root: Path) -> list[dict] | None:
    """The cached runs; with none, build the offline demo (progress shown) or, read-only, explain."""
    st = _st()
    runs = cached_runs(root)
    if runs:
        return runs
    st.title(APP_TITLE)
    if readonly():
        st.info("This read-only deployment has no cached runs yet. Its operator creates one with "
                "`python -m oodcore demo` (offline digits demo) or `python -m oodcore run --arch ... "
                "--id-dir ... --ood-dir ... --odin-grid`, pointing `OODCORE_CACHE` at the cache folder.")
        return None
    st.write(f"No cached runs under `{root}` yet, so the explorer is building the offline **demo benchmark** "
             "(a small CNN on scikit-learn's digits: ID = digits 0-4, OOD = digits 5-9). "
             "It takes about a minute on a laptop CPU and is done once; ImageNet runs come from "
             "`python -m oodcore run ...`.")
    with st.status("Building the demo benchmark…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        shown = {"frac": 0.0, "t": 0.0}

        def progress(message: str, fraction: float) -> None:
            frac = max(shown["frac"], _overall(message, fraction))
            now = time.monotonic()
            if now - shown["t"] > 0.25 or frac >= 1.0:
                bar.progress(frac, text=message)
                shown.update(frac=frac, t=now)

        try:
            with _BUILD_LOCK:
                if not cached_runs(root):
                    from . import demo  # imports torch: only here, lazily

                    demo.build_demo(root, progress=progress)
        except Exception as exc:  # unwritable folder, out of disk, ...
            status.update(label="Building the demo benchmark failed", state="error")
            st.error(f"Could not build the demo under `{root}`: {type(exc).__name__}: {exc}. "
                     "Set `OODCORE_CACHE` to a writable folder, or run `python -m oodcore demo`.")
            return None
        bar.progress(1.0, text="done")
        status.update(label="Demo benchmark ready", state="complete", expanded=False)
    runs = cached_runs(root)
    if not runs:
        st.error("The demo build finished but no run was published; try `python -m oodcore demo`.")
        return None
    st.rerun()
    return runs  # not reached (st.rerun raises) except outside a script run


def _bench_order(runs: list[dict]) -> list[str]:
    names = sorted({r["benchmark"] for r in runs}, key=lambda b: (b == "demo", b))
    return names


def _drop_stale(key: str, options: Sequence) -> None:
    st = _st()
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


def render_sidebar(root: Path, runs: list[dict]) -> Selection:
    """Benchmark and architecture pickers (values bound to the URL) and the run's protocol."""
    st = _st()
    sb = st.sidebar
    benches = _bench_order(runs)
    _drop_stale("bench", benches)
    protocol_of = {r["benchmark"]: r.get("protocol", "?") for r in runs}
    bench = sb.selectbox("Benchmark", benches, key="bench", bind="query-params",
                         help="A cached (ID, OOD, protocol) pair. `demo` is the offline digits benchmark.",
                         format_func=lambda b: f"{b}  ·  {protocol_of.get(b, '')}")
    arch_runs = [r for r in runs if r["benchmark"] == bench]
    archs = [r["arch"] for r in arch_runs]
    _drop_stale("arch", archs)
    arch = sb.selectbox("Architecture", archs, key="arch", bind="query-params",
                        help="Every architecture cached for this benchmark.")
    run = next(r for r in arch_runs if r["arch"] == arch)
    n_classes = len(run.get("class_ids", []))
    grid = "yes" if ("odin_id" in run.get("files", {})) else "no"
    sb.markdown(f"**Protocol:** {run.get('protocol', '?')}  \n{n_classes} classes · "
                f"{run.get('n_id', '?')} ID / {run.get('n_ood', '?')} OOD images  \nODIN grid cached: {grid}")
    with sb.expander("About this run"):
        model = run.get("model", {})
        st.markdown(f"**Model:** `{model.get('name', run['arch']) if isinstance(model, dict) else model}`")
        if not readonly():
            st.markdown(f"**ID:** {run.get('id_root', '?')}  \n**OOD:** {run.get('ood_root', '?')}")
            st.caption(f"cache: {root}")
        skipped = run.get("skipped") or []
        if skipped:
            st.markdown(f"{len(skipped)} unreadable file(s) skipped")
    sb.caption(CONVENTIONS)
    if readonly():
        sb.caption("Read-only deployment: nothing here writes to disk or starts extraction.")
    return Selection(root=root, run=run, runs=arch_runs)


def app_sidebar() -> Selection | None:
    """First-run check, then the run picker. None when there is nothing to show yet."""
    root = cache_root()
    runs = ensure_runs(root)
    if not runs:
        return None
    return render_sidebar(root, runs)


_LOCAL = threading.local()


@contextlib.contextmanager
def entry(sel: Selection):
    """app.py runs the page inside this, so the page uses app.py's sidebar instead of drawing its own."""
    _LOCAL.selection = sel
    try:
        yield
    finally:
        _LOCAL.selection = None


APP_FILE = Path(__file__).resolve().parents[1] / "app.py"


def run_app() -> None:
    """What app.py does: page config, navigation, first-run check, sidebar, then the chosen page."""
    st = _st()
    st.set_page_config(page_title=APP_TITLE, page_icon=":material/travel_explore:", layout="wide")
    page = st.navigation(navigation_pages())
    selection = app_sidebar()
    if selection is None:
        st.stop()
    with entry(selection):
        page.run()


def _started_from_app() -> bool:
    """True when app.py is the session's main script (so this page was reached without it running)."""
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        return ctx is not None and Path(ctx.main_script_path).resolve() == APP_FILE
    except Exception:
        return False


def page_setup(title: str, blurb: str) -> Selection:
    """Title and one-line explanation; a page run on its own also draws the sidebar (defaults: demo)."""
    st = _st()
    sel = getattr(_LOCAL, "selection", None)
    if sel is None and _started_from_app():
        # Streamlit's pages/-folder fallback (a deep link on a fresh server, or AppTest's page switch)
        # ran this file without app.py: run it through the app's navigation instead, then stop here.
        run_app()
        st.stop()
    if sel is None:  # `streamlit run pages/x.py`: this page is the whole app
        st.set_page_config(page_title=f"{title} · {APP_TITLE}", layout="wide")
        sel = app_sidebar()
        if sel is None:
            st.stop()
    st.title(title)
    st.caption(blurb)
    return sel


PAGES = (
    # (file, title, icon, section, does work / starts computation beyond reading the cache)
    ("pages/leaderboard.py", "Leaderboard", ":material/leaderboard:", "Evaluate", False),
    ("pages/curves.py", "Curves", ":material/show_chart:", "Evaluate", False),
    ("pages/odin_tuner.py", "ODIN tuner", ":material/tune:", "Diagnose", False),
    ("pages/misfires.py", "Misfires", ":material/image_search:", "Diagnose", False),
    ("pages/score_image.py", "Score an image", ":material/upload:", "Try it", True),
    ("pages/training.py", "Training", ":material/model_training:", "Try it", True),  # starts training processes
)


def navigation_pages() -> dict[str, list]:
    st = _st()
    sections: dict[str, list] = {}
    for i, (path, title, icon, section, work) in enumerate(PAGES):
        if (work and readonly()) or not (APP_FILE.parent / path).is_file():
            continue
        sections.setdefault(section, []).append(st.Page(path, title=title, icon=icon, default=(i == 0)))
    return sections


# ------------------------------------------------------------------ widgets and charts


def param_controls(method: M.Method, data: BenchmarkData, key_prefix: str, container=None) -> dict[str, float]:
    """One slider per parameter, built from the method's Param spec (new methods need no page edit)."""
    st = _st()
    box = container if container is not None else st
    params: dict[str, float] = {}
    for p in method.params:
        key = f"{key_prefix}.{method.name}.{p.name}"
        options = param_options(method, p, data)
        if options is not None:
            if len(options) == 1:
                params[p.name] = options[0]
                why = " (ε > 0 needs the cached ODIN grid: rerun with `--odin-grid`)" if p.name == "eps" else ""
                box.caption(f"{p.label} = {fmt_num(options[0])}{why}")
                continue
            _drop_stale(key, options)
            default = p.default if p.default in options else nearest(options, p.default)
            params[p.name] = float(box.select_slider(
                f"{p.label}" + (" (log scale)" if p.scale == "log" else ""), options=options, value=default,
                key=key, format_func=fmt_num, help=p.help or None))
        else:
            integral = all(float(v).is_integer() for v in (p.low, p.high, p.default))
            step = (p.high - p.low) / 100 if p.high > p.low else None
            if integral and step is not None:  # counts, percentiles, dimensions: whole numbers
                step = float(max(1, round(step)))
            params[p.name] = float(box.slider(p.label, float(p.low), float(p.high), float(p.default),
                                              step=step, key=key, help=p.help or None))
    return params


def metric_row(metrics: dict, baseline: dict | None = None, baseline_name: str = "", ci: dict | None = None,
               names: Sequence[str] = METRIC_NAMES) -> None:
    """The metrics as st.metric cards (percent), optionally with the change against a baseline."""
    st = _st()
    cols = st.columns(len(names))
    for col, k in zip(cols, names):
        value = metrics[k]
        delta = None
        if baseline is not None:
            d = 100 * (value - baseline[k])
            delta = f"{d:+.2f} pts vs {baseline_name}" if baseline_name else f"{d:+.2f} pts"
        help_text = METRIC_DESCRIPTIONS.get(k, "")
        if ci and ci.get(k):
            help_text += f" 95% bootstrap CI: [{100 * ci[k][0]:.1f}, {100 * ci[k][1]:.1f}]."
        color = "inverse" if k in LOWER_IS_BETTER else "normal"
        if baseline is not None and abs(value - baseline[k]) < 5e-5:  # shows as ±0.00: no arrow colour
            color = "off"
        col.metric(METRIC_LABELS[k], fmt_pct(value), delta=delta, delta_color=color, help=help_text, border=True)


def set_color_scale():
    import altair as alt

    return alt.Scale(domain=list(SETS), range=[ID_COLOR, OOD_COLOR])


def histogram_chart(frame, threshold: float | None = None, title: str = "",
                    x_title: str = "score (higher = more OOD)", height: int = 260):
    """Overlaid ID/OOD score histograms (fraction of each set), the 95%-TPR threshold as a rule."""
    import altair as alt
    import pandas as pd

    base = alt.Chart(frame).mark_rect(opacity=0.55).encode(
        x=alt.X("start:Q", title=x_title, axis=alt.Axis(format="~g"), scale=alt.Scale(zero=False, nice=False)),
        x2="end:Q",
        y=alt.Y("fraction:Q", title="fraction of set", axis=alt.Axis(format="%")),
        y2=alt.datum(0),
        color=alt.Color("set:N", scale=set_color_scale(), title=None, legend=alt.Legend(orient="top")),
        tooltip=[alt.Tooltip("set:N"), alt.Tooltip("start:Q", format=".4g", title="from"),
                 alt.Tooltip("end:Q", format=".4g", title="to"), alt.Tooltip("count:Q"),
                 alt.Tooltip("fraction:Q", format=".1%")],
    )
    layers = [base]
    if threshold is not None and np.isfinite(threshold):
        rule_df = pd.DataFrame({"x": [threshold], "label": ["95% TPR threshold"]})
        rule = alt.Chart(rule_df).mark_rule(color="#333", strokeDash=[5, 3], size=1.5).encode(
            x="x:Q", tooltip=[alt.Tooltip("x:Q", format=".4g", title="threshold")])
        text = alt.Chart(rule_df).mark_text(align="left", dx=4, dy=-4, baseline="top", color="#333", fontSize=11).encode(
            x="x:Q", y=alt.value(0), text="label:N")
        layers += [rule, text]
    chart = alt.layer(*layers).properties(height=height)
    return chart.properties(title=title) if title else chart


def thumbnail(data_bytes: np.ndarray, offsets: np.ndarray, index: int):
    from .thumbs import unpack_one

    return unpack_one(data_bytes, offsets, int(index))


def status_note(text: str) -> None:
    _st().caption(text)
