"""Score every method on a cached run and report it: JSON rows, a table, a scores CSV.

Untuned methods are scored on the full OOD set. A method with a tuning grid
(ODIN) also gets a row whose setting was chosen on the separate OOD tuning set
(--tune-ood) and scored on every test image, or, without one, chosen on the OOD
*exposure* split and scored on the *held-out* split only; `tuned_on` names the source.
A run with several OOD sets is reported per set, per group (unweighted means of the
sets' metrics, as OpenOOD reports) and overall (oodcore.evaluation.sets).
"""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np

from oodcore import detectors as M
from oodcore.data.splits import OodSplit, TuneSetSplit
from oodcore.evaluation.metrics import METRIC_NAMES, compute_metrics, evaluate
from oodcore.store.rundata import BenchmarkData


def method_names(spec: str | None, data: BenchmarkData | None = None) -> list[str]:
    """Parse `--methods a,b` (or 'all'); unknown names are an error."""
    if not spec or spec == "all":
        names = list(M.REGISTRY)
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        for name in names:
            M.get(name)
    if data is not None:
        names = [n for n in names if M.get(n).available(data)]
    return names


def eval_scores(
    method: M.Method, data: BenchmarkData, **params
) -> tuple[np.ndarray, np.ndarray, OodSplit | TuneSetSplit | None]:
    """Scores to evaluate: all OOD rows, or only the held-out ones for a detector trained with OOD exposure.

    Every page and report goes through this, so no view ever scores a detector on
    the OOD images it was trained with (with a separate tuning set, every test row is held out).
    """
    s_id, s_ood = method.score_id_ood(data, **params)
    if method.trained_on_ood:
        split = data.tuning_split()
        return s_id, s_ood[split.heldout], split
    return s_id, s_ood, None


def tuning_grid(method: M.Method, data: BenchmarkData) -> list[dict[str, float]]:
    """Candidate settings: grid parameters over the cached grid's axes, the others over their declared choices."""
    axes = [[(p.name, c) for c in (M.grid_values(p, data) or p.choices or (p.default,))] for p in method.params]
    return [dict(combo) for combo in itertools.product(*axes)]


def tune_on_exposure(method: M.Method, data: BenchmarkData, split: OodSplit | TuneSetSplit) -> tuple[dict, float]:
    """The setting with the best AUROC on (all ID, OOD exposure split), or on (all ID, the tuning set)."""
    best, best_auc = None, -np.inf
    for params in tuning_grid(method, data):
        if split.uses_tune_set:
            s_id, s_tune = method.score(data, data.id, **params), method.score(data, data.tune, **params)
        else:
            s_id, s_ood = method.score_id_ood(data, **params)
            s_tune = s_ood[split.exposure]
        auc = compute_metrics(s_id, s_tune)["auroc"]
        if auc > best_auc:
            best, best_auc = params, auc
    return best, float(best_auc)


def evaluate_run(
    data: BenchmarkData,
    names: Iterable[str] | None = None,
    *,
    n_boot: int = 200,
    seed: int = 0,
    tune: bool = True,
) -> dict:
    """The JSON report of a run (metrics as fractions)."""
    names = list(names) if names is not None else [m.name for m in M.available_methods(data)]
    split = data.tuning_split()
    rows = []
    for name in names:
        method = M.get_for(data, name)
        params = method.defaults()
        s_id, s_ood, used = eval_scores(method, data, **params)
        rows.append(_row(method, params, s_id, s_ood, used, n_boot, seed))
        if tune and _can_tune(split) and method.tune_grid:
            best, exposure_auc = tune_on_exposure(method, data, split)
            s_id, s_ood = method.score_id_ood(data, **best)
            row = _row(method, best, s_id, s_ood[split.heldout], split, n_boot, seed)
            row["exposure_auroc" if not split.uses_tune_set else "tune_auroc"] = exposure_auc
            rows.append(row)
    return {
        "benchmark": data.benchmark,
        "arch": data.arch,
        "protocol": data.protocol,
        "n_id": len(data.id),
        "n_ood": len(data.ood),
        "n_classes": data.n_classes,
        "id_top1": data.id_top1(),
        "skipped": [s["path"] for s in data.meta.get("skipped", [])],
        "fit_split": data.meta.get("fit_split"),
        "fit_source": data.meta.get("fit_source"),
        "official_id_set": data.meta.get("official_id_set"),
        "skipped_reasons": [  # the same files with their split and why (unreadable, broken symlink, loop)
            {"split": s.get("split"), "path": s["path"], "error": s.get("error")} for s in data.meta.get("skipped", [])
        ],
        "split": None if split is None else _split_json(split),
        "tuning_source": None if split is None else split.describe(),
        "results": rows,
    }


