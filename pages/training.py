"""Training: start energy fine-tuning or a normalizing flow on the cached run, watch it, compare it.

A run is a separate process (`python -m oodcore train ...`, see oodcore/jobs.py) that writes its
progress to files under <cache>/<benchmark>/<arch>/jobs/<job_id>/, so it survives page reloads and
closed tabs; everything shown here is read from those files.
"""

import time
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from oodcore.explorer import loaders, settings, shell
from oodcore.training import config as train_config
from oodcore.training import files as job_files
from oodcore.training import jobs
from oodcore.training import launch as job_launch

sel = shell.page_setup(
    "Training",
    "Train a detector on this run's cache: energy-bounded fine-tuning (Liu et al. 2020) or a RealNVP normalizing "
    "flow (Kirichenko et al. 2020 masks). Detectors that see OOD images use the OOD exposure split only and are "
    "scored on the held-out split, next to an untuned baseline; a finished one joins the Leaderboard, Curves and "
    "Misfires pages.",
    work=True,
)
root, bench, arch = sel.root, sel.benchmark, sel.arch
READONLY = settings.readonly()
ACTIVE = ("queued", "running")
KIND_LABELS = {"energy": "Energy fine-tuning", "flow": "Normalizing flow (RealNVP)"}
INPUT_LABELS = {"pixels": "pixels (the demo's digits)", "features": "cached penultimate features"}


def shown_job() -> dict | None:
    """The job to show: the one holding this cache's lock if it belongs to this run, else the latest one."""
    statuses = job_files.list_jobs(root, bench, arch)
    holder = job_files.read_lock(root)
    if holder:
        for status in statuses:
            if status.get("job_id") == holder.get("job_id"):
                return status
    return statuses[0] if statuses else None


def refresh_app_caches() -> None:
    """A newly published detector: drop the app's memoised copies of this run so other pages list it."""
    loaders.clear_run_caches()


def launch(cfg: train_config.TrainConfig, fresh: bool = False) -> None:
    try:
        job_id = job_launch.start_job_process(root, cfg, fresh=fresh)
    except job_files.JobBusy as exc:
        st.warning(str(exc), icon=":material/hourglass_top:")
        return
    except job_files.JobError as exc:
        st.error(str(exc))
        return
    st.toast(f"Started training job {job_id}")
    time.sleep(0.3)  # let the process write its first status
    st.rerun()


# ------------------------------------------------------------------ the current job, live


