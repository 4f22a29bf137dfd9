"""ODIN tuner: temperature T and input perturbation ε, live from the cached grid; honest vs naive tuning."""

import altair as alt
import streamlit as st

from oodcore import detectors as M
from oodcore.evaluation import analysis
from oodcore.explorer import loaders, shell, widgets

sel = shell.page_setup(
    "ODIN tuner",
    "ODIN (Liang et al. 2018) scores −max softmax(f(x̃)/T), with x̃ the image nudged by ε towards its predicted "
    "class. Move T and ε to see the metrics and score distributions change; the URL keeps the setting, so a "
    "link shares it.",
)
data = sel.data()
grid = data.odin
odin = M.get("odin")
T_DEFAULT = odin.defaults()["T"]

if grid is None:
    st.info(
        "This run has no cached ODIN grid, so ε is fixed at 0 (ODIN at ε = 0 is computed from the cached logits, "
        "at any T). To explore ε > 0, compute the grid once with the network:\n\n"
        f"`python -m oodcore run --arch {sel.arch} --id-dir ... --ood-dir ... "
        + (f"--protocol {data.protocol} " if data.protocol in ("imagenet-o", "full", "id-classes") else "")
        + "--odin-grid`",
        icon=":material/info:",
    )


def odin_slider_state(key: str, options: list[float], default: float) -> None:
    """Keep a URL- or session-provided value valid for this run's options."""
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = analysis.nearest(options, st.session_state[key]) if options else default


@st.fragment
def tuner() -> None:
    temps = analysis.odin_temperature_options(data)
    eps_options = sorted({float(e) for e in grid.eps} | {0.0}) if grid is not None else [0.0]  # ε = 0: logits
    odin_slider_state("T", temps, T_DEFAULT)
    odin_slider_state("eps", eps_options, 0.0)
    left, right = st.columns(2)
    T = left.select_slider(
        "Temperature T (log scale)",
        options=temps,
        value=T_DEFAULT,
        key="T",
        bind="query-params",
        format_func=analysis.fmt_num,
        help="Softmax temperature. T = 1 with ε = 0 is the MSP baseline.",
    )
    if len(eps_options) > 1:
        eps = right.select_slider(
            "Perturbation ε (pixel units, [0, 1] scale)",
            options=eps_options,
            value=0.0,
            key="eps",
            bind="query-params",
            format_func=analysis.fmt_num,
            help="Input perturbation step; values are the cached grid's.",
        )
    else:
        eps = 0.0
        right.markdown("**Perturbation ε** = 0 (no cached grid)")
    if eps > 0 and grid is not None and grid.index(T, eps) is None:
        st.warning(
            f"ε > 0 is precomputed only at T ∈ {{{', '.join(analysis.fmt_num(t) for t in grid.temps)}}}. "
            f"Pick one of those temperatures, or set ε = 0 (any T works from the logits)."
        )
        result = None
    else:
        try:
            result = loaders.cached_metrics(sel, "odin", {"T": T, "eps": eps})
        except M.MethodUnavailable as exc:
            st.warning(str(exc))
            result = None
    baseline = loaders.cached_metrics(sel, "msp")
    if result is not None:
        st.markdown(
            f"**ODIN at T = {analysis.fmt_num(T)}, ε = {analysis.fmt_num(eps)}** · deltas against MSP (T = 1, ε = 0) · "
            f"all {len(data.id):,} ID and {len(data.ood):,} OOD images"
        )
        widgets.metric_row(result["metrics"], baseline=baseline["metrics"], baseline_name="MSP")
    hist_col, heat_col = st.columns([1, 1])
    with hist_col:
        if result is not None:
            frame = analysis.histogram_frame(result["scores_id"], result["scores_ood"])
            st.altair_chart(
                widgets.histogram_chart(
                    frame,
                    result["threshold"],
                    title="Score distributions",
                    height=320,
                    x_title=f"ODIN score = −max softmax(f(x̃)/{analysis.fmt_num(T)})  (higher = more OOD)",
                )
            )
            st.caption(
                "Dashed line: the threshold that catches 95% of OOD images; ID images right of it are "
                "the false positives counted by FPR@95 (OOD+)."
            )
    with heat_col:
        table = loaders.cached_odin_grid(sel).copy()
        table["t_label"] = table["T"].map(analysis.fmt_num)
        table["e_label"] = table["eps"].map(analysis.fmt_num)
        table["auroc_pct"] = 100 * table["auroc"]
        table["selected"] = (table["T"] == T) & (table["eps"] == eps)
        t_order = [analysis.fmt_num(t) for t in sorted(table["T"].unique(), reverse=True)]
        e_order = [analysis.fmt_num(e) for e in sorted(table["eps"].unique())]
        base = alt.Chart(table).encode(
            x=alt.X(
                "e_label:O",
                sort=e_order,
                title="ε",
                axis=alt.Axis(labelAngle=-45, labelOverlap=False, labelFontSize=10),
            ),
            y=alt.Y("t_label:O", sort=t_order, title="T"),
        )
        cells = base.mark_rect().encode(
            color=alt.Color("auroc_pct:Q", scale=alt.Scale(scheme="viridis"), legend=alt.Legend(title="AUROC %")),
            tooltip=[
                alt.Tooltip("T:Q", format="g"),
                alt.Tooltip("eps:Q", format="g", title="ε"),
                alt.Tooltip("auroc_pct:Q", format=".2f", title="AUROC %"),
            ],
        )
        text = base.mark_text(fontSize=11).encode(
            text=alt.Text("auroc_pct:Q", format=".1f"),
            color=alt.when(alt.datum.auroc_pct > float(table["auroc_pct"].median()))
            .then(alt.value("black"))
            .otherwise(alt.value("white")),
        )
        pick = (
            alt.Chart(table[table["selected"]])
            .mark_rect(fill=None, stroke="#E4572E", strokeWidth=3)
            .encode(x=alt.X("e_label:O", sort=e_order), y=alt.Y("t_label:O", sort=t_order))
        )
        st.altair_chart(
            alt.layer(cells, text, pick).properties(title="AUROC (%) over the cached grid, all OOD images", height=320)
        )
        st.caption("Outlined: the current setting. Picking the brightest cell here is tuning on the test set.")


