"""Curves: ROC and precision-recall for any set of (architecture, method) pairs, and score histograms."""

import altair as alt
import pandas as pd
import streamlit as st

from oodcore import detectors as M
from oodcore.evaluation import analysis
from oodcore.evaluation.metrics import METRIC_LABELS, pr_points, roc_points
from oodcore.explorer import loaders, shell, widgets

sel = shell.page_setup(
    "Curves",
    "ROC and precision-recall curves (OOD = positive) for any (architecture, method) pairs, every method at its "
    "default setting; below, one pair's ID and OOD score distributions with the 95%-TPR threshold.",
)

pairs = {}
for run in sel.runs:
    data = sel.data(run)
    for method in M.available_methods(data):
        pairs[f"{run['arch']} · {method.label}"] = (run, method)
mine = [label for label, (run, _) in pairs.items() if run["arch"] == sel.arch]


def default_pairs() -> list[str]:
    """The MSP baseline plus the three best methods (AUROC) of the selected architecture."""
    if len(mine) <= 4:
        return mine
    auroc = {}
    for label in mine:
        try:
            auroc[label] = loaders.cached_metrics(sel, pairs[label][1].name, None, run=pairs[label][0])["metrics"][
                "auroc"
            ]
        except M.MethodUnavailable:
            pass
    best = sorted(auroc, key=auroc.get, reverse=True)
    baseline = [label for label in mine if pairs[label][1].name == "msp"]
    return baseline + [label for label in best if label not in baseline][: 4 - len(baseline)]


with st.spinner("Ranking the methods…"):
    defaults = default_pairs()
chosen = st.multiselect(
    "Curves to overlay",
    list(pairs),
    default=defaults,
    key="curves.pairs",
    help="Every cached architecture of this benchmark x every method it supports.",
)
if not chosen:
    st.info("Pick at least one (architecture, method) pair above to draw its curves.")
    st.stop()

roc_frames, pr_frames, summary, notes = [], [], [], []
positive_id = st.toggle("PR curve with ID as the positive class (AUPR-In)", value=False, key="curves.pr_in")
skipped = []
for label in chosen:
    run, method = pairs[label]
    try:
        result = loaders.cached_metrics(sel, method.name, None, run=run)
    except M.MethodUnavailable as exc:
        skipped.append(f"{label}: {exc}")
        continue
    s_id, s_ood = result["scores_id"], result["scores_ood"]
    if result["note"]:
        notes.append(f"{label}: trained with OOD data, {result['note']}")
    roc = roc_points(s_id, s_ood, max_points=400)
    roc_frames.append(pd.DataFrame({"curve": label, "fpr": roc["fpr"], "tpr": roc["tpr"]}))
    pr = pr_points(s_id, s_ood, max_points=400, positive="id" if positive_id else "ood")
    pr_frames.append(pd.DataFrame({"curve": label, "recall": pr["recall"], "precision": pr["precision"]}))
    m = result["metrics"]
    summary.append(
        {
            "curve": label,
            "AUROC": 100 * m["auroc"],
            "AUPR-Out": 100 * m["aupr_out"],
            "AUPR-In": 100 * m["aupr_in"],
            METRIC_LABELS["fpr95"]: 100 * m["fpr95"],
            METRIC_LABELS["fpr95_in"]: 100 * m["fpr95_in"],
        }
    )

for line in skipped:
    st.warning(f"Not drawn: {line}")
if not summary:
    st.stop()
chosen = [row["curve"] for row in summary]
color = alt.Color(
    "curve:N",
    title=None,
    sort=chosen,
    scale=alt.Scale(scheme="tableau20" if len(chosen) > 10 else "tableau10"),
    legend=alt.Legend(orient="bottom", columns=2, labelLimit=320),
)
roc_df = pd.concat(roc_frames, ignore_index=True)
pr_df = pd.concat(pr_frames, ignore_index=True)
chance = (
    alt.Chart(pd.DataFrame({"x": [0, 1], "y": [0, 1]}))
    .mark_line(color="#999", strokeDash=[4, 4])
    .encode(x="x:Q", y="y:Q")
)
tpr95 = alt.Chart(pd.DataFrame({"y": [0.95]})).mark_rule(color="#999", strokeDash=[2, 2]).encode(y="y:Q")
roc_chart = (
    alt.Chart(roc_df)
    .mark_line(strokeWidth=2)
    .encode(
        x=alt.X(
            "fpr:Q",
            title="False-positive rate (ID flagged as OOD)",
            scale=alt.Scale(domain=[0, 1]),
            axis=alt.Axis(format="%"),
        ),
        y=alt.Y(
            "tpr:Q", title="True-positive rate (OOD caught)", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")
        ),
        color=color,
        order="tpr:Q",
        tooltip=["curve", alt.Tooltip("fpr:Q", format=".1%"), alt.Tooltip("tpr:Q", format=".1%")],
    )
)
pos = "ID" if positive_id else "OOD"
pr_chart = (
    alt.Chart(pr_df)
    .mark_line(strokeWidth=2)
    .encode(
        x=alt.X("recall:Q", title=f"Recall ({pos} found)", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        y=alt.Y(
            "precision:Q",
            title=f"Precision ({pos} positive)",
            scale=alt.Scale(domain=[0, 1]),
            axis=alt.Axis(format="%"),
        ),
        color=color,
        order="recall:Q",
        tooltip=["curve", alt.Tooltip("recall:Q", format=".1%"), alt.Tooltip("precision:Q", format=".1%")],
    )
)
left, right = st.columns(2)
left.altair_chart(alt.layer(chance, tpr95, roc_chart).properties(title="ROC (OOD = positive)", height=380))
right.altair_chart(pr_chart.properties(title=f"Precision-recall ({pos} = positive)", height=380))
st.caption(
    "Curves are exact and downsampled to at most 400 points along their length; the dotted line marks 95% TPR."
    + "".join(f"  \n{n}" for n in notes)
)
st.dataframe(
    pd.DataFrame(summary),
    hide_index=True,
    column_config={k: st.column_config.NumberColumn(format="%.2f") for k in summary[0] if k != "curve"},
)


@st.fragment
def distributions() -> None:
    st.subheader("Score distributions")
    label = st.selectbox("Pair", chosen, key="curves.hist_pair")
    run, method = pairs[label]
    try:
        result = loaders.cached_metrics(sel, method.name, None, run=run)
    except M.MethodUnavailable as exc:
        st.warning(str(exc))
        return
    frame = analysis.histogram_frame(result["scores_id"], result["scores_ood"])
    st.altair_chart(
        widgets.histogram_chart(
            frame, result["threshold"], title=label, x_title=f"{method.label} score (higher = more OOD)", height=300
        )
    )
    m = result["metrics"]
    st.caption(
        f"At the dashed threshold ({result['threshold']:.4g}) 95% of OOD images score at or above it and "
        f"{analysis.fmt_pct(m['fpr95'])} of ID images do too (FPR@95, OOD+)."
    )


distributions()
