"""`oodcore share`: a self-contained folder that deploys to Streamlit Community Cloud as is.

    <out>/streamlit_app.py        entry script: read-only mode, OODCORE_CACHE = ./bundle, the explorer's shell
    <out>/requirements.txt        numpy, xxhash, pandas, pyarrow, pillow, altair, streamlit (no torch/torchvision/timm)
    <out>/.streamlit/config.toml  public read-only settings
    <out>/pages/*.py              the read-only pages (leaderboard, curves, ODIN tuner, misfires), as in the app
    <out>/oodcore/...             the light modules those pages import (copied; no engine code)
    <out>/bundle/...              the compact bundle (oodcore.share.bundle)
    <out>/README.md               what it shows, how it was made, how to deploy

Community Cloud (docs.streamlit.io, "File organization" and "App dependencies"): the dependency
file may sit beside the entry script (it takes precedence over one at the repository root), but
`.streamlit/config.toml` is read only at the repository root, and the working directory is the
repository root. So: push the folder as a repository's root; in a sub-folder, move its
`.streamlit/config.toml` to the repository root (the entry script finds everything else from its own path).
"""

from __future__ import annotations

import ast
import shutil
import time
from importlib import metadata
from pathlib import Path

import oodcore
from oodcore.share import build
from oodcore.share.bundle import PART_BYTES

PACKAGE = Path(oodcore.__file__).resolve().parent
READONLY_PAGES = ("leaderboard.py", "study.py", "curves.py", "odin_tuner.py", "misfires.py")
ENGINE = ("oodcore.extraction", "oodcore.models", "oodcore.training", "oodcore.cli")
ENTRY = "streamlit_app.py"
LIGHT_REQUIREMENTS = ("numpy", "xxhash", "pandas", "pyarrow", "pillow", "altair", "streamlit")
FORBIDDEN = ("torch", "torchvision", "timm", "sklearn", "scikit-learn")

ENTRY_SCRIPT = '''"""{title}: a read-only share of an oodcore study, made by `oodcore share` ({created}).

`streamlit run {entry}` (locally, or as the entry script on Streamlit Community Cloud).
Everything is found from this file's folder: the bundle, the pages and the light oodcore modules.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ["OODCORE_READONLY"] = "1"  # no builds, no scoring or training pages, no server paths
os.environ["OODCORE_CACHE"] = str(HERE / "bundle")

from oodcore.explorer.shell import run_app  # noqa: E402  (the copy beside this file: numpy/pandas/streamlit only)

run_app(HERE / "pages")
'''

CONFIG_TOML = """# Streamlit settings for a public, read-only deployment (Community Cloud reads this file only at
# the repository root: keep it there if this folder becomes a sub-folder of a repository).

[server]
headless = true
maxUploadSize = 1           # MB; the shared app has no upload (the scoring page is not shipped)
runOnSave = false
enableXsrfProtection = true

[client]
showErrorDetails = "none"   # never a traceback or a server path in the browser
toolbarMode = "viewer"

[browser]
gatherUsageStats = false

[theme]
base = "light"
primaryColor = "#3574C4"    # the ID blue used in every chart
"""


def pages_source() -> Path:
    """The repository's pages/ folder (beside the oodcore package in a checkout or an editable install)."""
    pages = PACKAGE.parent / "pages"
    if not all((pages / name).is_file() for name in READONLY_PAGES):
        raise FileNotFoundError(
            f"the explorer's pages are not beside the oodcore package ({pages}); run `oodcore share` "
            "from a checkout of the project (pip install -e .)"
        )
    return pages