tuner()

st.subheader("Tuning honestly")
st.caption(
    "Choosing (T, ε) by looking at the OOD test images inflates the score. Here both choices are "
    "scored on the same held-out OOD images; the gap is the optimism of test-set tuning."
)
try:
    hv = loaders.cached_honest(sel)
except Exception as exc:  # e.g. too few OOD images to split
    st.info(f"Cannot split the OOD set for honest tuning: {exc}")
    st.stop()
a, b, c = st.columns([2, 2, 1])
with a:
    st.metric(
        (
            "Tuned on the tuning set → test AUROC"
            if hv.get("tune_set")
            else "Tuned on the exposure split → held-out AUROC"
        ),
        analysis.fmt_pct(hv["honest_heldout_auroc"]),
        border=True,
        help="(T, ε) chosen by AUROC on the OOD exposure split (all ID images), then scored on the held-out split.",
    )
    st.caption(
        f"T = {analysis.fmt_num(hv['honest_params']['T'])}, ε = {analysis.fmt_num(hv['honest_params']['eps'])} · "
        f"{hv['describe']}; exposure AUROC {analysis.fmt_pct(hv['honest_exposure_auroc'])}"
    )
with b:
    optimism = 100 * (hv["naive_heldout_auroc"] - hv["honest_heldout_auroc"])
    st.metric(
        "Tuned on the test set (naive) → AUROC",
        analysis.fmt_pct(hv["naive_heldout_auroc"]),
        delta=f"{optimism:+.2f} pts optimistic",
        delta_color="off",
        border=True,
        help="(T, ε) chosen by AUROC on the held-out split itself: the number a paper gets by tuning on its test set.",
    )
    st.caption(
        f"T = {analysis.fmt_num(hv['naive_params']['T'])}, ε = {analysis.fmt_num(hv['naive_params']['eps'])} · "
        f"chosen on the {hv['n_heldout']} held-out OOD images it is scored on"
    )


def load_setting(params: dict) -> None:
    st.session_state["T"] = float(params["T"])
    st.session_state["eps"] = float(params["eps"]) if grid is not None else 0.0


with c:
    st.button(
        "Use the honest setting",
        on_click=load_setting,
        args=(hv["honest_params"],),
        help="Move the sliders to the setting chosen on the exposure split.",
    )
    st.button("Use the naive setting", on_click=load_setting, args=(hv["naive_params"],))
