"""Score an image: top-5 classes and every detector's OOD score for a new photo, against a cached run."""

import hashlib
import io
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from oodcore import detectors as M
from oodcore.data.images import BadImageError, load_rgb
from oodcore.evaluation import analysis
from oodcore.explorer import loaders, settings, shell, widgets
from oodcore.store.rundata import BenchmarkData, SplitArrays

sel = shell.page_setup(
    "Score an image",
    "Upload a photo (or pick a bundled example): the model's top-5 classes, every logit-based detector's score, "
    "and where that score falls among a cached run's ID images.",
    work=True,
)
if settings.readonly():
    st.info("Scoring new images is switched off in this read-only deployment.")
    st.stop()

IMAGENET_DEFAULT = "efficientnet_lite0"
DEMO_ARCH = "digits_cnn"
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]


@st.cache_data(show_spinner=False)
def example_images() -> dict[str, str]:
    from sklearn.datasets import load_sample_images

    return {Path(f).name: f for f in load_sample_images().filenames}


@st.cache_resource(show_spinner="Loading the model (first use only)…", max_entries=4)
def imagenet_model(name: str):
    from oodcore.models.registry import load_model  # imports torch: only on this page

    return load_model(name, device="cpu")


@st.cache_resource(show_spinner="Loading the demo CNN…", max_entries=2)
def demo_model(root: str, token: str):
    from oodcore.extraction import demo

    return demo.load_demo_model(Path(root))


@st.cache_data(show_spinner=False, max_entries=32)
def forward(model_name: str, root: str, token: str, digest: str, _img) -> dict:
    """Logits (all classes the network has) and penultimate features of one image."""
    import torch

    from oodcore.extraction import demo

    if model_name == DEMO_ARCH:
        model = demo_model(root, token)
        x = demo.digits_input(_img, model.mean[0], model.std[0])
    else:
        model = imagenet_model(model_name)
        x = model.transform(_img)[None]
    with torch.inference_mode():
        logits, feats = model.logits_and_features(x)
    return {"logits": logits.float().cpu().numpy()[0], "features": feats.float().cpu().numpy().reshape(1, -1)[0]}


def class_names_for(model_name: str, run: dict | None) -> list[str]:
    if model_name == DEMO_ARCH and run is not None:
        return list(run["class_names"])
    from oodcore.data.imagenet import imagenet_names

    return imagenet_names()


runs = loaders.cached_runs(sel.root)
real_archs = sorted({r["arch"] for r in runs if r["benchmark"] != "demo"})
models = list(
    dict.fromkeys([IMAGENET_DEFAULT, *real_archs] + ([DEMO_ARCH] if any(r["arch"] == DEMO_ARCH for r in runs) else []))
)
default_model = sel.arch if (sel.arch in models and sel.benchmark != "demo") else IMAGENET_DEFAULT

top = st.columns([2, 1, 1])
upload = top[0].file_uploader(
    "Upload a photo",
    type=UPLOAD_TYPES,
    key="score.upload",
    max_upload_size=settings.MAX_UPLOAD_MB,
    help=f"Up to {settings.MAX_UPLOAD_MB} MB and {settings.MAX_PIXELS // 1_000_000} megapixels.",
)
example = top[1].selectbox(
    "…or a bundled example",
    [None, *example_images()],
    key="score.example",
    format_func=lambda v: "none" if v is None else v,
    help="The two sample photos scikit-learn ships.",
)
model_name = top[2].selectbox(
    "Model",
    models,
    index=models.index(default_model),
    key="score.model",
    format_func=lambda m: f"{m} (demo digits CNN)" if m == DEMO_ARCH else m,
    help="efficientnet_lite0 works offline; a model with a cached run is compared with it.",
)

if upload is not None:
    raw, source = upload.getvalue(), f"upload: {upload.name}"
elif example is not None:
    raw, source = Path(example_images()[example]).read_bytes(), f"example: {example}"
else:
    st.info("Upload a photo or pick a bundled example to score it.", icon=":material/upload:")
    st.stop()

try:
    image = load_rgb(io.BytesIO(raw), max_pixels=settings.MAX_PIXELS)
except BadImageError as exc:
    hints = {
        "not an image": "the file is not an image format this app can read",
        "truncated": "the file is cut short (an incomplete download?)",
        "decompression bomb": f"the image is larger than {settings.MAX_PIXELS // 1_000_000} megapixels",
        "zero-byte file": "the file is empty",
    }
    st.error(f"Cannot score this file: {hints.get(exc.reason, exc.reason)}. ({exc})", icon=":material/broken_image:")
    st.stop()

# the cached run to compare against: the sidebar's run when it used this model, else any run of it
matches = [r for r in runs if r["arch"] == model_name]
run = sel.run if sel.run["arch"] == model_name else (matches[0] if matches else None)
token = loaders.run_token(run) if run is not None else ""
digest = hashlib.sha256(raw).hexdigest()
try:
    with st.spinner(f"Running {model_name}…"):
        out = forward(model_name, str(sel.root), token, digest, image)
