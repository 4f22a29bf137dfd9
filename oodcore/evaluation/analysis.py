"""The pure analysis behind the explorer's pages (no Streamlit): what a slider move computes,
histograms, misfire tables, ODIN's honest-vs-naive tuning, leaderboard frames, scoring one new image."""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import numpy as np

from oodcore import detectors as M
from oodcore.detectors.numerics import ladder
from oodcore.evaluation.metrics import METRIC_NAMES, compute_metrics, threshold_at_tpr
from oodcore.store.rundata import BenchmarkData, SplitArrays

SETS = ("ID", "OOD")

TPR = 0.95


def fmt_pct(value: float, digits: int = 2) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{100 * value:.{digits}f}%"


def fmt_num(value: float) -> str:
    return f"{value:g}"


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def metrics_for(data: BenchmarkData, method: M.Method | str, params: dict | None = None) -> dict:
    """What one slider move computes: scores, the five metrics and the 95%-TPR threshold.

    Goes through `evaluation.eval_scores`, so a detector trained with OOD exposure is only
    scored on the held-out OOD rows. Returns {"metrics": {name: fraction}, "scores_id",
    "scores_ood", "ood_rows" (the data.ood rows scores_ood belongs to), "threshold", "note",
    "seconds"}. Raises MethodUnavailable when the cache lacks what this setting needs.
    """
    from oodcore.evaluation.report import eval_scores

    started = time.perf_counter()
    method = M.get_for(data, method) if isinstance(method, str) else method
    s_id, s_ood, split = eval_scores(method, data, **(params or {}))
    metrics = compute_metrics(s_id, s_ood)
    threshold = threshold_at_tpr(s_id, s_ood, TPR)
    return {
        "metrics": metrics,
        "scores_id": s_id,
        "scores_ood": s_ood,
        "threshold": threshold,
        "ood_rows": split.heldout if split is not None else np.arange(len(s_ood)),
        "note": split.describe() if split is not None else "",
        "seconds": time.perf_counter() - started,
    }


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
        frames.append(
            pd.DataFrame(
                {
                    "set": name,
                    "start": edges[:-1],
                    "end": edges[1:],
                    "fraction": counts / max(len(s), 1),
                    "count": counts,
                }
            )
        )
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


def misfire_class_table(
    data: BenchmarkData,
    scores_ood: np.ndarray,
    passed: np.ndarray,
    top: int | None = None,
    ood_rows: np.ndarray | None = None,
):
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
    frame = pd.DataFrame(
        {
            "predicted class": names[rows],
            "OOD passing as ID": n_pass[rows],
            "share of misfires (%)": 100 * n_pass[rows] / max(int(passed.sum()), 1),
            "OOD predicted as this class": n_all[rows],
            "pass rate (%)": 100 * n_pass[rows] / np.maximum(n_all[rows], 1),
            "mean confidence (%)": 100 * conf_sum[rows] / np.maximum(n_pass[rows], 1),
            "ID images of this class": id_count[rows],
        }
    ).sort_values(["OOD passing as ID", "mean confidence (%)"], ascending=[False, False], kind="stable")
    frame = frame.reset_index(drop=True)
    return frame.head(top) if top else frame


def percentile_among(value: float, reference: np.ndarray) -> float:
    """Percent of `reference` scores below `value` (ties count half): 'more OOD-like than x% of ID'."""
    reference = np.asarray(reference)
    return 100.0 * (np.mean(reference < value) + 0.5 * np.mean(reference == value))


log_ladder = ladder  # the slider values of a log-scale parameter (oodcore.detectors.numerics)


def param_options(method: M.Method, param: M.Param, data: BenchmarkData | None) -> list[float] | None:
    """The values a parameter's select_slider offers, or None for a plain linear slider.

    Grid parameters offer the cached grid's values; params with `choices` offer them;
    log-scale params a 1-2-5 ladder.
    """
    options = M.grid_values(param, data)
    if options is not None:
        return options
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

    from oodcore.evaluation.report import tuning_grid

    odin = M.get("odin")
    rows = []
    for params in tuning_grid(odin, data):
        s_id, s_ood = odin.score_id_ood(data, **params)
        if split_rows is not None:
            s_ood = s_ood[split_rows]
        rows.append({**params, "auroc": compute_metrics(s_id, s_ood)["auroc"]})
    return pd.DataFrame(rows)


