"""Entry points of a training job: the `oodcore train` command and the app's background launcher."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from oodcore.store.atomic import write_json
from oodcore.training.config import TrainConfig, config_from_args, config_to_argv, detector_name
from oodcore.training.files import (
    CANCEL_FILE,
    LAUNCHED_ENV,
    LAUNCHER_FILE,
    LOG_FILE,
    JobBusy,
    JobError,
    busy_message,
    job_dir,
    pid_alive,
    read_lock,
    read_status,
    write_status,
)
from oodcore.training.jobs import _resolve_job, run_job


def cli_train(args, root: Path, out=None) -> int:
    """`python -m oodcore train ...`: run in the foreground with progress lines; JobError for mistakes."""
    out = out or sys.stderr
    cfg = None if args.resume else config_from_args(args)
    if args.bootstrap < 0:
        raise JobError("--bootstrap must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise JobError("--threads must be at least 1")
    cancel = threading.Event()
    restore = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum, frame):  # the app's force-stop: finish the step, keep the checkpoint, exit
            cancel.set()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills

        restore = signal.signal(signal.SIGTERM, on_term)
    state = {"t": time.perf_counter()}

    def show(event: str, status: dict) -> None:
        if event == "start":
            print(
                f"training {status['label']} · job {status['job_id']}"
                + (f" (resumed from epoch {status['resumed_from']})" if status.get("resumed_from") else ""),
                file=out,
            )
        elif event == "step" and time.perf_counter() - state["t"] > 2:
            print(f"  {status['message']}", file=out, flush=True)
            state["t"] = time.perf_counter()
        elif event == "epoch":
            print(f"  {status['message']}", file=out, flush=True)
            state["t"] = time.perf_counter()
        elif event == "end":
            print(status["message"], file=out, flush=True)

    try:
        status = run_job(
            root,
            cfg,
            resume=args.resume,
            fresh=args.fresh,
            progress=show,
            cancel_event=cancel,
            n_boot=args.bootstrap,
            threads=args.threads,
        )
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    if status["state"] != "done":
        print(f"job {status['job_id']} {status['state']}: {status['message']}", file=out)
        return 1
    result = status["result"]
    print(_result_table(result))
    if args.json_file:
        Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_file).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_file}")
    return 0


def _result_table(result: dict) -> str:
    b = result["baseline"]
    lines = [
        f"{result['label']} · {result['benchmark']} · {result['arch']} · job {result['job_id']}",
        f"{result['note']}",
        f"{'detector':<30}{'AUROC':>9}{'AUPR-Out':>10}{'AUPR-In':>9}{'FPR95':>8}{'FPR95-In':>10}",
    ]
    for name, row in ((result["name"], result), (f"{b['method']} (untuned baseline)", b)):
        lines.append(
            f"{name:<30}"
            + "".join(
                f"{100 * row[k]:>{w}.1f}"
                for k, w in (("auroc", 9), ("aupr_out", 10), ("aupr_in", 9), ("fpr95", 8), ("fpr95_in", 10))
            )
        )
    lines.append(
        f"{result['seconds']:.1f} s · {result['epochs_done']}/{result['epochs']} epochs"
        + (f" · stopped early: {result['stopped_early']}" if result.get("stopped_early") else "")
    )
    lines.append(
        f"published as trained detector '{result['name']}': it appears in `python -m oodcore demo`/`run` "
        "reports and on every app page"
    )
    return "\n".join(lines)


def start_job_process(root: Path, cfg: TrainConfig, *, fresh: bool = False) -> str:
    """Start `python -m oodcore train ...` as a detached process (the app's Start button); returns the job id.

    JobBusy when a job already runs on this cache; JobError when the options cannot work.
    """
    root = Path(root)
    with _launch_guard(root):  # two clicks (or two sessions) launch one job at most
        holder = read_lock(root)
        if holder is not None:
            raise JobBusy(busy_message(holder))
        cfg, run, job_id = _resolve_job(root, cfg)
        starting = _starting_job(root)
        if starting is not None:
            if starting == job_id:
                return job_id  # the same job is already starting: a double click launches it once
            raise JobBusy(
                f"another training job ({starting}) is starting on this cache; wait for it or cancel it first"
            )
        return _launch(root, cfg, job_id, fresh)


@contextlib.contextmanager
def _launch_guard(root: Path):
    """An exclusive kernel lock around check-and-launch (released when the process ends, so it never goes stale)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LAUNCH_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


LAUNCH_LOCK = ".train.launch.lock"


def _starting_job(root: Path) -> str | None:
    """A job launched by a live launcher that has not yet taken the training lock (state still `queued`)."""
    for launcher in Path(root).glob(f"*/*/jobs/*/{LAUNCHER_FILE}"):
        status = read_status(launcher.parent) or {}
        if status.get("state") != "queued":
            continue
        try:
            info = json.loads(launcher.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(info.get("pid")):
            return launcher.parent.name
    return None


def _launch(root: Path, cfg: TrainConfig, job_id: str, fresh: bool) -> str:
    folder = job_dir(root, cfg.benchmark, cfg.arch, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CANCEL_FILE).unlink(missing_ok=True)
    previous = read_status(folder) or {}
    write_status(
        folder,
        {
            "job_id": job_id,
            "kind": cfg.kind,
            "name": detector_name(cfg),
            "label": "",
            "benchmark": cfg.benchmark,
            "arch": cfg.arch,
            "state": "queued",
            "epoch": 0,
            "total": cfg.epochs,
            "step": 0,
            "steps": 0,
            "pid": None,
            "started": time.time(),
            "message": "starting the training process",
            "config": cfg.to_dict(),
            "previous_state": previous.get("state"),
        },
    )
    argv = [sys.executable, "-m", "oodcore", "train", *config_to_argv(cfg), "--cache-dir", str(root)]
    if fresh:
        argv.append("--fresh")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[LAUNCHED_ENV] = job_id
    with open(folder / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    write_json(folder / LAUNCHER_FILE, {"pid": proc.pid, "argv": argv, "started": time.time()})
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends (no zombie)
    return job_id
