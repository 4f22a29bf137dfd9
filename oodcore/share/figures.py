"""The static report's figures as Vega-Lite specs (plain dicts: the grammar Altair writes), rendered offline.

The specs are built here as data (the engine never imports Altair or Streamlit) and turned into
PNG and SVG with vl-convert-python, which bundles Vega and its fonts: no browser, no network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
ID_COLOR, OOD_COLOR = "#3574C4", "#E4572E"
METRIC_TITLES = {
    "auroc": "AUROC (%) ↑",
    "aupr_out": "AUPR-Out (%) ↑",
    "aupr_in": "AUPR-In (%) ↑",
    "fpr95": "FPR@95 (OOD+) (%) ↓",
    "fpr95_in": "FPR@95 (ID+) (%) ↓",
}


def _records(frame) -> list[dict]:
    """JSON-safe rows (NaN -> None) for a spec's inline data."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    return out


def _scheme(n: int) -> str:
    return "tableau20" if n > 10 else "tableau10"


def metric_bars(frame, metric: str) -> dict:
    """One metric per architecture for each method: grouped bars with 95% CI whiskers (the study's Figures 2-4)."""
    part = frame[["architecture", "method", metric, f"{metric}_lo", f"{metric}_hi"]].rename(
        columns={metric: "value", f"{metric}_lo": "lo", f"{metric}_hi": "hi"}
    )
    methods = list(dict.fromkeys(part["method"]))
    n_arch = part["architecture"].nunique()
    x = {"field": "architecture", "type": "nominal", "title": None, "sort": list(dict.fromkeys(part["architecture"]))}
    offset = {"field": "method", "type": "nominal", "sort": methods}
    return {
        "$schema": SCHEMA,
        "title": f"{METRIC_TITLES[metric]} per architecture for each method (whiskers: 95% bootstrap CI)",
        "data": {"values": _records(part)},
        "width": max(320, n_arch * (len(methods) * 9 + 16)),
        "height": 260,
        "encoding": {"x": x, "xOffset": offset},
        "layer": [
            {
                "mark": {"type": "bar"},
                "encoding": {
                    "y": {"field": "value", "type": "quantitative", "title": "%", "scale": {"domain": [0, 100]}},
                    "color": {
                        "field": "method",
                        "type": "nominal",
                        "sort": methods,
                        "scale": {"scheme": _scheme(len(methods))},
                        "title": "Method",
                    },
                },
            },
            {
                "mark": {"type": "rule", "color": "#222"},
                "encoding": {"y": {"field": "lo", "type": "quantitative"}, "y2": {"field": "hi"}},
            },
        ],
        "config": {"axisX": {"labelAngle": 0 if n_arch < 5 else -30}},
    }


def odin_heatmap(grid, arch: str) -> dict:
    """ODIN's AUROC over the cached T x ε grid of one architecture (the study's Figures 5-7)."""
    table = grid.assign(auroc_pct=100 * grid["auroc"], T_label=grid["T"].map("{:g}".format))
    table = table.assign(eps_label=table["eps"].map("{:g}".format))
    t_order = [f"{t:g}" for t in sorted(grid["T"].unique(), reverse=True)]
    e_order = [f"{e:g}" for e in sorted(grid["eps"].unique())]
    mid = float(table["auroc_pct"].median())
    enc = {
        "x": {"field": "eps_label", "type": "ordinal", "sort": e_order, "title": "ε (pixel units)"},
        "y": {"field": "T_label", "type": "ordinal", "sort": t_order, "title": "T"},
    }
    return {
        "$schema": SCHEMA,
        "title": f"ODIN AUROC (%) over T × ε · {arch} · all OOD images",
        "data": {"values": _records(table[["T", "eps", "T_label", "eps_label", "auroc_pct"]])},
        "width": max(220, 48 * len(e_order)),
        "height": max(120, 36 * len(t_order)),
        "encoding": enc,
        "layer": [
            {
                "mark": "rect",
                "encoding": {
                    "color": {
                        "field": "auroc_pct",
                        "type": "quantitative",
                        "scale": {"scheme": "viridis"},
                        "title": "AUROC %",
                    }
                },
            },
            {
                "mark": {"type": "text", "fontSize": 11},
                "encoding": {
                    "text": {"field": "auroc_pct", "type": "quantitative", "format": ".1f"},
                    "color": {"condition": {"test": f"datum.auroc_pct > {mid}", "value": "black"}, "value": "white"},
                },
            },
        ],
    }