except Exception as exc:  # weights missing offline, oodcore.models unavailable, ...
    st.error(f"Could not run {model_name}: {type(exc).__name__}: {exc}", icon=":material/error:")
    st.stop()

logits_all, features = out["logits"], out["features"]
names_all = class_names_for(model_name, run)
probs = M.softmax(logits_all[None])[0]
order = np.argsort(-probs)[:5]

left, right = st.columns([1, 2])
with left:
    st.image(image, caption=f"{source} · {image.width}×{image.height}", width="stretch")
with right:
    st.markdown(
        f"**Top-5 classes · {model_name}**" + (" (all 1000 ImageNet classes)" if model_name != DEMO_ARCH else "")
    )
    st.dataframe(
        pd.DataFrame({"class": [names_all[i] for i in order], "probability": probs[order]}),
        hide_index=True,
        column_config={
            "probability": st.column_config.ProgressColumn(
                "probability", format="percent", min_value=0.0, max_value=1.0
            )
        },
    )

st.subheader("OOD scores")
if run is not None:
    data = loaders.load_data(sel.root, run)
    try:
        logits = logits_all if model_name == DEMO_ARCH else analysis.restrict_to_run(logits_all, run)
    except ValueError as exc:
        st.error(f"Cannot compare with the cached run {run['benchmark']}: {exc}")
        st.stop()
    st.caption(
        f"Compared with the cached run **{run['benchmark']} · {run['arch']}** (protocol {run['protocol']}, "
        f"{data.n_classes} classes): the logits are restricted to its classes, every method at its default "
        "setting. " + settings.CONVENTIONS
    )
else:
    from oodcore.data.imagenet import imagenet_wnids

    logits = logits_all
    empty = SplitArrays(np.zeros((0, len(logits)), np.float32), None, np.zeros(0, np.int64), np.zeros(0, str))
    data = BenchmarkData(
        benchmark="(none)",
        arch=model_name,
        protocol="full",
        class_ids=imagenet_wnids(),
        class_names=list(names_all),
        id=empty,
        ood=empty,
    )
    st.info(
        f"No cached run for {model_name}, so there is no ID reference to compare with: scores below are over all "
        f"1000 classes. Create one with `python -m oodcore run --arch {model_name} --id-dir ... --ood-dir ...`."
    )

rows = analysis.score_new_image(data, logits, features if run is not None else None)
table = []
reference = {}
for row in rows:
    entry = {
        "method": row["label"],
        "setting": analysis.params_text(row["params"]) or "—",
        "score": row["score"],
        "more OOD-like than % of ID": None,
        "flagged OOD @95% TPR": None,
        "note": row["why"],
    }
    if row["score"] is not None and run is not None:
        try:
            ref = loaders.cached_metrics(sel, row["method"], None, run=run)
        except M.MethodUnavailable as exc:
            entry["note"] = f"no reference scores: {exc}"
        else:
            reference[row["method"]] = ref
            entry["more OOD-like than % of ID"] = analysis.percentile_among(row["score"], ref["scores_id"])
            entry["flagged OOD @95% TPR"] = bool(row["score"] >= ref["threshold"])
    table.append(entry)
frame = pd.DataFrame(table)
if run is None:
    frame = frame.drop(columns=["more OOD-like than % of ID", "flagged OOD @95% TPR"])
st.dataframe(
    frame,
    hide_index=True,
    height=36 * (len(frame) + 1) + 4,
    column_config={
        "method": st.column_config.TextColumn("method"),
        "setting": st.column_config.TextColumn("setting", width="medium"),
        "score": st.column_config.NumberColumn("score (higher = more OOD)", format="%.4g"),
        "more OOD-like than % of ID": st.column_config.ProgressColumn(
            "more OOD-like than … of ID",
            format="%.0f%%",
            min_value=0,
            max_value=100,
            help="Percentile of this score among the cached run's ID images.",
        ),
        "flagged OOD @95% TPR": st.column_config.CheckboxColumn(
            "flagged OOD", help="Score at or above the threshold that catches 95% of the run's OOD images."
        ),
        "note": st.column_config.TextColumn("why no score", width="large"),
    },
)

if reference:
    pick = st.selectbox(
        "Show among the run's scores", list(reference), key="score.hist_method", format_func=lambda n: M.get(n).label
    )
    ref = reference[pick]
    mine = next(r["score"] for r in rows if r["method"] == pick)
    hist = widgets.histogram_chart(
        analysis.histogram_frame(ref["scores_id"], ref["scores_ood"]),
        ref["threshold"],
        x_title=f"{M.get(pick).label} score (higher = more OOD)",
        height=240,
    )
    marker = alt.Chart(pd.DataFrame({"x": [mine], "label": ["this image"]}))
    st.altair_chart(
        alt.layer(
            hist,
            marker.mark_rule(color="#111", size=3).encode(x="x:Q"),
            marker.mark_text(align="left", dx=5, dy=14, color="#111", fontWeight="bold").encode(
                x="x:Q", y=alt.value(0), text="label:N"
            ),
        )
    )
