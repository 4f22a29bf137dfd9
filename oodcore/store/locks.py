"""Locks of one (benchmark, architecture) folder: kernel `flock`s, so a dead holder never leaves one behind.

* `run_lock(folder)`: exclusive, held by a run (extraction, publishing, garbage collection of
  superseded artifacts) from the name check to `run.json`; a second run of the same pair waits
  (printing who holds it) up to `wait` seconds, then fails with `LockBusy`.
* `reading(folder)`: shared, held while a reader loads a run's artifacts.
* `collecting(folder)`: exclusive and non-blocking, taken by the publisher (already holding the
  run lock) only to delete superseded artifacts; when a reader is loading, nothing is deleted now
  and the leftovers go at the next publish.

The lock files hold the holder's pid and start time for messages only; ownership is the kernel's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

RUN_LOCK, READ_LOCK = ".run.lock", ".read.lock"


class LockBusy(RuntimeError):
    """Another process holds the lock (the message names it)."""


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    started = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid', '?')} (since {started}: {info.get('what', 'a run')})"


@contextlib.contextmanager
def run_lock(
    folder: Path, what: str = "a run", *, wait: float = 3600.0, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the exclusive run lock of `folder`, waiting up to `wait` seconds for another holder."""
    path = Path(folder) / RUN_LOCK
    fd = _open(path)
    try:
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"another run of {Path(folder).parent.name} · {Path(folder).name} is in progress "
                        f"({_holder(path)}); wait for it to finish and run the command again"
                    ) from None
                if not told and say is not None:
                    say(
                        f"waiting for another run of {Path(folder).parent.name} · {Path(folder).name} ({_holder(path)})"
                    )
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.time(), "what": what}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Shared lock while loading a run's artifacts (no-op where the folder cannot be written to)."""
    try:  # never creates the folder: reading a run that does not exist must leave no trace
        fd = os.open(Path(folder) / READ_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # no such run, or a read-only cache (where nobody can delete anything either)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def collecting(folder: Path) -> Iterator[bool]:
    """Try to take the read lock exclusively without waiting; yields whether deleting is safe now."""
    fd = _open(Path(folder) / READ_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
