"""Leaderboard: every cached architecture x every available method, with 95% bootstrap CIs."""

import json

import numpy as np
import streamlit as st

from oodcore.evaluation import analysis
from oodcore.evaluation.metrics import (
    LOWER_IS_BETTER,
    METRIC_DESCRIPTIONS,
    METRIC_LABELS,
    METRIC_NAMES,
)
from oodcore.explorer import loaders, settings, shell
from oodcore.store import scopes

sel = shell.page_setup(
    "Leaderboard",
    "How well each architecture and detector separates ID from OOD images on this benchmark: "
    "every method at its default setting, plus settings tuned on the OOD exposure split.",
)

N_BOOT = 200
reports = []
progress = st.empty()
for i, run in enumerate(sel.runs):
    progress.progress(
        i / len(sel.runs), text=f"Scoring {run['arch']} ({i + 1}/{len(sel.runs)}) with {N_BOOT} bootstrap replicates…"
    )
    try:
        reports.append(loaders.cached_report(sel, run, N_BOOT))
    except Exception as exc:  # a damaged or half-written run: say which, keep the others
        st.warning(f"Could not score {run['arch']}: {type(exc).__name__}: {exc}")
progress.empty()
if not reports:
    st.info("No architecture of this benchmark could be scored.")
    st.stop()

unavailable = [f"{u['label']} on {r['arch']}: {u['why']}" for r in reports for u in r.get("unavailable", [])]
if unavailable:
    with st.expander(f"{len(unavailable)} method/architecture pair(s) could not be scored from this cache"):
        st.markdown("\n".join(f"- {line}" for line in unavailable))
smaller = [r["arch"] for r in reports if r.get("official_id_set") is False]
if smaller:
    st.warning(
        f"The evaluated ID set is smaller than the official one for {', '.join(smaller)}: with no fit folder and "
        "no ImageNet train/ beside the ID images, a share of the ID images was held out to fit the detectors "
        "and is never evaluated."
    )
rows = analysis.report_rows(reports)
if not rows:
    st.info("No method could score this benchmark's cached runs.")
    st.stop()
mine = [row for row in rows if row["architecture"] == sel.arch]
if mine:  # the headline cards first: they need no pandas or Altair, so they render while those load
    best = max(mine, key=lambda row: row["auroc"])
    low_fpr = min(mine, key=lambda row: row["fpr95"])
    report = next(r for r in reports if r["arch"] == sel.arch)
    c = st.columns(4)
    c[0].metric(
        f"Best AUROC · {sel.arch}", f"{best['auroc']:.2f}%", help=f"{best['method']} ({best['setting']})", border=True
    )
    c[0].caption(best["method"] + ("" if best["setting"] == "—" else f" · {best['setting']}"))
    c[1].metric("Lowest FPR@95 (OOD+)", f"{low_fpr['fpr95']:.2f}%", help=METRIC_DESCRIPTIONS["fpr95"], border=True)
    c[1].caption(low_fpr["method"] + ("" if low_fpr["setting"] == "—" else f" · {low_fpr['setting']}"))
    c[2].metric(
        "ID top-1 accuracy",
        analysis.fmt_pct(report["id_top1"], 1),
        border=True,
        help="Top-1 accuracy of the classifier on the ID images, over the protocol's classes.",
    )
    c[2].caption(f"{report['n_classes']} classes · protocol {report['protocol']}")
    c[3].metric("Images (ID / OOD)", f"{report['n_id']:,} / {report['n_ood']:,}", border=True)
    split = report.get("split")
    c[3].caption(f"tuned rows: exposure {split['n_exposure']} / held-out {split['n_heldout']} OOD" if split else "")

import altair as alt  # noqa: E402  (after the cards: the first paint does not wait for these imports)
import pandas as pd  # noqa: E402

frame = pd.DataFrame(rows)
scope_note = next((r.get("results_scope") for r in reports if r.get("results_scope")), None)
if sel.scope != "all" or scope_note:
    st.info(
        f"OOD set: **{scopes.scope_label(sel.scope)}**"
        + (f" — rows are the {scope_note}, without CIs (as OpenOOD reports group means)." if scope_note else ".")
    )
per_set = [
    {"architecture": r["arch"], "OOD set": p["name"], "group": p.get("group") or "", **analysis.set_row(row)}
    for r in reports
    for p in r.get("sets", [])
    for row in p["results"]
]

st.subheader("Table")
st.caption(
    settings.CONVENTIONS + " Metrics in percent; brackets hold 95% stratified-bootstrap CIs "
    f"({N_BOOT} replicates). Rows marked *(tuned)* chose their setting on the OOD exposure split and are "
    "scored on the held-out split only; every other row is scored on the full OOD set."
)

table = frame.copy()
for k in METRIC_NAMES:
    table[f"{k}_ci"] = [
        f"[{lo:.1f}, {hi:.1f}]" if np.isfinite(lo) else "" for lo, hi in zip(table[f"{k}_lo"], table[f"{k}_hi"])
    ]
order = ["architecture", "method", "setting"]
for k in METRIC_NAMES:
    order += [k, f"{k}_ci"]
