"""Misfires: the OOD images a detector is surest are in-distribution, the ID images it flags, and why."""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from oodcore import detectors as M
from oodcore.evaluation import analysis
from oodcore.explorer import loaders, settings, shell, widgets
from oodcore.explorer import study as study_views

sel = shell.page_setup(
    "Misfires",
    "Where the detector fails: OOD images it scores as most in-distribution (lowest scores), ID images it "
    "flags as most OOD (highest scores), and the predicted classes that attract OOD images.",
)
data = sel.data()
available = M.available_methods(data)
if not available:
    st.info("No method can score this run.")
    st.stop()
names = list(data.class_names)
COLUMNS = 8
NINCO_BADGE = "NINCO: contains an ImageNet object"
ninco = analysis.ninco_decisions(data.ood.paths)  # per OOD row: NINCO's decision, '' where not annotated


def gallery(indices, split: str, captions: list[str], thumbs, badges: list[bool] | None = None) -> None:
    if thumbs is None:
        st.info("This run has no cached thumbnails.")
        return
    if split == "ood" and data.ood_base is not None:  # a view on some OOD sets: thumbnails are the whole run's
        indices = [int(data.ood_base[i]) for i in indices]
    badges = badges or [False] * len(indices)
    for start in range(0, len(indices), COLUMNS):
        cols = st.columns(COLUMNS)
        stop = start + COLUMNS
        for col, i, caption, badge in zip(cols, indices[start:stop], captions[start:stop], badges[start:stop]):
            col.image(widgets.thumbnail(thumbs[0], thumbs[1], i), caption=caption, width="stretch")
            if badge:
                col.badge(NINCO_BADGE, icon=":material/warning:", color="orange")


def safe_thumbs(split: str):
    try:
        return loaders.load_thumbs(sel.root, sel.run, split)
    except (KeyError, OSError, ValueError):
        return None


