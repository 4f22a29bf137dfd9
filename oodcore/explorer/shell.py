"""The app's shell: first-run demo build, the sidebar's run picker, navigation and page setup."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Sequence

import streamlit as st

from oodcore.explorer.loaders import Selection, cached_runs, stop_on_cache_error
from oodcore.explorer.settings import APP_TITLE, CONVENTIONS, MAX_UPLOAD_MB, readonly
from oodcore.store import scopes
from oodcore.store.integrity import CacheError
from oodcore.store.paths import cache_root

_BUILD_LOCK = threading.Lock()

_PHASES = (
    ("training", 0.0, 0.3),
    ("extracting", 0.3, 0.45),
    ("ODIN grid on id", 0.45, 0.6),
    ("ODIN grid on ood", 0.6, 0.9),
    ("scoring every detector", 0.9, 1.0),
)


def _overall(message: str, fraction: float) -> float:
    for prefix, lo, hi in _PHASES:
        if message.startswith(prefix):
            return lo + (hi - lo) * min(max(fraction, 0.0), 1.0)
    return min(max(fraction, 0.0), 1.0)


def ensure_runs(root: Path) -> list[dict] | None:
    """The cached runs; with none, build the offline demo (progress shown) or, read-only, explain."""
    damaged: list = []
    runs = cached_runs(root, damaged)
    if runs:
        if damaged:
            st.sidebar.warning(
                f"{len(damaged)} cached run(s) cannot be read and are hidden:\n\n"
                + "\n\n".join(f"- {e.public() if readonly() else e}" for e in damaged[:5])
            )
        return runs
    st.title(APP_TITLE)
    if readonly() and damaged:
        st.error(
            "The cached runs of this deployment cannot be read:\n\n"
            + "\n\n".join(f"- {e.public()}" for e in damaged[:5])
        )
        return None
    if readonly():
        st.info(
            "This read-only deployment has no cached runs yet. Its operator creates one with "
            "`python -m oodcore demo` (offline digits demo) or `python -m oodcore run --arch ... "
            "--id-dir ... --ood-dir ... --odin-grid`, pointing `OODCORE_CACHE` at the cache folder."
        )
        return None
    st.write(
        f"No cached runs under `{root}` yet, so the explorer is building the offline **demo benchmark** "
        "(a small CNN on scikit-learn's digits: ID = digits 0-4, OOD = digits 5-9). "
        "It takes about a minute on a laptop CPU and is done once; ImageNet runs come from "
        "`python -m oodcore run ...`."
    )
    with st.status("Building the demo benchmark…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")
        shown = {"frac": 0.0, "t": 0.0}

        def progress(message: str, fraction: float) -> None:
            frac = max(shown["frac"], _overall(message, fraction))
            now = time.monotonic()
            if now - shown["t"] > 0.25 or frac >= 1.0:
                bar.progress(frac, text=message)
                shown.update(frac=frac, t=now)

        try:
            with _BUILD_LOCK:
                if not cached_runs(root):
                    from oodcore.extraction import demo  # imports torch: only here, lazily

                    demo.build_demo(root, progress=progress)
        except Exception as exc:  # unwritable folder, out of disk, ...
            status.update(label="Building the demo benchmark failed", state="error")
            st.error(
                f"Could not build the demo under `{root}`: {type(exc).__name__}: {exc}. "
                "Set `OODCORE_CACHE` to a writable folder, or run `python -m oodcore demo`."
            )
            return None
        bar.progress(1.0, text="done")
        status.update(label="Demo benchmark ready", state="complete", expanded=False)
    runs = cached_runs(root)
    if not runs:
        st.error("The demo build finished but no run was published; try `python -m oodcore demo`.")
        return None
    st.rerun()
    return runs  # not reached (st.rerun raises) except outside a script run


def _bench_order(runs: list[dict]) -> list[str]:
    names = sorted({r["benchmark"] for r in runs}, key=lambda b: (b == "demo", b))
    return names


def drop_stale(key: str, options: Sequence) -> None:
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


def render_sidebar(root: Path, runs: list[dict]) -> Selection:
    """Benchmark and architecture pickers (values bound to the URL) and the run's protocol."""
    sb = st.sidebar
    benches = _bench_order(runs)
    drop_stale("bench", benches)
    protocol_of = {r["benchmark"]: r.get("protocol", "?") for r in runs}
    bench = sb.selectbox(
        "Benchmark",
        benches,
        key="bench",
        bind="query-params",
        help="A cached (ID, OOD, protocol) pair. `demo` is the offline digits benchmark.",
        format_func=lambda b: f"{b}  ·  {protocol_of.get(b, '')}",
    )
    arch_runs = [r for r in runs if r["benchmark"] == bench]
    archs = [r["arch"] for r in arch_runs]
    drop_stale("arch", archs)
    arch = sb.selectbox(
        "Architecture", archs, key="arch", bind="query-params", help="Every architecture cached for this benchmark."
    )
    run = next(r for r in arch_runs if r["arch"] == arch)
    scope = ood_scope_picker(run)
    n_classes = len(run.get("class_ids", []))
    grid = "yes" if ("odin_id" in run.get("files", {})) else "no"
    sb.markdown(
        f"**Protocol:** {run.get('protocol', '?')}  \n{n_classes} classes · "
        f"{run.get('n_id', '?')} ID / {run.get('n_ood', '?')} OOD images  \nODIN grid cached: {grid}"
        + (f"  \nOOD tuning set: {run['tune_set']['name']}" if run.get("tune_set") else "")
    )
    with sb.expander("About this run"):
        model = run.get("model", {})
        st.markdown(f"**Model:** `{model.get('name', run['arch']) if isinstance(model, dict) else model}`")
        if not readonly():
            st.markdown(f"**ID:** {run.get('id_root', '?')}  \n**OOD:** {run.get('ood_root', '?')}")
            st.caption(f"cache: {root}")
        skipped = run.get("skipped") or []
        if skipped:
            st.markdown(f"{len(skipped)} unreadable file(s) skipped")
    sb.caption(CONVENTIONS)
    if readonly():
        sb.caption("Read-only deployment: nothing here writes to disk or starts extraction.")
    return Selection(root=root, run=run, runs=arch_runs, scope=scope)


