"""`oodcore share` and `oodcore report`: a deployable read-only app and a static report of a benchmark."""

from __future__ import annotations

import argparse
import sys

from oodcore.store.paths import cache_root


def add_parsers(sub, add_cache) -> None:
    p = sub.add_parser(
        "share",
        help="write a folder that deploys to Streamlit Community Cloud as is (read-only app + compact bundle, no torch)",
        description="Entry script, read-only pages, the light oodcore modules, requirements.txt without torch, "
        ".streamlit/config.toml, a README and a compact bundle (files under 50 MB, no pickle).",
    )
    _add_target(p, "output folder (made; an earlier share folder there is replaced)")
    p.add_argument(
        "--with-features",
        action="store_true",
        help="also bundle features, the fit split and the final layer (float16) so fitted methods' sliders stay live",
    )
    p.add_argument("--title", default=None, help="the app's title in its README and entry script")
    add_cache(p)

    p = sub.add_parser(
        "report",
        help="write a static report: index.html (offline) with the leaderboard, figures as PNG/SVG/CSV, misfires",
        description="Leaderboard with 95%% CIs, AUROC/AUPR-Out/FPR@95 per architecture for each method, ODIN "
        "T x eps heatmaps, ID top-1 vs AUROC, ROC overlays and the top misfire thumbnails.",
    )
    _add_target(p, "output folder")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for 95%% CIs (0 = none)")
    add_cache(p)


def _add_target(p: argparse.ArgumentParser, out_help: str) -> None:
    """--benchmark, --arch and --out, as both commands take them."""
    p.add_argument("--benchmark", required=True, help="benchmark name, as `list` shows it (e.g. demo)")
    p.add_argument("--arch", default=None, help="comma-separated architectures (default: every cached one)")
    p.add_argument("--out", required=True, help=out_help)


def _archs(spec: str | None) -> list[str] | None:
    return [a.strip() for a in spec.split(",") if a.strip()] if spec else None


def _progress(message: str, fraction: float) -> None:
    print(f"\r{message:<56}{100 * fraction:5.1f}%", end="\n" if fraction >= 1 else "", file=sys.stderr, flush=True)


def cmd_share(args: argparse.Namespace, error) -> int:
    from oodcore.share.folder import ENTRY, format_size_report, make_share
    from oodcore.store.cache import CacheMissing

    try:
        result = make_share(
            cache_root(args.cache_dir),
            args.benchmark,
            _archs(args.arch),
            args.out,
            with_features=args.with_features,
            title=args.title,
            progress=_progress,
        )
    except (CacheMissing, FileExistsError, FileNotFoundError) as exc:
        raise error(str(exc)) from None
    summary = result["summary"]
    for run in summary["run_summaries"]:
        info = run["bundle"]
        skipped = "; ".join(f"{k}: {v}" for k, v in info["not_stored"].items())
        print(
            f"{run['arch']}: {run.get('n_id', '?')} ID / {run.get('n_ood', '?')} OOD, "
            f"{len(info['defaults'])} methods' default scores, {len(info['trained'])} trained detector(s)"
            + (f"; not stored: {skipped}" if skipped else "")
        )
    print(format_size_report(result["size"]))
    print(
        f"wrote {args.out}: deploy `{ENTRY}` with the requirements.txt beside it; Community Cloud reads "
        ".streamlit/config.toml only at the repository root (move it there if this folder is a sub-folder)"
    )
    return 0


def cmd_report(args: argparse.Namespace, error) -> int:
    from oodcore.share.report import make_report
    from oodcore.store.cache import CacheMissing

    if args.bootstrap < 0:
        raise error("--bootstrap must be >= 0")
    try:
        result = make_report(
            cache_root(args.cache_dir),
            args.benchmark,
            _archs(args.arch),
            args.out,
            n_boot=args.bootstrap,
            progress=_progress,
        )
    except (CacheMissing, FileNotFoundError) as exc:
        raise error(str(exc)) from None
    print(f"wrote {result['index']} ({result['figures']} figures as PNG, SVG and CSV; opens offline)")
    return 0