def honest_vs_naive(data: BenchmarkData) -> dict:
    """ODIN tuned on the OOD exposure split (or the tuning set) vs tuned on the very images it is scored on."""
    from oodcore.evaluation.report import tune_on_exposure

    odin = M.get("odin")
    split = data.tuning_split()
    if split is None or len(split.heldout) == 0 or (not split.uses_tune_set and len(split.exposure) == 0):
        raise M.MethodUnavailable("too few OOD images in this selection to tune on some and score the others")
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
        "tune_set": split.name if split.uses_tune_set else None,
        "n_exposure": int(split.n_tune if split.uses_tune_set else len(split.exposure)),
        "n_heldout": int(len(split.heldout)),
    }


def set_row(row: dict) -> dict:
    """One per-set leaderboard cell group: method (tuned marked), setting, metrics in percent, tuning source."""
    method = M.REGISTRY.get(row["method"])
    label = row.get("label") or (method.label if method else row["method"])
    return {
        "method": label + (" (tuned)" if row.get("tuned_on") else ""),
        "setting": params_text(row["params"]) or "—",
        **{k: round(100 * row[k], 2) for k in METRIC_NAMES},
        "tuned on": row.get("tuned_on") or "",
    }


def ninco_decisions(paths: Sequence[str]) -> np.ndarray:
    """NINCO's decision for each OOD path matched by `<wnid>/<file>` ('i' = contains an ImageNet-1K object,
    'o' clean, 'u'/'q' unclear), '' where the image is not one of the 400 NINCO annotated."""
    from oodcore.data.oodsets import ninco_annotations, wnid_file_key

    table = ninco_annotations()
    return np.asarray([table.get(wnid_file_key(str(p)), "") for p in paths], dtype=object)


def report_frame(reports: Sequence[dict]):
    """Leaderboard rows (metrics in percent) from `evaluate_run` reports, one per architecture, as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(report_rows(reports))


def report_rows(reports: Sequence[dict]) -> list[dict]:
    """The leaderboard's rows as plain dicts (no pandas: the page's first cards need only these)."""
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
            row.update(
                {
                    "tuned with OOD data": f"yes: {r['note']}" if tuned else "no",
                    "tuned on": tuned or "",
                    "protocol": report["protocol"],
                    "n_id": report["n_id"],
                    "n_ood": r.get("n_ood_scored", report["n_ood"]),
                    "ID top-1 (%)": 100 * report["id_top1"],
                    "benchmark": report["benchmark"],
                }
            )
            rows.append(row)
    return rows


def restrict_to_run(logits_1000: np.ndarray, run: dict) -> np.ndarray:
    """1000 ImageNet logits -> the run's protocol classes (wnids), in the run's order."""
    from oodcore.data.imagenet import wnid_to_index

    index = wnid_to_index()
    missing = [w for w in run["class_ids"] if w not in index]
    if missing:
        raise ValueError(f"the run's classes are not ImageNet-1K wnids (e.g. {missing[0]!r})")
    return np.asarray(logits_1000)[..., [index[w] for w in run["class_ids"]]]


def score_new_image(
    data: BenchmarkData, logits: np.ndarray, features: np.ndarray | None, names: Iterable[str] | None = None
) -> list[dict]:
    """Every method's default-parameter score on one image (logits already restricted to data's classes).

    Each row: {"method", "label", "params", "score"} or, when the method cannot score
    a new image, "score": None and "why". A new image is scored with the run's fitted
    states, like any cached row; only per-row precomputed values (ODIN's grid at ε > 0,
    a trained detector's scores) are missing for it.
    """
    logits = np.asarray(logits, dtype=np.float32).reshape(1, -1)
    if logits.shape[1] != data.n_classes:
        raise ValueError(f"got {logits.shape[1]} logits, the run has {data.n_classes} classes")
    feats = None if features is None else np.asarray(features, dtype=np.float32).reshape(1, -1)
    split = SplitArrays(logits=logits, features=feats, labels=np.array([-1]), paths=np.array(["new image"]))
    rows = []
    for name in names if names is not None else [*M.REGISTRY, *data.trained]:
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
        rows.append(row)
    return rows