@st.fragment
def misfires() -> None:
    with st.container(border=True):
        c1, c2, c3 = st.columns([1, 2, 1.3])
        method = c1.selectbox(
            "Method",
            available,
            format_func=lambda m: m.label,
            key="mis.method",
            help="Every method this run supports; its parameters appear to the right.",
        )
        with c2:
            params = widgets.param_controls(method, data, "mis")
            if not method.params:
                st.caption(f"{method.label} has no parameters.")
        point = c3.radio(
            "Operating point",
            ["ood", "id"],
            key="mis.point",
            format_func=lambda p: "catch 95% of OOD (OOD+ TPR)" if p == "ood" else "keep 95% of ID (ID+ TPR)",
            help="The threshold that decides which images pass as ID.",
        )
    try:
        result = loaders.cached_metrics(sel, method.name, params)
    except M.MethodUnavailable as exc:
        st.warning(str(exc))
        return
    s_id, s_ood = result["scores_id"], result["scores_ood"]
    ood_rows = result["ood_rows"]  # the data.ood rows s_ood belongs to (held-out only for OOD-trained detectors)
    if result["note"]:
        st.caption(f"{method.label} was trained with OOD data: {result['note']}.")
    ood_pass = analysis.passes_as_id(s_ood, s_id, s_ood, point)
    id_flag = ~analysis.passes_as_id(s_id, s_id, s_ood, point)
    conf = loaders.cached_confidences(sel)
    m = st.columns(4)
    m[0].metric(
        "OOD passing as ID",
        f"{int(ood_pass.sum()):,} of {len(s_ood):,}",
        border=True,
        help="OOD images scored below the threshold: the detector accepts them as in-distribution.",
    )
    m[1].metric(
        "ID flagged as OOD",
        f"{int(id_flag.sum()):,} of {len(s_id):,}",
        border=True,
        help="ID images at or above the threshold: false alarms.",
    )
    m[2].metric("AUROC", analysis.fmt_pct(result["metrics"]["auroc"]), border=True)
    m[3].metric("ID top-1 accuracy", analysis.fmt_pct(data.id_top1(), 1), border=True)

    ood_preds, id_preds = data.ood.preds[ood_rows], data.id.preds
    conf_ood = conf["ood"][ood_rows]
    options = sorted(int(k) for k in set(np.unique(data.ood.preds)) | set(np.unique(id_preds)))
    f1, f2 = st.columns([3, 1])
    keep = f1.multiselect(
        "Only these predicted classes",
        options,
        format_func=lambda k: names[k],
        key="mis.classes",
        placeholder="all classes",
        help="Filter both galleries by the classifier's predicted class.",
    )
    n_show = f2.slider("Images per gallery", 8, 64, 24, step=8, key="mis.n")

    tab_ood, tab_id, tab_cls, tab_all = st.tabs(
        ["OOD that look in-distribution", "ID flagged as OOD", "Classes that attract OOD", "Fools every architecture"]
    )
    with tab_all:
        study_views.fools_every_architecture(sel, method, params, point, n_show)
    with tab_ood:
        order = np.argsort(s_ood, kind="stable")  # most ID-like first
        rank = np.empty(len(order), int)
        rank[order] = np.arange(1, len(order) + 1)
        shown = [i for i in order if not keep or ood_preds[i] in keep][:n_show]
        st.caption(
            f"Lowest {method.label} scores among the {len(s_ood):,} OOD images: the detector is surest these "
            "are in-distribution. Caption: predicted class (softmax confidence) · rank among OOD by score · score."
        )
        if not shown:
            st.info("No OOD image is predicted as the chosen class(es).")
        else:
            captions = [f"{names[ood_preds[i]]} ({conf_ood[i]:.0%}) · #{rank[i]} · {s_ood[i]:.3g}" for i in shown]
            contaminated = [ninco[int(ood_rows[i])] == "i" for i in shown]
            annotated = sum(bool(ninco[int(ood_rows[i])]) for i in shown)
            if annotated:
                st.markdown(
                    f"**{sum(contaminated)} of these top {len(shown)} misfires contain an ImageNet-1K object** "
                    f"according to NINCO's annotation of ImageNet-O ({annotated} of the {len(shown)} are annotated; "
                    "Bitterwolf et al. 2023): for those the detector is arguably right."
                )
            gallery([int(ood_rows[i]) for i in shown], "ood", captions, safe_thumbs("ood"), contaminated)
            with st.expander("As a table"):
                st.dataframe(
                    pd.DataFrame(
                        {
                            "rank": rank[shown],
                            "path": data.ood.paths[ood_rows[shown]],
                            "NINCO": [ninco[int(ood_rows[i])] for i in shown],
                            "predicted": [names[ood_preds[i]] for i in shown],
                            "confidence (%)": 100 * conf_ood[shown],
                            "score": s_ood[shown],
                            "passes as ID": ood_pass[shown],
                        }
                    ),
                    hide_index=True,
                    column_config={"confidence (%)": st.column_config.NumberColumn(format="%.1f")},
                )
    with tab_id:
        order = np.argsort(-s_id, kind="stable")  # most OOD-like first
        rank = np.empty(len(order), int)
        rank[order] = np.arange(1, len(order) + 1)
        shown = [i for i in order if not keep or id_preds[i] in keep][:n_show]
        st.caption(
            f"Highest {method.label} scores among the {len(s_id):,} ID images: false alarms. Caption: "
            "predicted class (confidence) · true class · rank among ID by score."
        )
        if not shown:
            st.info("No ID image is predicted as the chosen class(es).")
        else:
            captions = [
                f"{names[id_preds[i]]} ({conf['id'][i]:.0%}) · true: {names[data.id.labels[i]]} · #{rank[i]}"
                for i in shown
            ]
            gallery(shown, "id", captions, safe_thumbs("id"))
            with st.expander("As a table"):
                st.dataframe(
                    pd.DataFrame(
                        {
                            "rank": rank[shown],
                            "path": data.id.paths[shown],
                            "predicted": [names[id_preds[i]] for i in shown],
                            "true": [names[data.id.labels[i]] for i in shown],
                            "confidence (%)": 100 * conf["id"][shown],
                            "score": s_id[shown],
                            "flagged as OOD": id_flag[shown],
                        }
                    ),
                    hide_index=True,
                    column_config={"confidence (%)": st.column_config.NumberColumn(format="%.1f")},
                )
    with tab_cls:
        table = analysis.misfire_class_table(data, s_ood, ood_pass, ood_rows=ood_rows)
        if table.empty:
            st.info("No OOD image passes as ID at this operating point.")
            return
        st.caption(
            f"The {int(ood_pass.sum()):,} OOD images that pass as ID at this operating point, counted by "
            "predicted class: the classes an OOD image most easily hides in."
        )
        left, right = st.columns([3, 2])
        left.dataframe(
            table,
            hide_index=True,
            column_config={c: st.column_config.NumberColumn(format="%.1f") for c in table.columns if c.endswith("(%)")},
        )
        top = table.head(15)
        right.altair_chart(
            alt.Chart(top)
            .mark_bar(color=settings.OOD_COLOR)
            .encode(
                x=alt.X("OOD passing as ID:Q", title="OOD images passing as ID"),
                y=alt.Y("predicted class:N", sort="-x", title=None),
                tooltip=list(top.columns),
            )
            .properties(title="Top classes", height=max(120, 22 * len(top)))
        )


misfires()