order += ["tuned with OOD data", "protocol", "n_id", "n_ood", "ID top-1 (%)"]
config = {
    "architecture": st.column_config.TextColumn("Architecture"),
    "method": st.column_config.TextColumn("Method"),
    "setting": st.column_config.TextColumn("Setting", width="medium"),
    "tuned with OOD data": st.column_config.TextColumn("Tuned with OOD data?", width="medium"),
    "protocol": st.column_config.TextColumn("Protocol"),
    "n_id": st.column_config.NumberColumn("n ID", format="%d"),
    "n_ood": st.column_config.NumberColumn("n OOD scored", format="%d"),
    "ID top-1 (%)": st.column_config.NumberColumn("ID top-1 (%)", format="%.1f"),
}
for k in METRIC_NAMES:
    arrow = "↓" if k in LOWER_IS_BETTER else "↑"
    config[k] = st.column_config.NumberColumn(f"{METRIC_LABELS[k]} {arrow}", format="%.1f", help=METRIC_DESCRIPTIONS[k])
    config[f"{k}_ci"] = st.column_config.TextColumn("95% CI", help=f"bootstrap CI of {METRIC_LABELS[k]}", width="small")
st.dataframe(table, column_order=order, column_config=config, hide_index=True)

csv = frame.rename(columns={k: f"{k}_pct" for k in METRIC_NAMES}).to_csv(index=False).encode()
st.download_button(
    "Download CSV", csv, file_name=f"leaderboard-{sel.benchmark}.csv", mime="text/csv", icon=":material/download:"
)

if per_set:
    st.subheader("Per OOD set")
    st.caption("Each set scored on its own (metrics in percent); the table above averages them without weights.")
    st.dataframe(pd.DataFrame(per_set), hide_index=True)

st.subheader("By architecture")
st.caption("Bars: point estimates (%); whiskers: 95% bootstrap CIs. ↑ higher is better, ↓ lower is better.")
methods_order = list(dict.fromkeys(frame["method"]))
long = []
for k in METRIC_NAMES:
    part = frame[["architecture", "method", "setting", k, f"{k}_lo", f"{k}_hi"]].rename(
        columns={k: "value", f"{k}_lo": "lo", f"{k}_hi": "hi"}
    )
    part["metric"] = f"{METRIC_LABELS[k]} {'↓' if k in LOWER_IS_BETTER else '↑'}"
    long.append(part)
long = pd.concat(long, ignore_index=True)
metric_order = list(dict.fromkeys(long["metric"]))
n_arch = frame["architecture"].nunique()
panel = max(110, 14 * n_arch * len(methods_order) + 30)
per_row = 5 if panel <= 120 else 3 if panel <= 220 else 2 if panel <= 380 else 1
zoom = st.toggle(
    "Zoom the y-axes to the data",
    value=False,
    key="board.zoom",
    help="Off: every axis spans 0-100% (bars compare by length). On: axes start near the lowest CI.",
)


def domain_of(label: str) -> list[float]:
    if not zoom:
        return [0, 100]
    part = long[long["metric"] == label]
    low = np.nanmin(np.r_[part["lo"].to_numpy(), part["value"].to_numpy()])
    return [max(0.0, float(np.floor((low - 2) / 5) * 5)), 100]


archs = list(dict.fromkeys(frame["architecture"]))
slot = 1.0 / (len(methods_order) + 1)  # each architecture spans 1 unit: one slot per method plus a gap
long["x"] = [
    archs.index(a) + (methods_order.index(m) - (len(methods_order) - 1) / 2) * slot
    for a, m in zip(long["architecture"], long["method"])
]
bar_px = max(2.0, panel / len(archs) * slot * 0.85)
label_expr = "[" + ", ".join(json.dumps(a) for a in archs) + "][datum.value]"


def metric_panel(label: str) -> alt.LayerChart:
    # explicit x positions (not xOffset) so bars and their whiskers share exactly the same x
    base = alt.Chart(long[long["metric"] == label]).encode(
        x=alt.X(
            "x:Q",
            title=None,
            scale=alt.Scale(domain=[-0.5, len(archs) - 0.5], nice=False),
            axis=alt.Axis(
                values=list(range(len(archs))),
                labelExpr=label_expr,
                grid=False,
                ticks=False,
                labelAngle=0 if n_arch < 4 else -30,
            ),
        ),
    )
    bars = base.mark_bar(size=bar_px, clip=True).encode(
        y=alt.Y("value:Q", title="%", scale=alt.Scale(domain=domain_of(label))),
        color=alt.Color(
            "method:N",
            title="Method",
            sort=methods_order,
            scale=alt.Scale(scheme="tableau20" if len(methods_order) > 10 else "tableau10"),
        ),
        tooltip=[
            "architecture",
            "method",
            "setting",
            alt.Tooltip("value:Q", format=".1f", title="%"),
            alt.Tooltip("lo:Q", format=".1f", title="CI low"),
            alt.Tooltip("hi:Q", format=".1f", title="CI high"),
        ],
    )
    whiskers = base.mark_rule(color="#222", strokeWidth=1.5, clip=True).encode(y="lo:Q", y2="hi:Q")
    return alt.layer(bars, whiskers).properties(title=label, width=panel, height=220)


figure = alt.concat(*(metric_panel(label) for label in metric_order), columns=per_row)
st.altair_chart(figure, width="content")
