"""Reports of a run with several OOD sets: per set, per group and overall.

Each set is evaluated on its own (`evaluate_run` on the set's view, oodcore.store.scopes). A group's
numbers, and the overall ones, are the *unweighted* means of its sets' metrics, as OpenOOD v1.5
reports near-/far-OOD; they have no bootstrap CI (a mean of per-set estimates).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from oodcore.evaluation.metrics import METRIC_NAMES
from oodcore.evaluation.report import evaluate_run
from oodcore.store import scopes
from oodcore.store.rundata import BenchmarkData


def evaluate_sets(
    data: BenchmarkData, names: Iterable[str] | None = None, *, n_boot: int = 200, seed: int = 0, tune: bool = True
) -> dict:
    """`evaluate_run` of the pooled OOD sets plus, with several sets, `sets`, `groups` and `overall`."""
    names = list(names) if names is not None else None
    report = evaluate_run(data, names, n_boot=n_boot, seed=seed, tune=tune)
    if len(data.ood_sets) <= 1:
        if data.ood_sets:
            report["ood_set"] = data.ood_sets[0].name
        return report
    report["results_scope"] = f"all {len(data.ood_sets)} OOD sets pooled"
    per_set = []
    for s in data.ood_sets:
        part = evaluate_run(scopes.select(data, f"set:{s.name}"), names, n_boot=n_boot, seed=seed, tune=tune)
        per_set.append(
            {"name": s.name, "group": s.group, "n_ood": s.n, "split": part["split"], "results": part["results"]}
        )
    report["sets"] = per_set
    report["groups"] = [
        {"name": g, "sets": [s.name for s in members], "results": mean_rows([p for p in per_set if p["group"] == g])}
        for g, members in scopes.groups(data).items()
    ]
    report["overall"] = {"sets": [p["name"] for p in per_set], "results": mean_rows(per_set)}
    return report


def evaluate_scope(data: BenchmarkData, scope: str, names: Iterable[str] | None = None, **kwargs) -> dict:
    """What a page shows for a scope: one set's report, or a group's / all sets' means with the sets beside them."""
    if len(data.ood_sets) <= 1 or (scope or "").startswith("set:"):
        return evaluate_run(scopes.select(data, scope), names, **kwargs)
    chosen = scopes.sets_of(data, scope)
    view = scopes.select(data, scope)
    report = evaluate_run(view, [], **kwargs)
    parts = []
    for s in chosen:
        part = evaluate_run(scopes.select(data, f"set:{s.name}"), names, **kwargs)
        parts.append({"name": s.name, "group": s.group, "n_ood": s.n, "results": part["results"]})
    report["results"] = mean_rows(parts)
    report["sets"] = parts
    report["results_scope"] = f"unweighted mean over {len(parts)} OOD sets ({', '.join(p['name'] for p in parts)})"
    return report


def row_key(row: dict) -> tuple:
    """What matches a row across sets: the method and whether it was tuned (a tuned row's setting may differ)."""
    return row["method"], bool(row.get("tuned_on"))


def mean_rows(per_set: list[dict]) -> list[dict]:
    """Unweighted means of the sets' metrics, row by row (method, tuned or not); a row some set lacks (a set too
    small to tune on) is left out of the mean rather than averaged over fewer sets."""
    if not per_set:
        return []
    out = []
    keyed = [{row_key(r): r for r in p["results"]} for p in per_set]
    for key in [row_key(r) for r in per_set[0]["results"]]:
        if not all(key in k for k in keyed):
            continue
        rows = [k[key] for k in keyed]
        first = rows[0]
        params = [r["params"] for r in rows]
        row = {
            "method": first["method"],
            "params": first["params"] if all(p == params[0] for p in params) else {},
            **{k: float(np.mean([r[k] for r in rows])) for k in METRIC_NAMES},
            "ci": {},
            "n_ood_scored": int(sum(r["n_ood_scored"] for r in rows)),
            "tuned_on": first["tuned_on"],
            "note": first["note"] if len(rows) == 1 else f"mean over {len(rows)} sets; " + first["note"],
            "n_sets": len(rows),
        }
        if row["params"] == {} and params[0]:
            row["params_per_set"] = {p["name"]: r["params"] for p, r in zip(per_set, rows)}
        for extra in ("label", "trained_on_ood"):
            if extra in first:
                row[extra] = first[extra]
        out.append(row)
    return out


def format_sets_table(report: dict) -> str:
    """AUROC and FPR@95 (OOD+) per set, per group mean and overall mean, one line per method row."""
    sets, groups = report["sets"], report.get("groups", [])
    cols = [(s["name"], s["results"]) for s in sets]
    cols += [(f"{g['name']} mean", g["results"]) for g in groups]
    cols.append(("overall mean", report["overall"]["results"]))
    lines = [
        f"{'method':<34}" + "".join(f"{name[:20]:>21}" for name, _ in cols),
        f"{'':<34}" + "".join(f"{'AUROC / FPR95':>21}" for _ in cols),
    ]
    keyed = [(name, {row_key(r): r for r in rows}) for name, rows in cols]
    for row in sets[0]["results"]:
        label = row["method"] + (" *" if row["tuned_on"] else "")
        cells = []
        for _, by_key in keyed:
            r = by_key.get(row_key(row))
            cells.append("—" if r is None else f"{100 * r['auroc']:.1f} / {100 * r['fpr95']:.1f}")
        lines.append(f"{label:<34}" + "".join(f"{c:>21}" for c in cells))
    lines.append(
        "group and overall columns: unweighted means of the sets' metrics (as OpenOOD reports); "
        "— = a set too small to tune on (no mean then)"
    )
    return "\n".join(lines)
