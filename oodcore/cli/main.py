"""`python -m oodcore ...`: build caches, score methods, print study-style tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodcore.cli.checks import (  # noqa: F401
    CliError,
    _check_methods,
    _check_report_args,
    _check_writable,
    _not_trained,
    _positive,
    _say,
    _stderr_progress,
    add_run_safety_arguments,
    guard,
)
from oodcore.cli.verify import add_verify_parser
from oodcore.store.paths import cache_root


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $OODCORE_CACHE, else ./cache)")


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    p.add_argument("--json", dest="json_file", default=None, help="write the report as JSON to FILE")
    p.add_argument("--scores-csv", default=None, help="write one row per image with every method's score")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for 95%% CIs (0 = none)")


def build_parser() -> argparse.ArgumentParser:
    from oodcore.cli.oodsets_args import add_ood_arguments
    from oodcore.data.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(prog="python -m oodcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo",
        help="build (once) and score the offline digits demo benchmark",
        description="ID = digits 0-4, OOD = digits 5-9, a small CNN trained here; every method.",
    )
    _add_cache(p)
    _add_report(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo cache even if it is current")

    p = sub.add_parser(
        "run",
        help="extract and score a real (architecture, ID, OOD, protocol) run",
        description="One pass per split caches logits, features and thumbnails; methods are scored from the cache.",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="model name(s), comma-separated: efficientnet_lite0/1/2 (offline), timm names, or tv:<torchvision name>",
    )
    p.add_argument("--arch-file", default=None, help="file with one architecture name a line (# comments allowed)")
    p.add_argument("--id-dir", required=True, help="ID images: <root>/<wnid>/<img>, or the ImageNet root holding val/")
    p.add_argument("--ood-dir", default=None, help="OOD images, e.g. ImageNet-O as released (<root>/<wnid>/<img>)")
    add_ood_arguments(p)
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default="imagenet-o", help="class mask and ID selection (default imagenet-o)"
    )
    p.add_argument("--name", default=None, help="benchmark name (default: derived from the folders and protocol)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    p.add_argument(
        "--chunk-size", type=int, default=1024, help="images per resumable chunk; under torchrun, the unit of sharding"
    )
    p.add_argument(
        "--odin-grid", action="store_true", help="also precompute ODIN on the T x eps grid (needs the network)"
    )
    p.add_argument("--limit", type=int, default=None, help="at most N ID and N OOD images (quick look)")
    p.add_argument("--ood-list", default=None, help="text file of OOD paths to exclude (or keep, see --ood-list-mode)")
    p.add_argument("--ood-list-mode", choices=("exclude", "keep"), default="exclude")
    p.add_argument(
        "--weights", default=None, help="local weights file (safetensors or a state dict) instead of a download"
    )
    p.add_argument(
        "--fit-dir",
        default=None,
        help="images for fitted detectors (e.g. an ImageNet train subset); default: a seeded split of --id-dir",
    )
    p.add_argument(
        "--fit-per-class",
        type=int,
        default=10,
        help="when the ID root holds train/ (an ImageNet root): seeded fit images per class from train/ (default 10)",
    )
    p.add_argument(
        "--fit-fraction",
        type=float,
        default=0.2,
        help="only without --fit-dir and train/: share of ID images per class held out for fitting (never evaluated)",
    )
    p.add_argument("--no-amp", action="store_true", help="on CUDA, run in float32 instead of mixed precision")
    p.add_argument(
        "--gpu-decode",
        action="store_true",
        help="on CUDA, decode JPEGs on the GPU (nvJPEG; pixels differ slightly from PIL's, so cached apart; "
        "files it cannot decode fall back to the CPU)",
    )
    p.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode JPEGs at least twice the model's resize target at reduced DCT scale (faster; their "
        "logits change slightly, so cached apart)",
    )
    add_run_safety_arguments(p)
    _add_cache(p)
    _add_report(p)

    p = sub.add_parser("list", help="show what is cached")
    _add_cache(p)

    add_verify_parser(sub, _add_cache)

    p = sub.add_parser("methods", help="list the registered methods and their parameters")

    p = sub.add_parser("bench", help="measure the engine against the plain way of doing the same work")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not for reporting)")
    p.add_argument("--json", dest="json_file", default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--images", default=None, help="image folder for the extraction benchmark (default: generated JPEGs)"
    )
    p.add_argument("--cuda", action="store_true", help="also measure resnet50 and the ODIN grid on CUDA (GPU only)")
    p.add_argument(
        "--rss",
        default=None,
        metavar="N,N,...",
        help="also measure extraction's peak RSS at these synthetic image counts (e.g. 2000,8000,32000)",
    )
    p.add_argument(
        "--cold-start", action="store_true", help="also time `streamlit run app.py` to the first rendered page"
    )
    study = p.add_argument_group("synthetic study (--synthetic-study; see oodcore/cli/bench_study.py)")
    study.add_argument(
        "--synthetic-study",
        action="store_true",
        help="measure a synthetic many-architecture study: reports, leaderboard render, app RSS, fit peak RSS",
    )
    study.add_argument("--archs", type=int, default=24, help="architectures in the synthetic study")
    study.add_argument("--n-id", type=int, default=10_000)
    study.add_argument("--n-ood", type=int, default=2_000)
    study.add_argument("--n-fit", type=int, default=10_000)
    study.add_argument("--dim", type=int, default=2048, help="feature dimension")
    study.add_argument(
        "--fit-rows", default="10000,100000,1280000", help="fit-set sizes (float16 rows) for the fit peak-RSS figure"
    )
    study.add_argument(
        "--fit-dim", type=int, default=None, help="feature dimension of the fit-RSS rows (default --dim)"
    )
    study.add_argument(
        "--study-dir", default=None, help="keep the synthetic cache in this folder (default: a temp dir)"
    )

    p = sub.add_parser(
        "export",
        help="write a cached run (logits, features, head, every method's scores) to a plain .npz",
        description="np.savez arrays (load with allow_pickle=False) plus a JSON side file (FILE with a .json suffix).",
    )
    p.add_argument("--benchmark", required=True, help="benchmark name, as `list` shows it (e.g. demo)")
    p.add_argument("--arch", required=True, help="architecture name, as `list` shows it (e.g. digits_cnn)")
    p.add_argument("--npz", required=True, help="output .npz file")
    p.add_argument(
        "--ood",
        default="all",
        metavar="SCOPE",
        help="with several OOD sets: all (default), group:NAME or set:NAME (see `list`)",
    )
    _add_cache(p)

    from oodcore.training.config import add_train_arguments

    p = sub.add_parser(
        "train",
        help="train a detector on a cached run: energy fine-tuning or a normalizing flow",
        description="Energy-bounded fine-tuning (Liu et al. 2020) or a RealNVP flow on pixels (demo) "
        "or cached features; resumable; the detector joins every report, scored on the "
        "held-out OOD rows. See oodcore/jobs.py.",
    )
    add_train_arguments(p)
    _add_cache(p)

    from oodcore.cli import sharing

    sharing.add_parsers(sub, _add_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr and exit status 2 (OODCORE_DEBUG=1 re-raises)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return guard(COMMANDS[args.command], args)


def _report(data, args, root: Path | None = None) -> int:
    from oodcore.detectors import MethodUnavailable
    from oodcore.evaluation.report import format_table, method_names, scores_frame
    from oodcore.evaluation.sets import evaluate_sets, format_sets_table

    try:
        names = method_names(args.methods)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    from oodcore.detectors import get

    unavailable = [n for n in names if not get(n).available(data)]
    names = [n for n in names if n not in unavailable]
    if args.methods == "all":
        names += list(data.trained)
    if args.bootstrap < 0:
        raise CliError("--bootstrap must be >= 0")
    for damaged in data.meta.get("damaged_trained", []):
        print(f"warning: not scored: {damaged}", file=sys.stderr)
    if args.methods == "all" and root is not None and len(data.ood_sets) <= 1:
        report = _stored(root, data, args.bootstrap)
        unavailable += [u["method"] for u in report.get("unavailable", [])]
        report = {k: v for k, v in report.items() if k != "unavailable"}
    else:
        try:
            report = evaluate_sets(data, names, n_boot=args.bootstrap)
        except MethodUnavailable as exc:
            raise CliError(str(exc)) from None
    if unavailable:
        report["unavailable"] = unavailable
    print(format_table(report))
    if report.get("sets"):
        print(format_sets_table(report))
    if unavailable:
        print(f"not scored (the cache lacks what they need): {', '.join(unavailable)}")
    if args.json_file:
        Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_file).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_file}")
    if args.scores_csv:
        Path(args.scores_csv).parent.mkdir(parents=True, exist_ok=True)
        scores_frame(data, names).to_csv(args.scores_csv, index=False)
        print(f"wrote {args.scores_csv}")
    return 0


def _with_fitted_store(data, root):
    """Fitted detector states are read from / saved beside the run (`<run>/fitted/`), so they are fitted once per run."""
    from oodcore.detectors.persist import attach
    from oodcore.store.cache import arch_dir

    attach(data, arch_dir(root, data.benchmark, data.arch))
    return data


def _stored(root: Path, data, n_boot: int) -> dict:
    """The run's full report, read from beside the run when current, else computed now and stored."""
    from oodcore.evaluation.stored import stored_report

    return stored_report(root, data.benchmark, data.arch, n_boot, load=lambda: data)[0]


