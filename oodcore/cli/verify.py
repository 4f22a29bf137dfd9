"""`python -m oodcore verify [--repair]`: check every cached file against its recorded size and checksum.

Problems are printed one per line with the file and the command that repairs them; `--repair`
recomputes what can be recomputed here (the demo's damaged or missing files, with identical
numbers) and, for real runs, names the exact `run` command (it needs the image folders).
Exit status 0 when everything is intact (or repaired), 1 otherwise.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from oodcore.store.paths import cache_root


def add_verify_parser(sub, add_cache) -> None:
    p = sub.add_parser(
        "verify",
        help="check every cached file against its recorded size and checksum (--repair: recompute what can be)",
        description="Checks each run's run.json, artifacts and trained detectors. --repair rebuilds what can be "
        "recomputed here (the demo's damaged files, identical numbers) and prints the exact command for the rest.",
    )
    p.add_argument("--repair", action="store_true", help="recompute damaged or missing files where possible")
    p.add_argument("--benchmark", default=None, help="only this benchmark")
    p.add_argument("--arch", default=None, help="only this architecture")
    add_cache(p)


def run_verify(args) -> int:
    """Check every run (or one); with --repair recompute what can be recomputed here."""
    from oodcore.extraction import demo
    from oodcore.store import cache

    root = cache_root(args.cache_dir)
    if not root.is_dir():
        print(f"error: no cache folder at {root}", file=sys.stderr)
        return 2
    targets = sorted(
        {(p.parent.parent.name, p.parent.name) for p in root.glob(f"*/*/{cache.RUN_FILE}")}
        | {(p.parent.name, p.name) for p in root.glob("*/*") if p.is_dir() and any(p.glob("*-*.[an][rp][rz]*"))}
    )
    targets = [(b, a) for b, a in targets if (args.benchmark in (None, b)) and (args.arch in (None, a))]
    if not targets:
        print(f"nothing cached under {root}" + (" matching the filter" if args.benchmark or args.arch else ""))
        return 0
    bad = 0
    for benchmark, arch in targets:
        problems = cache.verify_run(root, benchmark, arch, full=True, fitted=True)
        if args.repair:  # damaged fitted states are refitted on next use: removing them repairs them
            for exc in [e for e in problems if e.repair == cache.FITTED_REPAIR and e.path]:
                damaged = Path(exc.path)
                if damaged.parent.suffix == ".arrays":  # a file of a stored per-split table: the whole table
                    damaged = damaged.parent
                if damaged.is_dir():
                    shutil.rmtree(damaged, ignore_errors=True)
                else:
                    damaged.unlink(missing_ok=True)
                print(f"{benchmark} · {arch}: {exc.what}: removed (refitted on next use)")
            problems = [e for e in problems if e.repair != cache.FITTED_REPAIR]
        if args.repair and problems and "old cache format 1" in problems[0].what:
            print(f"{benchmark} · {arch}: converting cache format 1 (.npz) to memory-mapped .npy folders")
            try:
                cache.migrate_v1(cache.arch_dir(root, benchmark, arch))
            except cache.CacheError as exc:
                print(f"{benchmark} · {arch}: cannot convert: {exc}")
            problems = cache.verify_run(root, benchmark, arch, full=True, fitted=True)
        if problems and args.repair and benchmark == demo.BENCHMARK and arch == demo.ARCH:
            for exc in problems:
                print(f"{benchmark} · {arch}: {exc.what}: recomputing")
            demo.build_demo(root, log=lambda m: None)
            problems = cache.verify_run(root, benchmark, arch, full=True, fitted=True)
            if not problems:
                print(f"{benchmark} · {arch}: repaired")
                continue
        if not problems:
            print(f"{benchmark} · {arch}: ok")
            continue
        bad += 1
        for exc in problems:
            print(f"{benchmark} · {arch}: {exc}")
    if bad:
        print(f"{bad} run(s) need repair" + ("" if args.repair else " (run with --repair where it can be recomputed)"))
    return 1 if bad else 0


def run_list(args) -> int:
    from oodcore.store.cache import list_runs

    root = cache_root(args.cache_dir)
    damaged: list = []
    runs = list_runs(root, damaged=damaged)
    for exc in damaged:
        print(f"damaged: {exc}")
    if not runs:
        print(f"nothing {'usable ' if damaged else ''}cached under {root} (try `python -m oodcore demo`)")
        return 0
    print(f"{'benchmark':<40} {'arch':<26} {'protocol':<18} {'n_id':>7} {'n_ood':>6} {'skipped':>7}  extras")
    for r in runs:
        extras = [x for x in ("odin_id", "fit", "head") if x in r["files"]]
        print(
            f"{r['benchmark']:<40} {r['arch']:<26} {r['protocol']:<18} {r['n_id']:>7} {r['n_ood']:>6} "
            f"{len(r.get('skipped', [])):>7}  {','.join(e.replace('odin_id', 'odin-grid') for e in extras)}"
        )
        if len(r.get("ood_sets") or []) > 1 or r.get("tune_set"):
            sets = ", ".join(
                f"{s['name']}{'/' + s['group'] if s.get('group') else ''} ({s['n']})" for s in r["ood_sets"]
            )
            tune = f"; tuning set {r['tune_set']['name']} ({r['tune_set']['n']})" if r.get("tune_set") else ""
            print(f"{'':<40} OOD sets: {sets}{tune}")
    return 0
