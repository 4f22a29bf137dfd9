"""Argument checks every command runs before any model loads or any image is read.

A failed check is a CliError: one clear line on stderr and exit status 2 (oodcore.cli.main).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class CliError(Exception):
    """A user mistake: printed as one clear line, exit status 2."""


def _check_methods(spec: str) -> list[str]:
    """The --methods list, checked before anything is loaded: known names, at least one."""
    from oodcore.evaluation.report import method_names

    try:
        names = method_names(spec)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not names:
        raise CliError(f"--methods {spec!r} names no method; give comma-separated names or 'all' (see `methods`)")
    return names


def _check_report_args(args) -> None:
    _check_methods(args.methods)
    if args.bootstrap < 0:
        raise CliError(f"--bootstrap must be >= 0 (got {args.bootstrap})")
    for flag in ("json_file", "scores_csv"):
        target = getattr(args, flag, None)
        if target and Path(target).is_dir():
            raise CliError(f"--{flag.replace('_file', '').replace('_', '-')} {target} is a folder, not a file")


def _check_writable(root: Path) -> None:
    """The cache folder must be creatable and writable before any model loads or image is read."""
    import tempfile

    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise CliError(
            f"the cache folder {root} is not writable ({exc.strerror or exc}); "
            "choose another with --cache-dir or $OODCORE_CACHE"
        ) from None


def add_run_safety_arguments(p) -> None:
    """`run`'s flags for storage and concurrency: --feature-dtype, --replace, --lock-wait."""
    p.add_argument(
        "--feature-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="how cached features are stored (float16 halves their size; logits stay float32)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="reuse a --name that already holds runs of other folders (otherwise refused)",
    )
    p.add_argument(
        "--lock-wait",
        type=float,
        default=3600.0,
        help="seconds to wait for another run of the same benchmark and architecture (default 3600)",
    )


def _not_trained(exc) -> bool:
    return "trained detector" not in getattr(exc, "what", "")


def guard(command, args) -> int:
    """Run a command; every error is one line on stderr and exit status 2 (OODCORE_DEBUG=1 re-raises)."""
    from oodcore.store.integrity import CacheError
    from oodcore.store.locks import LockBusy

    try:
        return command(args)
    except KeyboardInterrupt:
        print("interrupted: finished chunks are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (CliError, CacheError, LockBusy) as exc:
        return _fail(str(exc))
    except OSError as exc:
        if os.environ.get("OODCORE_DEBUG"):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"cannot use{where}: {exc.strerror or exc} (check the path, its permissions and free space)")
    except Exception as exc:  # a bug: still one line, with a way to see the traceback
        if os.environ.get("OODCORE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _fail(f"unexpected {type(exc).__name__}: {first} (set OODCORE_DEBUG=1 to see the traceback)")


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stderr_progress():
    state = {"last": None}

    def show(message: str, fraction: float) -> None:
        line = f"\r{message:<60} {100 * fraction:5.1f}%"
        if line != state["last"]:
            print(line, end="", file=sys.stderr, flush=True)
            state["last"] = line
        if fraction >= 1:
            print(file=sys.stderr)

    return show


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise CliError(f"{flag} must be at least 1 (got {value})")
