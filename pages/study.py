"""Study: every cached architecture of the benchmark side by side (accuracy vs AUROC, architecture x method AUROC)."""

import streamlit as st

from oodcore.evaluation import analysis, study
from oodcore.explorer import shell
from oodcore.explorer import study as views

sel = shell.page_setup(
    "Study",
    "Every cached architecture of this benchmark side by side: does a more accurate classifier detect OOD "
    "images better, and which detector wins on which architecture? Default settings only (no OOD tuning).",
)
N_BOOT = 200
reports = views.all_reports(sel, N_BOOT)
frame = analysis.report_frame(reports)
if frame.empty:
    st.info("No method could score this benchmark's cached runs.")
    st.stop()
methods = list(dict.fromkeys(study.default_rows(frame)["method"]))
st.subheader("ID accuracy vs AUROC")
label = st.selectbox("Method", methods, key="study.method", help="Every untuned method the cached runs support.")
points = study.accuracy_vs_auroc(frame, label)
st.altair_chart(views.accuracy_auroc_chart(points, label), width="stretch")
rho = study.accuracy_auroc_correlation(points)
st.caption(
    f"{len(points)} architecture(s); whiskers: 95% bootstrap CIs of the AUROC ({N_BOOT} replicates). "
    + (f"Spearman rank correlation of top-1 and AUROC: {rho:+.2f}." if rho is not None else "")
)
st.dataframe(points, hide_index=True)
st.subheader("AUROC by architecture and method")
st.altair_chart(views.auroc_heatmap(study.auroc_matrix(frame), methods), width="stretch")
