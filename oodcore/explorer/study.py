"""The study view's Streamlit parts: every architecture's report, the accuracy-vs-AUROC chart, the
architecture x method heatmap, and the 'fools every architecture' gallery (pure parts: oodcore.evaluation.study)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from oodcore import detectors as M
from oodcore.evaluation import analysis, study
from oodcore.explorer import loaders, widgets
from oodcore.explorer.loaders import Selection


def all_reports(sel: Selection, n_boot: int) -> list[dict]:
    """Each architecture's memoised report (progress shown); a run that cannot be scored is a warning."""
    reports = []
    progress = st.empty()
    for i, run in enumerate(sel.runs):
        progress.progress(i / len(sel.runs), text=f"Scoring {run['arch']} ({i + 1}/{len(sel.runs)})…")
        try:
            reports.append(loaders.cached_report(sel, run, n_boot))
        except Exception as exc:  # a damaged or half-written run: say which, keep the others
            st.warning(f"Could not score {run['arch']}: {type(exc).__name__}")
    progress.empty()
    return reports


def accuracy_auroc_chart(points, method_label: str):
    """ID top-1 (x) vs AUROC (y) per architecture, CI whiskers, labelled points."""
    import altair as alt

    base = alt.Chart(points).encode(
        x=alt.X("ID top-1 (%):Q", scale=alt.Scale(zero=False, padding=20), title="ID top-1 accuracy (%)"),
    )
    whiskers = base.mark_rule(color="#888").encode(y=alt.Y("auroc_lo:Q"), y2="auroc_hi:Q")
    dots = base.mark_circle(size=90, color="#1f77b4").encode(
        y=alt.Y("auroc:Q", scale=alt.Scale(zero=False, padding=20), title=f"{method_label} AUROC (%)"),
        tooltip=[
            "architecture",
            alt.Tooltip("ID top-1 (%):Q", format=".1f"),
            alt.Tooltip("auroc:Q", format=".2f", title="AUROC (%)"),
            alt.Tooltip("auroc_lo:Q", format=".1f", title="CI low"),
            alt.Tooltip("auroc_hi:Q", format=".1f", title="CI high"),
        ],
    )
    labels = base.mark_text(align="left", dx=7, dy=-7, fontSize=11).encode(y="auroc:Q", text="architecture:N")
    return alt.layer(whiskers, dots, labels).properties(height=320)


def auroc_heatmap(matrix, method_order: list[str]):
    """Architecture (rows) x method (columns) AUROC (%) as a heatmap with the values written in."""
    import altair as alt

    n_arch = matrix["architecture"].nunique()
    base = alt.Chart(matrix).encode(
        x=alt.X("method:N", sort=method_order, title=None, axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("architecture:N", title=None),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("auroc:Q", title="AUROC (%)", scale=alt.Scale(scheme="viridis")),
        tooltip=["architecture", "method", alt.Tooltip("auroc:Q", format=".2f", title="AUROC (%)")],
    )
    text = base.mark_text(fontSize=10).encode(
        text=alt.Text("auroc:Q", format=".1f"),
        color=alt.condition(alt.datum.auroc > float(matrix["auroc"].median()), alt.value("black"), alt.value("white")),
    )
    return alt.layer(cells, text).properties(height=max(80, 34 * n_arch))


def fools_every_architecture(sel: Selection, method: M.Method, params: dict, point: str, n_show: int) -> None:
    """The OOD images every cached architecture of the benchmark passes as ID, with thumbnails and predicted classes."""
    if len(sel.runs) < 2:
        st.info("Only one architecture is cached for this benchmark: run another to see what fools them all.")
        return
    per_arch, cannot = [], []
    for run in sel.runs:
        data = sel.data(run)
        try:
            method_here = M.get_for(data, method.name)
            result = loaders.cached_metrics(sel, method_here.name, params, run=run)
        except (M.MethodUnavailable, ValueError, KeyError) as exc:
            cannot.append(f"{run['arch']}: {exc}")
            continue
        s_id, s_ood, rows = result["scores_id"], result["scores_ood"], result["ood_rows"]
        names = np.asarray(data.class_names, dtype=object)
        per_arch.append(
            {
                "arch": run["arch"],
                "paths": data.ood.paths[rows],
                "passed": analysis.passes_as_id(s_ood, s_id, s_ood, point),
                "preds": list(names[data.ood.preds[rows]]),
                "scores": s_ood,
            }
        )
    if cannot:
        st.warning(f"{method.label} cannot score every architecture: " + "; ".join(cannot))
        return
    frame, n_scored = study.fools_every_architecture(per_arch)
    st.caption(
        f"OOD images that all {len(per_arch)} architectures ({', '.join(r['arch'] for r in per_arch)}) pass as ID "
        f"with {method.label} at this operating point: {len(frame):,} of the {n_scored:,} OOD images every "
        "architecture scored. Caption: each architecture's predicted class; sorted by the mean rank of the scores "
        "(most ID-like first)."
    )
    if frame.empty:
        st.info("No OOD image fools every architecture at this operating point.")
        return
    shown = frame.head(n_show)
    data = sel.data()
    row_of = {p: i for i, p in enumerate(data.ood.paths.tolist())}
    thumbs = None
    try:
        thumbs = loaders.load_thumbs(sel.root, sel.run, "ood")
    except (KeyError, OSError, ValueError):
        st.info("This run has no cached thumbnails.")
    pred_cols = [c for c in frame.columns if c.endswith(": predicted")]
    if thumbs is not None:
        records = shown.to_dict("records")
        for start in range(0, len(records), widgets.GALLERY_COLUMNS):
            cols = st.columns(widgets.GALLERY_COLUMNS)
            for col, rec in zip(cols, records[start : start + widgets.GALLERY_COLUMNS]):
                caption = " · ".join(str(rec[c]) for c in pred_cols)
                row = row_of[rec["path"]]
                if data.ood_base is not None:  # a view on some OOD sets: thumbnails are the whole run's
                    row = int(data.ood_base[row])
                col.image(widgets.thumbnail(thumbs[0], thumbs[1], row), caption=caption, width="stretch")
    with st.expander("As a table"):
        st.dataframe(frame, hide_index=True)