def loss_chart(folder: Path, status: dict):
    frame = job_files.read_loss(folder)
    if frame.empty:
        return None
    terms = status.get("terms") or ["id term", "ood term"]
    long = frame.rename(columns={"loss": "total loss", "id_term": terms[0], "ood_term": terms[1]})
    cols = ["total loss"] + ([terms[0]] if (frame["id_term"] - frame["loss"]).abs().max() > 1e-6 else [])
    cols += [terms[1]] if frame["ood_term"].abs().sum() > 0 else []
    long = long.melt(id_vars=["global_step", "epoch"], value_vars=cols, var_name="curve", value_name="value")
    return (
        alt.Chart(long)
        .mark_line()
        .encode(
            x=alt.X("global_step:Q", title="optimisation step"),
            y=alt.Y("value:Q", title="loss", scale=alt.Scale(zero=False)),
            color=alt.Color("curve:N", title=None, legend=alt.Legend(orient="top")),
            tooltip=["curve:N", "epoch:Q", "global_step:Q", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=260)
    )


first = shown_job()
LIVE = first is not None and first.get("state") in ACTIVE


@st.fragment(run_every=1.0 if LIVE else None)
def live_panel() -> None:
    status = shown_job()
    if status is None:
        st.info("No training job for this run yet: start one below.", icon=":material/model_training:")
        return
    state = status.get("state")
    if LIVE and state not in ACTIVE:
        if state == "done":
            refresh_app_caches()
        st.rerun(scope="app")  # finished while watched: refresh the table and the form
    folder = job_files.job_dir(root, bench, arch, status["job_id"])
    total = max(int(status.get("total") or 1), 1)
    steps = max(int(status.get("steps") or 1), 1)
    epoch = int(status.get("epoch") or 0)
    step = int(status.get("step") or 0) if state in ACTIVE else 0
    frac = 1.0 if state == "done" else min(max((epoch + (step / steps if step < steps else 0)) / total, 0.0), 1.0)
    label = status.get("label") or status.get("name") or status["job_id"]
    icon = {
        "queued": ":material/hourglass_top:",
        "running": ":material/directions_run:",
        "done": ":material/check_circle:",
        "failed": ":material/error:",
        "cancelled": ":material/stop_circle:",
    }.get(state, "")
    st.markdown(f"**{icon} {label}** · job `{status['job_id']}` · **{state}**")
    message = status.get("message", "")
    st.progress(frac, text=message if message.startswith("epoch") else f"{epoch}/{total} epochs · {message}")
    if status.get("stopped_early"):
        st.warning(f"Stopped early: {status['stopped_early']}", icon=":material/warning:")
    if state == "failed" and status.get("traceback") and not READONLY:
        with st.expander("Error details"):
            st.code(status["traceback"])
    chart = loss_chart(folder, status)
    if chart is not None:
        st.altair_chart(chart, width="stretch")
    if READONLY:
        return
    cols = st.columns(4)
    if state in ACTIVE:
        cancel_at = (
            (folder / job_files.CANCEL_FILE).stat().st_mtime if (folder / job_files.CANCEL_FILE).exists() else None
        )
        if cols[0].button(
            "Cancel",
            key="train.cancel",
            icon=":material/stop_circle:",
            help="Stops after the current step; the last epoch's checkpoint is kept (resumable).",
        ):
            st.toast(job_files.request_cancel(root, bench, arch, status["job_id"]))
        if cancel_at is not None and time.time() - cancel_at > 10:
            if cols[1].button(
                "Force stop",
                key="train.kill",
                icon=":material/dangerous:",
                help="Sends SIGTERM to the training process group.",
            ):
                st.toast(job_files.request_cancel(root, bench, arch, status["job_id"], force=True))
    elif state in ("cancelled", "failed") and status.get("config"):
        if cols[0].button(
            f"Resume from epoch {epoch}",
            key="train.resume",
            icon=":material/play_arrow:",
            help="Starts the same options again: it continues from the last checkpoint.",
        ):
            launch(train_config.TrainConfig.from_dict(status["config"]))


st.subheader("Current job")
live_panel()

# ------------------------------------------------------------------ start a job

st.subheader("Start a training run")
if READONLY:
    st.info("Read-only deployment: training is disabled here (finished runs are listed below).", icon=":material/lock:")
else:
    kind = (
        st.segmented_control(
            "Detector",
            list(KIND_LABELS),
            format_func=KIND_LABELS.get,
            default="energy",
            key="train.kind",
            required=True,
        )
        or "energy"
    )
    inputs = ["pixels", "features"] if bench == "demo" else ["features"]
    left, mid, right = st.columns(3)
    inp = left.radio(
        "Input",
        inputs,
        format_func=INPUT_LABELS.get,
        key=f"train.input.{kind}",
        help="Pixels exist only for the demo (the whole CNN / a flow on 32x32 digits); features are the "
        "cached penultimate features (the classification head / a flow on embeddings).",
    )
    cfg = train_config.TrainConfig(kind=kind, benchmark=bench, arch=arch, input=inp)
    if kind == "flow":
        from oodcore.training import flows

        masks = flows.PIXEL_MASKS if inp == "pixels" else flows.FEATURE_MASKS
        cfg.mask = mid.selectbox(
            "Coupling mask",
            masks,
            key=f"train.mask.{inp}",
            help="checkerboard (RealNVP), horizontal (top/bottom halves) or cyclic (four "
            "quadrants, Kirichenko et al.'s cycle-mask) on pixels; alternating halves or "
            "fixed random halves on embeddings.",
        )
        cfg.ood_objective = right.toggle(
            "OOD-aware objective",
            key="train.ood",
            help="Also push the OOD exposure split's NLL above the ID NLL + a margin (bits/dim).",
        )
    try:
        defaults = train_config.resolve(cfg, sel.run)
    except job_files.JobError as exc:
        st.error(str(exc))
        st.stop()
    key = f"{kind}.{inp}"
    c = st.columns(4)
    cfg.epochs = int(c[0].number_input("Epochs", 1, 500, int(defaults.epochs), key=f"train.epochs.{key}"))
    lrs = sorted({1e-4, 3e-4, 1e-3, 3e-3, 1e-2, float(defaults.lr)})
    cfg.lr = float(
        c[1].select_slider(
            "Learning rate (Adam)", lrs, value=float(defaults.lr), format_func=lambda v: f"{v:g}", key=f"train.lr.{key}"
        )
    )
    cfg.batch_size = int(c[2].number_input("Batch size", 1, 4096, int(defaults.batch_size), key=f"train.bs.{key}"))
    if kind == "energy" or cfg.ood_objective:
        cfg.lam = float(
            c[3].number_input(
                "λ (OOD term weight)",
                0.0,
                100.0,
                float(defaults.lam),
                key=f"train.lam.{key}",
                help="Energy: weight of the squared energy hinges (paper: 0.1). Flow: weight of the OOD margin hinge.",
            )
        )
    with st.expander("More options"):
        if kind == "energy":
            margins = st.radio(
                "Energy margins",
                ["auto", "paper", "custom"],
                horizontal=True,
                key="train.margins",
                format_func={"auto": "auto (fit-split quantiles)", "paper": "paper (−25 / −7)", "custom": "custom"}.get,
                help="auto: m_in = median, m_out = 95th percentile of the untuned fit-split energies.",
            )
            if margins == "custom":
                a, b = st.columns(2)
                cfg.m_in = float(a.number_input("m_in", value=-10.0, key="train.m_in"))
                cfg.m_out = float(b.number_input("m_out", value=-5.0, key="train.m_out"))
            else:
                cfg.margins = margins
        else:
            a, b, d, e = st.columns(4)
            cfg.layers = int(a.number_input("Coupling layers", 1, 64, int(defaults.layers), key=f"train.layers.{key}"))
            cfg.width = int(b.number_input("s/t width", 1, 1024, int(defaults.width), key=f"train.width.{key}"))
            cfg.bottleneck = int(
                d.number_input("s/t bottleneck", 1, 1024, int(defaults.bottleneck), key=f"train.bottleneck.{key}")
            )
            if inp == "features":
                cfg.pca = int(
                    e.number_input(
                        "PCA components (0 = none)",
                        0,
                        4096,
                        0,
                        key="train.pca",
                        help="Reduce the standardised features to N whitened principal "
                        "components (fitted on the fit split) first.",
                    )
                )
            if cfg.ood_objective:
                cfg.margin_gap = float(
                    st.number_input("Margin over the ID NLL (bits/dim)", 0.0, 100.0, 1.0, key="train.gap")
                )
        fresh = st.checkbox(
            "Start over even if an unfinished run with these options exists",
            key="train.fresh",
            help="By default starting the same options again resumes from the last checkpoint.",
        )
    busy = job_files.read_lock(root)
    if busy:
        st.caption(f":material/hourglass_top: {job_files.busy_message(busy)}")
    if st.button("Start training", key="train.start", type="primary", icon=":material/play_arrow:"):
        launch(cfg, fresh=fresh)

# ------------------------------------------------------------------ finished runs

st.subheader("Finished runs")
results = jobs.finished_runs(root, bench, arch, sel.run)
if not results:
    st.caption(
        "None yet. A finished run's detector is also scored on the Leaderboard (rows marked as tuned on the "
        "OOD exposure split)."
    )
else:
    rows = []
    for r in results:
        b = r["baseline"]
        rows.append(
            {
                "detector": r["label"],
                "held-out AUROC (%)": 100 * r["auroc"],
                "baseline": b.get("label", b["method"]),
                "baseline AUROC (%)": 100 * b["auroc"],
                "Δ AUROC (pts)": 100 * (r["auroc"] - b["auroc"]),
                "FPR@95 (%)": 100 * r["fpr95"],
                "baseline FPR@95 (%)": 100 * b["fpr95"],
                "epochs": f"{r['epochs_done']}/{r['epochs']}",
                "seconds": r["seconds"],
                "stopped early": r.get("stopped_early") or "",
                "on the other pages": bool(r.get("published")),
                "name": r["name"],
                "job": r["job_id"],
                "finished": pd.Timestamp(r["finished"], unit="s").strftime("%Y-%m-%d %H:%M"),
            }
        )
    table = pd.DataFrame(rows)
    pct = st.column_config.NumberColumn(format="%.2f")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            k: pct
            for k in ("held-out AUROC (%)", "baseline AUROC (%)", "Δ AUROC (pts)", "FPR@95 (%)", "baseline FPR@95 (%)")
        }
        | {"seconds": st.column_config.NumberColumn(format="%.1f")},
    )
    st.caption(
        f"Held-out = the {results[0]['baseline']['n_ood_scored']} OOD rows no detector trained on; "
        "the baseline is the untuned Energy (energy fine-tuning) or the classifier's MSP (flows) on the "
        "same rows. " + results[0].get("split", "")
    )

with st.expander("All jobs of this run"):
    statuses = job_files.list_jobs(root, bench, arch)
    if statuses:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "job": s["job_id"],
                        "state": s.get("state"),
                        "epoch": f"{s.get('epoch', 0)}/{s.get('total', '?')}",
                        "message": s.get("message", ""),
                        "updated": pd.Timestamp(float(s.get("updated", 0)), unit="s").strftime("%Y-%m-%d %H:%M:%S"),
                    }
                    for s in statuses
                ]
            ),
            hide_index=True,
            width="stretch",
        )
        st.caption(
            f"Files: `{job_files.jobs_dir(root, bench, arch)}` · the same runs from a shell: "
            "`python -m oodcore train energy|flow --benchmark ...`"
        )
    else:
        st.caption("No jobs yet.")