def _module_path(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for path in (PACKAGE.parent / rel / "__init__.py", PACKAGE.parent / rel.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "oodcore" or m.startswith("oodcore.")}


def light_modules(scripts: list[Path]) -> list[Path]:
    """The oodcore modules (and their packages' __init__) the scripts import, transitively, minus the engine."""
    seen: dict[str, Path] = {}
    todo = [m for s in scripts for m in _imports(s)] + ["oodcore"]
    while todo:
        name = todo.pop()
        if name in seen or name.startswith(ENGINE):
            continue
        path = _module_path(name)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += list(_imports(path))
    return sorted(set(seen.values()))


def requirements_text() -> str:
    lines = [
        "# The shared app's dependencies (no torch, torchvision or timm): Community Cloud installs this file,",
        "# found beside the entry script. The oodcore code the pages need is copied into ./oodcore.",
    ]
    for name in LIGHT_REQUIREMENTS:
        try:
            version = metadata.version(name)
            major_minor = ".".join(version.split(".")[:2])
            lines.append(f"{name}>={major_minor}")
        except metadata.PackageNotFoundError:
            lines.append(name)
    return "\n".join(lines) + "\n"


def readme_text(summary: dict, title: str) -> str:
    runs = summary["run_summaries"]
    bench = summary["benchmark"]
    protocol = runs[0].get("protocol", "?") if runs else "?"
    rows = "\n".join(
        f"| {r['arch']} | {r.get('n_id', '?')} | {r.get('n_ood', '?')} | "
        f"{100 * r['bundle']['id_top1']:.1f}% | {len(r['bundle']['defaults'])} | "
        f"{', '.join(r['bundle']['trained']) or '—'} |"
        for r in runs
    )
    live = (
        "Features, the fit split and the final layer are included (`--with-features`), so every method's "
        "sliders stay live."
        if summary["with_features"]
        else "Features are not included: methods that need them (Mahalanobis, KNN, ViM, ReAct, ...) show their "
        "default setting, and their sliders are shown disabled with the reason. Make the folder with "
        "`--with-features` to keep them live (a larger bundle)."
    )
    return f"""# {title}

A read-only [oodcore](https://pypi.org/project/oodcore/) explorer of the **{bench}** benchmark
(protocol: {protocol}): how well each classifier tells in-distribution (ID) images from
out-of-distribution (OOD) ones, with every post-hoc detector.

Pages: **Leaderboard** (architecture × method, AUROC, AUPR-Out/In, both FPR@95s with 95% bootstrap
CIs), **Curves** (ROC/PR overlays, score histograms), **ODIN tuner** (T and ε from the cached grid;
honest tuning on the OOD exposure split vs naive test-set tuning), **Misfires** (the OOD images the
detector is surest are ID, with thumbnails and predicted classes).

Conventions: OOD is the positive class and a higher score means more OOD. FPR@95 (OOD+) is the ID
false-positive rate when 95% of OOD images are caught; FPR@95 (ID+) is the OOD acceptance when 95%
of ID images are kept. Rows tuned with OOD data chose their setting on the OOD exposure split and
are scored on the held-out split only.

## How it was made

`oodcore share --benchmark {bench}` with oodcore {summary["oodcore_version"]} on {summary["created"]}.

| architecture | n ID | n OOD | ID top-1 | methods stored | trained detectors |
| --- | --- | --- | --- | --- | --- |
{rows}

Per architecture the bundle holds every method's per-image scores at its default setting
(computed from the full-precision cache), every trained detector's scores, the ODIN T × ε grid,
the protocol-masked logits in float16 (so Energy's T and ODIN's T at ε = 0 stay live; values at
other settings are computed from float16 logits), labels, predictions (from the full-precision
logits), image paths relative to the dataset roots, and JPEG thumbnails. {live} No file is over
{PART_BYTES // 2**20} MiB; nothing is pickled (`.npy` read with `allow_pickle=False`, JSON).

## Run it

```bash
pip install -r requirements.txt      # numpy, xxhash, pandas, pyarrow, pillow, altair, streamlit: no torch
streamlit run {ENTRY}
```

The oodcore code the pages use is copied into `oodcore/` here (the light modules only: reading the
bundle, metrics, detectors that score from cached values, the explorer's pages); Streamlit puts the
entry script's folder first on the import path, so this copy is the one the app runs.

## Deploy on Streamlit Community Cloud

Push this folder as the root of a GitHub repository and deploy `{ENTRY}`. Community Cloud installs
`requirements.txt` from the entry script's folder and reads `.streamlit/config.toml` only at the
repository root: if you put this folder in a sub-folder of a repository, move `.streamlit/config.toml`
to the repository root (the dependency file may stay beside the entry script).
"""


def size_report(out: Path) -> dict:
    files = [p for p in out.rglob("*") if p.is_file()]
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in files}
    bundle = sum(v for k, v in sizes.items() if k.startswith("bundle/"))
    largest = max(sizes.items(), key=lambda kv: kv[1]) if sizes else ("", 0)
    return {
        "files": len(sizes),
        "total_bytes": sum(sizes.values()),
        "bundle_bytes": bundle,
        "code_bytes": sum(v for k, v in sizes.items() if k.endswith(".py")),
        "largest_file": largest[0],
        "largest_bytes": largest[1],
    }


def format_size_report(report: dict) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    return (
        f"size: {mb(report['total_bytes'])} in {report['files']} files "
        f"(bundle {mb(report['bundle_bytes'])}, code {mb(report['code_bytes'])}); "
        f"largest file {report['largest_file']} ({mb(report['largest_bytes'])}, limit {PART_BYTES // 2**20} MiB)"
    )


PACKAGE_DATA = ("data/ninco",)  # NINCO's ImageNet-O annotation (MIT licence), read by the misfires page's badges


def make_share(
    root: Path,
    benchmark: str,
    archs: list[str] | None,
    out: Path,
    *,
    with_features: bool = False,
    title: str | None = None,
    progress: build.Progress | None = None,
) -> dict:
    """Write the share folder; returns {"summary", "size"}."""
    out = Path(out)
    pages = pages_source()
    if out.exists():
        if any(out.iterdir()) and not (out / ENTRY).is_file():
            raise FileExistsError(f"{out} exists and is not a share folder: pick an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary = build.build_bundle(root, benchmark, archs, out / "bundle", with_features=with_features, progress=progress)
    title = title or f"ImageNet-O explorer · {benchmark}"
    (out / ENTRY).write_text(ENTRY_SCRIPT.format(title=title, created=summary["created"], entry=ENTRY))
    (out / "pages").mkdir()
    scripts = [out / ENTRY]
    for name in READONLY_PAGES:
        shutil.copy2(pages / name, out / "pages" / name)
        scripts.append(out / "pages" / name)
    for path in light_modules(scripts):
        target = out / path.relative_to(PACKAGE.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for data_dir in PACKAGE_DATA:  # package data the copied modules read (with its licence)
        source = PACKAGE / data_dir
        if (out / "oodcore" / Path(data_dir).parent).is_dir() and source.is_dir():
            shutil.copytree(source, out / "oodcore" / data_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "requirements.txt").write_text(requirements_text())
    (out / ".streamlit").mkdir()
    (out / ".streamlit" / "config.toml").write_text(CONFIG_TOML)
    (out / "README.md").write_text(readme_text(summary, title))
    (out / ".gitignore").write_text("__pycache__/\n")
    return {"summary": summary, "size": size_report(out), "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
