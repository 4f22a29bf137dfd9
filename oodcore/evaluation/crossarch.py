"""A study across architectures: one table of architecture x method per metric, from each run's report."""

from __future__ import annotations

from oodcore.evaluation.metrics import METRIC_NAMES

STUDY_METRICS = ("auroc", "aupr_out", "fpr95")
_LABELS = {
    "auroc": "AUROC",
    "aupr_out": "AUPR-Out",
    "aupr_in": "AUPR-In",
    "fpr95": "FPR95(OOD+)",
    "fpr95_in": "FPR95(ID+)",
}


def row_label(row: dict) -> str:
    """`method(params)`, with ` *` when the setting was tuned on OOD data."""
    params = row.get("params") or {}
    text = row["method"] + ("(" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")" if params else "")
    return text + (" *" if row.get("tuned_on") else "")


def study_rows(reports: list[dict]) -> list[dict]:
    """Long form: one dict per (architecture, method row) with every metric as a fraction."""
    out = []
    for report in reports:
        for row in report["results"]:
            key = row["method"] + (" *" if row.get("tuned_on") else "")
            out.append(
                {
                    "arch": report["arch"],
                    "method": key,
                    "setting": row_label(row),
                    "n_id": report["n_id"],
                    "n_ood": row.get("n_ood_scored", report["n_ood"]),
                    **{k: row[k] for k in METRIC_NAMES},
                }
            )
    return out


def study_table(reports: list[dict], metric: str = "auroc") -> dict:
    """{"archs": [...], "methods": [...], "values": {method: {arch: value}}} for one metric (fractions).

    A tuned row is its own method (`odin *`), so tuned and untuned numbers never mix.
    """
    archs = [r["arch"] for r in reports]
    values: dict[str, dict[str, float]] = {}
    for row in study_rows(reports):
        values.setdefault(row["method"], {})[row["arch"]] = row[metric]
    return {"metric": metric, "archs": archs, "methods": list(values), "values": values}


def format_study(reports: list[dict], metrics: tuple[str, ...] = STUDY_METRICS) -> str:
    """One block per metric: methods down, architectures across, in percent; best per column marked `<`."""
    if not reports:
        return "no architecture was scored"
    first = reports[0]
    lines = [
        f"{first['benchmark']} · protocol {first['protocol']} · {len(reports)} architectures · "
        + " · ".join(
            f"{r['arch']}: {r['n_id']} ID / {r['n_ood']} OOD, top-1 {100 * r['id_top1']:.1f}%" for r in reports
        )
    ]
    width = max(12, *(len(r["arch"]) + 2 for r in reports))
    for metric in metrics:
        table = study_table(reports, metric)
        lower = metric.startswith("fpr")
        best = {}
        for arch in table["archs"]:
            column = [v[arch] for v in table["values"].values() if arch in v]
            best[arch] = (min if lower else max)(column) if column else None
        lines.append("")
        lines.append(f"{_LABELS[metric]} (%, {'lower' if lower else 'higher'} is better)")
        lines.append(f"{'method':<18}" + "".join(f"{a:>{width}}" for a in table["archs"]))
        for method in table["methods"]:
            cells = []
            for arch in table["archs"]:
                v = table["values"][method].get(arch)
                text = "—" if v is None else f"{100 * v:.1f}" + ("<" if v == best[arch] else " ")
                cells.append(f"{text:>{width}}")
            lines.append(f"{method:<18}" + "".join(cells))
    lines.append("")
    lines.append(
        "* tuned on the OOD exposure split, scored on the held-out split; `<` best in its column. "
        "OOD is the positive class; FPR95(OOD+) = ID false-positive rate at 95% OOD recall."
    )
    return "\n".join(lines)