def cmd_demo(args) -> int:
    from oodcore.extraction import demo
    from oodcore.store import cache

    _check_report_args(args)
    root = cache_root(args.cache_dir)
    if args.rebuild or not demo.is_built(root):
        _check_writable(root)
        print(f"building the demo benchmark under {root} (once; seconds on a CPU)", file=sys.stderr)
    demo.build_demo(root, force=args.rebuild, progress=_stderr_progress(), log=_say)
    return _report(_with_fitted_store(cache.load_benchmark(root, demo.BENCHMARK, demo.ARCH), root), args, root)


def cmd_run(args) -> int:
    from oodcore.cli.study_run import arch_list, study_report
    from oodcore.data.folders import DatasetError
    from oodcore.extraction.distributed import Dist
    from oodcore.extraction.runner import RunOptions, run_study
    from oodcore.store import cache

    try:
        archs = arch_list(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if len(archs) > 1 and args.methods != "all":
        raise CliError("--methods works with one architecture; a multi-architecture study reports every method")
    for flag in ("batch_size", "limit", "fit_per_class", "chunk_size"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.workers < 0:
        raise CliError("--workers must be >= 0")
    if args.bootstrap < 0:
        raise CliError("--bootstrap must be >= 0")
    for flag in ("id_dir", "ood_dir"):
        if getattr(args, flag) is not None and not Path(getattr(args, flag)).exists():
            raise CliError(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist")
    sets, tune, subsets = _ood_sets(args)
    if not 0 < args.fit_fraction < 1:
        raise CliError(f"--fit-fraction must be between 0 and 1 (got {args.fit_fraction})")
    if args.fit_dir and not Path(args.fit_dir).is_dir():
        raise CliError(f"--fit-dir {args.fit_dir} is not a folder")
    if args.ood_list and not Path(args.ood_list).is_file():
        raise CliError(f"--ood-list {args.ood_list} is not a file")
    if args.weights and args.weights != "random" and not Path(args.weights).expanduser().is_file():
        raise CliError(f"--weights {args.weights} is not a file (or 'random' for random weights)")
    if args.lock_wait < 0:
        raise CliError(f"--lock-wait must be >= 0 (got {args.lock_wait})")
    _check_report_args(args)
    _check_writable(cache_root(args.cache_dir))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda was asked for but no CUDA device is available")
    dist = Dist.from_env(args.device)
    root = cache_root(args.cache_dir)
    from oodcore.models.registry import WeightsUnavailableError

    datas = []
    try:
        for i, arch in enumerate(archs):
            opts = RunOptions(
                arch=arch,
                id_dir=args.id_dir,
                ood_dir=args.ood_dir,
                protocol=args.protocol,
                name=args.name,
                device=dist.device if dist.active else args.device,
                batch_size=args.batch_size,
                workers=args.workers,
                odin_grid=args.odin_grid,
                limit=args.limit,
                ood_list=args.ood_list,
                ood_list_mode=args.ood_list_mode,
                ood_sets=sets,
                tune_ood=tune,
                ood_subsets=subsets,
                weights=args.weights,
                amp=not args.no_amp,
                fit_dir=args.fit_dir,
                fit_fraction=args.fit_fraction,
                fit_per_class=args.fit_per_class,
                chunk_size=args.chunk_size,
                gpu_decode=args.gpu_decode,
                draft=args.jpeg_draft,
                label=f"[{i + 1}/{len(archs)}] " if len(archs) > 1 else "",
                replace=args.replace,
                lock_wait=args.lock_wait,
                feature_dtype=args.feature_dtype,
                log=_say,
            )
            if len(archs) > 1 and dist.is_main:
                print(f"[{i + 1}/{len(archs)}] {arch}", file=sys.stderr, flush=True)
            benchmark, _ = run_study(opts, root, dist=dist)
            if dist.is_main:
                datas.append(_with_fitted_store(cache.load_benchmark(root, benchmark, arch), root))
    except (DatasetError, WeightsUnavailableError, ValueError) as exc:
        raise CliError(str(exc)) from None
    finally:
        dist.close()
    if not dist.is_main:
        return 0  # rank 0 reports
    for data in datas:
        if data.meta.get("skipped"):
            print(f"skipped {len(data.meta['skipped'])} unreadable file(s) [{data.arch}]:", file=sys.stderr)
            for s in data.meta["skipped"][:20]:
                print(f"  [{s['split']}] {s['path']}: {s['error']}", file=sys.stderr)
    for note in datas[0].meta.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"benchmark {datas[0].benchmark!r} cached under {root}; {datas[0].meta.get('fit_split', '')}")
    if len(datas) == 1:
        return _report(datas[0], args, root)
    return study_report(datas, args, root, _stored)


def _ood_sets(args):
    from oodcore.cli.oodsets_args import ood_sets_from_args
    from oodcore.data.folders import DatasetError

    try:
        return ood_sets_from_args(args)
    except DatasetError as exc:
        raise CliError(str(exc)) from None


def cmd_list(args) -> int:
    from oodcore.cli.verify import run_list

    return run_list(args)


def cmd_methods(args) -> int:
    from oodcore.detectors import REGISTRY

    for m in REGISTRY.values():
        params = (
            ", ".join(f"{p.name}={p.default:g} [{p.low:g}..{p.high:g}, {p.scale}]" for p in m.params) or "no parameters"
        )
        print(f"{m.name:<16} {m.label:<21} {params}\n{'':<16} {m.paper}")
    return 0


def cmd_bench(args) -> int:
    if args.synthetic_study:
        for flag in ("archs", "n_id", "n_ood", "n_fit", "dim"):
            _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
        from oodcore.cli.bench_study import run_study_bench

        return run_study_bench(args)
    from oodcore.cli.bench import run_bench

    return run_bench(args)


def cmd_export(args) -> int:
    from oodcore.evaluation.export import export_run
    from oodcore.store.cache import CacheMissing, load_benchmark

    root = cache_root(args.cache_dir)
    from oodcore.store.scopes import select

    if Path(args.npz).is_dir():
        raise CliError(f"--npz {args.npz} is a folder, not a file")
    try:
        data = select(_with_fitted_store(load_benchmark(root, args.benchmark, args.arch), root), args.ood)
    except (CacheMissing, ValueError) as exc:
        raise CliError(str(exc)) from None
    npz, side = export_run(data, args.npz)
    print(f"wrote {npz} and {side}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "list": cmd_list,
    "methods": cmd_methods,
    "bench": cmd_bench,
    "export": cmd_export,
}


def cmd_train(args) -> int:
    from oodcore.extraction import demo
    from oodcore.store import cache
    from oodcore.training.files import JobError
    from oodcore.training.launch import cli_train

    root = cache_root(args.cache_dir)
    if args.bootstrap < 0:
        raise CliError(f"--bootstrap must be >= 0 (got {args.bootstrap})")
    if args.benchmark == "demo" and not args.resume:
        if not demo.is_built(root):
            _check_writable(root)
            print(f"building the demo benchmark under {root} first (once; seconds on a CPU)", file=sys.stderr)
        demo.build_demo(root, progress=_stderr_progress(), log=_say)  # recomputes only damaged files
    elif args.benchmark and args.arch:
        problems = [e for e in cache.verify_run(root, args.benchmark, args.arch, full=False) if _not_trained(e)]
        if problems and not isinstance(problems[0], cache.CacheMissing):
            raise CliError(str(problems[0]))
    try:
        return cli_train(args, root)
    except JobError as exc:
        raise CliError(str(exc)) from None


COMMANDS["train"] = cmd_train


def cmd_share(args) -> int:
    from oodcore.cli.sharing import cmd_share as share

    return share(args, CliError)


def cmd_report(args) -> int:
    from oodcore.cli.sharing import cmd_report as report

    return report(args, CliError)


COMMANDS["share"] = cmd_share
COMMANDS["report"] = cmd_report


def cmd_verify(args) -> int:
    from oodcore.cli.verify import run_verify

    return run_verify(args)


COMMANDS["verify"] = cmd_verify
