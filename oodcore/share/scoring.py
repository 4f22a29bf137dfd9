"""A benchmark run's report as the leaderboard shows it: every available method, one at a time."""

from __future__ import annotations

from typing import Callable

from oodcore import detectors as M
from oodcore.evaluation.report import evaluate_run
from oodcore.store.rundata import BenchmarkData

Progress = Callable[[str, float], None]


def run_report(data: BenchmarkData, n_boot: int) -> dict:
    """evaluate_run one method at a time, so a method the cache cannot serve is listed instead of failing the run."""
    report, rows, unavailable = None, [], []
    for method in M.available_methods(data):
        try:
            part = evaluate_run(data, [method.name], n_boot=n_boot)
        except M.MethodUnavailable as exc:
            unavailable.append({"method": method.name, "label": method.label, "why": str(exc)})
            continue
        for row in part["results"]:
            row["label"], row["trained_on_ood"] = method.label, bool(method.trained_on_ood)
        rows += part["results"]
        report = report or part
    report = report or evaluate_run(data, [], n_boot=n_boot)
    report["results"], report["unavailable"] = rows, unavailable
    return report