def top1_vs_auroc(frame) -> dict:
    """ID top-1 accuracy against AUROC across architectures, one colour per method."""
    part = frame[["architecture", "method", "ID top-1 (%)", "auroc"]].rename(columns={"ID top-1 (%)": "top1"})
    methods = list(dict.fromkeys(part["method"]))
    color = {"field": "method", "type": "nominal", "sort": methods, "scale": {"scheme": _scheme(len(methods))}}
    enc = {
        "x": {"field": "top1", "type": "quantitative", "title": "ID top-1 accuracy (%)", "scale": {"zero": False}},
        "y": {"field": "auroc", "type": "quantitative", "title": "AUROC (%)", "scale": {"zero": False}},
        "color": {**color, "title": "Method"},
        "tooltip": [{"field": "architecture"}, {"field": "method"}, {"field": "top1"}, {"field": "auroc"}],
    }
    return {
        "$schema": SCHEMA,
        "title": "ID top-1 accuracy vs AUROC across architectures",
        "data": {"values": _records(part)},
        "width": 420,
        "height": 320,
        "encoding": enc,
        "layer": [
            {"mark": {"type": "line", "opacity": 0.35}, "encoding": {"order": {"field": "top1"}}},
            {"mark": {"type": "point", "filled": True, "size": 60}},
        ],
    }


def roc_overlay(curves, arch: str) -> dict:
    """ROC curves (OOD positive) of several methods on one architecture, with the chance line and 95% TPR."""
    labels = list(dict.fromkeys(curves["curve"]))
    return {
        "$schema": SCHEMA,
        "title": f"ROC (OOD = positive) · {arch}",
        "width": 360,
        "height": 320,
        "layer": [
            {
                "data": {"values": [{"x": 0, "y": 0}, {"x": 1, "y": 1}]},
                "mark": {"type": "line", "color": "#999", "strokeDash": [4, 4]},
                "encoding": {"x": {"field": "x", "type": "quantitative"}, "y": {"field": "y", "type": "quantitative"}},
            },
            {
                "data": {"values": _records(curves)},
                "mark": {"type": "line", "strokeWidth": 2},
                "encoding": {
                    "x": {
                        "field": "fpr",
                        "type": "quantitative",
                        "title": "False-positive rate (ID flagged as OOD)",
                        "scale": {"domain": [0, 1]},
                    },
                    "y": {
                        "field": "tpr",
                        "type": "quantitative",
                        "title": "True-positive rate (OOD caught)",
                        "scale": {"domain": [0, 1]},
                    },
                    "color": {
                        "field": "curve",
                        "type": "nominal",
                        "sort": labels,
                        "scale": {"scheme": _scheme(len(labels))},
                        "title": None,
                        "legend": {"orient": "bottom", "columns": 2, "labelLimit": 320},
                    },
                    "order": {"field": "tpr"},
                },
            },
        ],
    }


def render(spec: dict, folder: Path, stem: str, frame) -> dict:
    """Write <stem>.png (2x), <stem>.svg and the figure's data as <stem>.csv; returns the file names."""
    import vl_convert as vlc

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.svg").write_text(vlc.vegalite_to_svg(spec))
    (folder / f"{stem}.png").write_bytes(vlc.vegalite_to_png(spec, scale=2))
    frame.to_csv(folder / f"{stem}.csv", index=False)
    return {"png": f"{stem}.png", "svg": f"{stem}.svg", "csv": f"{stem}.csv"}
