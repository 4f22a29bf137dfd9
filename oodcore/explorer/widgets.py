"""Widgets and charts shared by the pages: parameter sliders from a method's spec, metric cards, histograms."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st

from oodcore import detectors as M
from oodcore.detectors.numerics import slider_step
from oodcore.evaluation.analysis import SETS, fmt_num, fmt_pct, nearest, param_options
from oodcore.evaluation.metrics import (
    LOWER_IS_BETTER,
    METRIC_DESCRIPTIONS,
    METRIC_LABELS,
    METRIC_NAMES,
)
from oodcore.explorer.settings import ID_COLOR, OOD_COLOR
from oodcore.explorer.shell import drop_stale
from oodcore.store.rundata import BenchmarkData

GALLERY_COLUMNS = 8  # thumbnails per gallery row


def param_controls(method: M.Method, data: BenchmarkData, key_prefix: str, container=None) -> dict[str, float]:
    """One slider per parameter, built from the method's Param spec (new methods need no page edit)."""
    box = container if container is not None else st
    params: dict[str, float] = {}
    missing = M.missing_needs(method, data) if method.params else set()
    if missing and method.has_stored_defaults(data):
        # a shared bundle stores this method's default-setting scores only: show its sliders, disabled, and why
        why = (
            f"{method.label} needs {', '.join(sorted(missing))} to score other settings, which this bundle "
            "does not hold; it shows its default setting (share with `--with-features` to keep it live)."
        )
        for p in method.params:
            box.slider(
                p.label,
                float(min(p.low, p.default)),
                float(max(p.high, p.default)),
                float(p.default),
                key=f"{key_prefix}.{method.name}.{p.name}.fixed",
                disabled=True,
                help=why,
            )
        box.caption(why)
        return method.defaults()
    for p in method.params:
        key = f"{key_prefix}.{method.name}.{p.name}"
        options = param_options(method, p, data)
        if options is not None:
            if len(options) == 1:
                params[p.name] = options[0]
                why = " (other values need the precomputed ODIN grid: rerun with `--odin-grid`)" if p.grid else ""
                box.caption(f"{p.label} = {fmt_num(options[0])}{why}")
                continue
            drop_stale(key, options)
            default = p.default if p.default in options else nearest(options, p.default)
            params[p.name] = float(
                box.select_slider(
                    f"{p.label}" + (" (log scale)" if p.scale == "log" else ""),
                    options=options,
                    value=default,
                    key=key,
                    format_func=fmt_num,
                    help=p.help or None,
                )
            )
        else:
            step = slider_step(p)  # counts, percentiles, dimensions: whole numbers
            params[p.name] = float(
                box.slider(
                    p.label, float(p.low), float(p.high), float(p.default), step=step, key=key, help=p.help or None
                )
            )
    return params


def metric_row(
    metrics: dict,
    baseline: dict | None = None,
    baseline_name: str = "",
    ci: dict | None = None,
    names: Sequence[str] = METRIC_NAMES,
) -> None:
    """The metrics as st.metric cards (percent), optionally with the change against a baseline."""
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


def histogram_chart(
    frame,
    threshold: float | None = None,
    title: str = "",
    x_title: str = "score (higher = more OOD)",
    height: int = 260,
):
    """Overlaid ID/OOD score histograms (fraction of each set), the 95%-TPR threshold as a rule."""
    import altair as alt
    import pandas as pd

    base = (
        alt.Chart(frame)
        .mark_rect(opacity=0.55)
        .encode(
            x=alt.X("start:Q", title=x_title, axis=alt.Axis(format="~g"), scale=alt.Scale(zero=False, nice=False)),
            x2="end:Q",
            y=alt.Y("fraction:Q", title="fraction of set", axis=alt.Axis(format="%")),
            y2=alt.datum(0),
            color=alt.Color("set:N", scale=set_color_scale(), title=None, legend=alt.Legend(orient="top")),
            tooltip=[
                alt.Tooltip("set:N"),
                alt.Tooltip("start:Q", format=".4g", title="from"),
                alt.Tooltip("end:Q", format=".4g", title="to"),
                alt.Tooltip("count:Q"),
                alt.Tooltip("fraction:Q", format=".1%"),
            ],
        )
    )
    layers = [base]
    if threshold is not None and np.isfinite(threshold):
        rule_df = pd.DataFrame({"x": [threshold], "label": ["95% TPR threshold"]})
        rule = (
            alt.Chart(rule_df)
            .mark_rule(color="#333", strokeDash=[5, 3], size=1.5)
            .encode(x="x:Q", tooltip=[alt.Tooltip("x:Q", format=".4g", title="threshold")])
        )
        text = (
            alt.Chart(rule_df)
            .mark_text(align="left", dx=4, dy=-4, baseline="top", color="#333", fontSize=11)
            .encode(x="x:Q", y=alt.value(0), text="label:N")
        )
        layers += [rule, text]
    chart = alt.layer(*layers).properties(height=height)
    return chart.properties(title=title) if title else chart


def thumbnail(data_bytes: np.ndarray, offsets: np.ndarray, index: int):
    from oodcore.store.thumbs import unpack_one

    return unpack_one(data_bytes, offsets, int(index))


def status_note(text: str) -> None:
    st.caption(text)