def _can_tune(split) -> bool:
    """A split with rows to tune on and rows to score (a small set's view may have neither)."""
    if split is None:
        return False
    return len(split.heldout) > 0 and (split.uses_tune_set or len(split.exposure) > 0)


def _split_json(split) -> dict:
    if split.uses_tune_set:
        return {"tune_set": split.name, "n_tune": split.n_tune, "n_exposure": 0, "n_heldout": len(split.heldout)}
    return {
        "seed": split.seed,
        "fraction": split.fraction,
        "n_exposure": len(split.exposure),
        "n_heldout": len(split.heldout),
    }


def _row(method, params, s_id, s_ood, split: OodSplit | None, n_boot: int, seed: int) -> dict:
    report = evaluate(s_id, s_ood, n_boot=n_boot, seed=seed)
    return {
        "method": method.name,
        "params": params,
        **{k: float(report[k]) for k in METRIC_NAMES},
        "ci": report.get("ci", {}),
        "n_ood_scored": int(len(s_ood)),
        "tuned_on": None if split is None else split.tag(),
        "note": "scored on the full OOD set" if split is None else split.describe(),
    }


def format_table(report: dict) -> str:
    """A study-style table: one line per method, metrics in percent, CIs in brackets."""
    head = (
        f"{report['benchmark']} · {report['arch']} · protocol {report['protocol']} · "
        f"{report['n_id']} ID / {report['n_ood']} OOD · {report['n_classes']} classes · "
        f"ID top-1 {100 * report['id_top1']:.1f}%"
    )
    lines = [head]
    if report.get("fit_split"):
        lines.append(report["fit_split"])
    if report.get("skipped"):
        lines.append(f"skipped {len(report['skipped'])} unreadable file(s); see the JSON for paths")
    cols = ["AUROC", "AUPR-Out", "AUPR-In", "FPR95(OOD+)", "FPR95(ID+)"]
    lines.append(f"{'method':<34}" + "".join(f"{c:>22}" for c in cols))
    for row in report["results"]:
        label = row["method"] + _params_text(row["params"]) + (" *" if row["tuned_on"] else "")
        cells = []
        for key in METRIC_NAMES:
            ci = row["ci"].get(key)
            text = f"{100 * row[key]:.1f}" + (f" [{100 * ci[0]:.1f},{100 * ci[1]:.1f}]" if ci else "")
            cells.append(f"{text:>22}")
        lines.append(f"{label:<34}" + "".join(cells))
    notes = [r["note"] for r in report["results"] if r["tuned_on"]]
    if notes:
        lines.append(f"* {notes[0]}; untuned rows are scored on the full OOD set")
    if report.get("results_scope"):
        lines.append(f"rows above: {report['results_scope']}")
    lines.append(
        "OOD is the positive class; FPR95(OOD+) = ID false-positive rate at 95% OOD recall, "
        "FPR95(ID+) = OOD acceptance at 95% ID recall; [95% bootstrap CI]"
    )
    return "\n".join(lines)


def _params_text(params: dict) -> str:
    return "(" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")" if params else ""


def scores_frame(data: BenchmarkData, names: Iterable[str]):
    """One row per image: path, is_ood, label, pred, ood_set (empty for ID) and one column per method (defaults)."""
    import pandas as pd

    from oodcore.store.scopes import set_column

    frame = pd.DataFrame(
        {
            "path": np.concatenate([data.id.paths, data.ood.paths]),
            "is_ood": np.r_[np.zeros(len(data.id), int), np.ones(len(data.ood), int)],
            "label": np.concatenate([data.id.labels, data.ood.labels]),
            "pred": np.concatenate([data.id.preds, data.ood.preds]),
            "ood_set": np.concatenate([np.full(len(data.id), "", dtype=object), set_column(data)]),
        }
    )
    for name in names:
        s_id, s_ood = M.get_for(data, name).score_id_ood(data)
        frame[name] = np.concatenate([s_id, s_ood])
    return frame
