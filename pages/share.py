"""Share: the deployable read-only app (zip of `oodcore share`'s folder) and the static report (zip of `oodcore report`)."""

import tempfile
from pathlib import Path

import streamlit as st

from oodcore.explorer import shell
from oodcore.share.archive import zip_folder
from oodcore.share.folder import ENTRY, format_size_report, make_share
from oodcore.share.report import make_report

sel = shell.page_setup(
    "Share",
    "Take this benchmark elsewhere: a read-only app that deploys to Streamlit Community Cloud without torch "
    "(the same as `oodcore share`), or a static report that opens offline (`oodcore report`).",
)
archs = st.multiselect(
    "Architectures",
    [r["arch"] for r in sel.runs],
    default=[r["arch"] for r in sel.runs],
    key="share.archs",
    help="Every cached architecture of this benchmark by default.",
)
if not archs:
    st.info("Pick at least one architecture.")
    st.stop()


def progress_bar():
    bar = st.progress(0.0, text="starting")
    return lambda message, fraction: bar.progress(min(max(float(fraction), 0.0), 1.0), text=message)


def build(kind: str) -> None:
    """Run the command into a temporary folder and keep its zip in the session for the download button."""
    update = progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="oodcore-share-") as tmp:
            folder = Path(tmp) / f"{sel.benchmark}-{kind}"
            if kind == "app":
                result = make_share(
                    sel.root,
                    sel.benchmark,
                    archs,
                    folder,
                    with_features=st.session_state.get("share.features", False),
                    progress=update,
                )
                note = format_size_report(result["size"])
            else:
                result = make_report(sel.root, sel.benchmark, archs, folder, progress=update)
                note = f"{result['figures']} figures as PNG, SVG and CSV; open index.html (works offline)"
            update("zipping", 1.0)
            st.session_state[f"share.{kind}"] = {"zip": zip_folder(folder), "note": note, "name": folder.name}
    except (OSError, ValueError, KeyError) as exc:
        st.error(f"Could not build it: {type(exc).__name__}: {exc}")


def offer_download(kind: str) -> None:
    """The last built `kind` ("app" or "report") of this session: its note and its zip to download."""
    made = st.session_state.get(f"share.{kind}")
    if made:
        st.caption(made["note"])
        st.download_button(
            f"Download the {kind} (zip)",
            made["zip"],
            file_name=f"{made['name']}.zip",
            mime="application/zip",
            icon=":material/download:",
            key=f"share.dl_{kind}",
        )


left, right = st.columns(2)
with left:
    st.subheader("Read-only app")
    st.caption(
        f"A folder with `{ENTRY}`, the read-only pages, the light oodcore modules, a `requirements.txt` without "
        "torch, `.streamlit/config.toml` and a compact bundle (every file under 50 MB). Push it as a GitHub "
        "repository's root and deploy it on Streamlit Community Cloud."
    )
    st.toggle(
        "Include features",
        key="share.features",
        help="Also bundle features, the fit split and the final layer (float16): fitted methods' sliders stay live, "
        "the bundle is larger.",
    )
    if st.button("Build the app folder", key="share.build_app", icon=":material/deployed_code:"):
        build("app")
    offer_download("app")
with right:
    st.subheader("Static report")
    st.caption(
        "index.html with the leaderboard and CIs, the figures (AUROC, AUPR-Out and FPR@95 per architecture, ODIN "
        "T × ε heatmaps, ID top-1 vs AUROC, ROC overlays) as PNG, SVG and CSV, and the top misfires."
    )
    if st.button("Build the report", key="share.build_report", icon=":material/description:"):
        build("report")
    offer_download("report")