def ood_scope_picker(run: dict) -> str:
    """With several OOD sets: which set, group or all of them the pages show (kept in the URL as ?ood=)."""
    options = scopes.scopes_of_run(run)
    if len(options) <= 1:
        return scopes.ALL
    drop_stale("ood", options)
    sizes = {f"set:{s['name']}": s.get("n") for s in run.get("ood_sets", [])}
    return st.sidebar.selectbox(
        "OOD set",
        options,
        key="ood",
        bind="query-params",
        format_func=lambda o: scopes.scope_label(o) + (f" · {sizes[o]} images" if sizes.get(o) else ""),
        help="Which OOD test set the pages score. A group or 'all' pools its sets' images on the curves, ODIN "
        "and misfire pages; the leaderboard shows the unweighted mean of the sets' metrics, as OpenOOD reports.",
    )


def app_sidebar() -> Selection | None:
    """First-run check, then the run picker. None when there is nothing to show yet."""
    root = cache_root()
    runs = ensure_runs(root)
    if not runs:
        return None
    return render_sidebar(root, runs)


_LOCAL = threading.local()


@contextlib.contextmanager
def entry(sel: Selection):
    """app.py runs the page inside this, so the page uses app.py's sidebar instead of drawing its own."""
    _LOCAL.selection = sel
    try:
        yield
    finally:
        _LOCAL.selection = None


def apply_server_settings() -> None:
    """Settings that must hold wherever Streamlit is started (not only from the repository's .streamlit/).

    The upload cap (`server.maxUploadSize`, checked by the server on every upload) and, read-only,
    `client.showErrorDetails = "none"`: a public visitor never sees a traceback or a server path.
    """
    from streamlit import config

    if config.get_option("server.maxUploadSize") != MAX_UPLOAD_MB:
        config.set_option("server.maxUploadSize", MAX_UPLOAD_MB)
    if readonly() and config.get_option("client.showErrorDetails") != "none":
        st.set_option("client.showErrorDetails", "none")


def run_app(pages_dir: Path) -> None:
    """What app.py does: page config, navigation over `pages_dir`, first-run check, sidebar, then the chosen page."""
    apply_server_settings()
    st.set_page_config(page_title=APP_TITLE, page_icon=":material/travel_explore:", layout="wide")
    page = st.navigation(navigation_pages(Path(pages_dir)))
    selection = app_sidebar()
    if selection is None:
        st.stop()
    with entry(selection):
        try:
            page.run()
        except (CacheError, OSError, KeyError) as exc:  # a run that broke after the sidebar listed it
            stop_on_cache_error(exc, selection.run)


def _main_script() -> Path | None:
    """The session's main script (app.py when the explorer was started with `streamlit run app.py`)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return Path(ctx.main_script_path).resolve() if ctx is not None and ctx.main_script_path else None


def page_setup(title: str, blurb: str, *, work: bool = False) -> Selection:
    """Title and one-line explanation; the sidebar's selection comes from app.py, which runs every page.

    `work`: the page starts computation (scoring, training), so a read-only deployment never shows it.
    """
    apply_server_settings()
    if work and readonly():
        st.info("This page is not available in a read-only deployment.")
        st.stop()
    sel = getattr(_LOCAL, "selection", None)
    if sel is None:
        main = _main_script()
        if main is not None and main.parent.name != "pages" and (main.parent / "pages").is_dir():
            # Streamlit's pages/-folder fallback (a deep link on a fresh session, AppTest's switch_page) ran
            # this page without app.py: show it through the app's navigation and sidebar instead.
            run_app(main.parent / "pages")
            st.stop()
        # `streamlit run pages/x.py`: pages are views inside the app, not apps of their own
        st.info("This page is part of the ImageNet-O explorer: start it with `streamlit run app.py`.")
        st.stop()
    st.title(title)
    st.caption(blurb)
    return sel


PAGES = (
    # (file in pages/, title, icon, section, does work / starts computation beyond reading the cache)
    ("leaderboard.py", "Leaderboard", ":material/leaderboard:", "Evaluate", False),
    ("study.py", "Study", ":material/grid_on:", "Evaluate", False),
    ("curves.py", "Curves", ":material/show_chart:", "Evaluate", False),
    ("odin_tuner.py", "ODIN tuner", ":material/tune:", "Diagnose", False),
    ("misfires.py", "Misfires", ":material/image_search:", "Diagnose", False),
    ("score_image.py", "Score an image", ":material/upload:", "Try it", True),
    ("training.py", "Training", ":material/model_training:", "Try it", True),  # starts training processes
    ("share.py", "Share", ":material/share:", "Share", True),  # writes the share folder / report (downloads)
)


def navigation_pages(pages_dir: Path) -> dict[str, list]:
    """The pages that exist in `pages_dir` (a shared deployment ships fewer), work pages hidden when read-only."""
    sections: dict[str, list] = {}
    for i, (name, title, icon, section, work) in enumerate(PAGES):
        path = pages_dir / name
        if (work and readonly()) or not path.is_file():
            continue
        sections.setdefault(section, []).append(st.Page(path, title=title, icon=icon, default=(i == 0)))
    return sections
