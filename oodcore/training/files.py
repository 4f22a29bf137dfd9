"""The files of a training job: its folder, status, loss log, checkpoints, cancel flag and the cache's lock.

Everything here is plain file I/O (atomic JSON, CSV, safetensors; no pickle), shared by the
job loop (oodcore.training.jobs) and the app's Training page, which reads a job's state from these
files so it survives page reloads. Layout: see oodcore.training.jobs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

from oodcore.store import cache as C
from oodcore.store.atomic import atomic_path, read_json, write_json

JOBS_DIR = "jobs"
LOCK_FILE = ".train.lock"
STATES = ("queued", "running", "done", "failed", "cancelled")
LOSS_FILE, STATUS_FILE, RESULT_FILE, CONFIG_FILE = "loss.csv", "status.json", "result.json", "config.json"
CHECKPOINT_FILE, OPTIMIZER_FILE, CANCEL_FILE = "checkpoint.safetensors", "optimizer.safetensors", "cancel"
LAUNCHER_FILE, LOG_FILE = "launcher.json", "log.txt"
LOSS_COLUMNS = ("epoch", "step", "global_step", "loss", "id_term", "ood_term", "grad_norm", "seconds")


class JobError(Exception):
    """A user mistake or a missing input: one clear line (the CLI turns it into CliError)."""


class JobBusy(JobError):
    """Another training job holds this cache's lock."""


# ------------------------------------------------------------------ folders, status, lock


def jobs_dir(root: Path, benchmark: str, arch: str) -> Path:
    return C.arch_dir(root, benchmark, arch) / JOBS_DIR


def job_dir(root: Path, benchmark: str, arch: str, job_id: str) -> Path:
    return jobs_dir(root, benchmark, arch) / C.safe_name(job_id)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _proc_start(pid: int) -> str | None:
    """The process start time (Linux), to tell a live lock holder from a reused pid."""
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


UNVERIFIED_LOCK_SECONDS = 3600  # a lock whose owner cannot be verified expires this long after it was taken


def _holder_alive(info: dict) -> bool:
    """A live pid with the recorded start time; with no start time to compare (a hand-made lock, no /proc),
    a live pid holds the lock for at most UNVERIFIED_LOCK_SECONDS after `started`."""
    pid = info.get("pid")
    if not pid_alive(pid):
        return False
    recorded, now = info.get("pid_start"), _proc_start(pid)
    if recorded is not None and now is not None:
        return recorded == now
    try:
        started = float(info.get("started"))
    except (TypeError, ValueError):
        return False
    return time.time() - started < UNVERIFIED_LOCK_SECONDS


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_FILE


def read_lock(root: Path) -> dict | None:
    """The live lock holder {"pid", "job_id", "benchmark", "arch", "started"}, or None."""
    path = lock_path(root)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # being written right now (created, not yet filled) counts as held for a few seconds
        try:
            fresh = time.time() - path.stat().st_mtime < 5
        except OSError:
            return None
        return {"pid": None, "job_id": "?", "started": None} if fresh else None
    return info if _holder_alive(info) else None


def busy_message(info: dict) -> str:
    return (
        f"another training job is running on this cache: {info.get('job_id', '?')} "
        f"(pid {info.get('pid', '?')}, {info.get('benchmark', '?')} · {info.get('arch', '?')}); "
        "wait for it or cancel it first (one training job per cache)"
    )


def acquire_lock(root: Path, job_id: str, benchmark: str, arch: str) -> None:
    """Take the cache's training lock (O_EXCL); a lock whose pid is dead is taken over."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "job_id": job_id,
        "benchmark": benchmark,
        "arch": arch,
        "started": time.time(),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(root)
            if holder is not None:
                raise JobBusy(busy_message(holder)) from None
            # stale: move it aside under a unique name, then retry; if what we moved turns out to be a
            # live lock (another taker replaced the stale one in between), put it back and give up
            aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            try:
                moved = json.loads(aside.read_text())
            except (OSError, ValueError):
                moved = {}
            if _holder_alive(moved):
                os.replace(aside, path)
                raise JobBusy(busy_message(moved))
            aside.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        return
    raise JobBusy("could not take the training lock (another job is starting); try again")


def release_lock(root: Path) -> None:
    path = lock_path(root)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def write_status(folder: Path, status: dict) -> None:
    write_json(folder / STATUS_FILE, {**status, "updated": time.time()})


def read_status(folder: Path) -> dict | None:
    """A job's status; a running/queued job whose process is gone reads as failed (interrupted)."""
    try:
        status = read_json(folder / STATUS_FILE)
    except (OSError, ValueError):
        return None
    status.setdefault("job_id", folder.name)
    state = status.get("state")
    if state == "running" and not pid_alive(status.get("pid")):
        status.update(
            state="failed",
            interrupted=True,
            message=f"the training process (pid {status.get('pid')}) ended without finishing "
            f"(killed?) after epoch {status.get('epoch', 0)}; start it again to resume",
        )
    elif state == "queued":
        try:
            launcher = read_json(folder / LAUNCHER_FILE)
        except (OSError, ValueError):
            launcher = {}
        if launcher and not pid_alive(launcher.get("pid")) and time.time() - float(status.get("updated", 0)) > 2:
            status.update(
                state="failed",
                interrupted=True,
                message=f"the training process exited before it started; see {folder / LOG_FILE}",
            )
    return status


def list_jobs(root: Path, benchmark: str, arch: str) -> list[dict]:
    """Every job of a run, most recently updated first."""
    base = jobs_dir(root, benchmark, arch)
    out = []
    for folder in sorted(base.glob("*/")) if base.is_dir() else []:
        status = read_status(folder)
        if status is not None:
            out.append(status)
    return sorted(out, key=lambda s: -float(s.get("updated", 0)))


def read_result(folder: Path) -> dict | None:
    try:
        return read_json(folder / RESULT_FILE)
    except (OSError, ValueError):
        return None


def read_loss(folder: Path):
    """The loss log as a DataFrame (a half-written last line is dropped)."""
    import pandas as pd

    path = folder / LOSS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=list(LOSS_COLUMNS))
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({k: float(row[k]) for k in LOSS_COLUMNS if row.get(k) not in (None, "")})
            except (TypeError, ValueError):
                continue
    frame = pd.DataFrame(rows, columns=list(LOSS_COLUMNS))
    return frame.dropna(subset=["global_step"])


def request_cancel(root: Path, benchmark: str, arch: str, job_id: str, *, force: bool = False) -> str:
    """Ask a job to stop: the cancel flag (checked before every step); force: SIGTERM its process group too."""
    folder = job_dir(root, benchmark, arch, job_id)
    if not folder.is_dir():
        raise JobError(f"no job {job_id!r} for {benchmark} · {arch}")
    (folder / CANCEL_FILE).write_text(str(time.time()))
    status = read_status(folder) or {}
    pid = status.get("pid")
    if force and pid_alive(pid):
        try:
            os.killpg(os.getpgid(int(pid)), signal.SIGTERM)
            return f"sent SIGTERM to job {job_id} (pid {pid})"
        except (ProcessLookupError, PermissionError, OSError) as exc:
            return f"asked job {job_id} to stop (SIGTERM failed: {exc})"
    return f"asked job {job_id} to stop after its current step"


# ------------------------------------------------------------------ checkpoints (safetensors, no pickle)


def save_checkpoint(folder: Path, model, optimizer, meta: dict) -> None:
    """Optimizer state first, then the model: the model file's epoch is the commit point."""
    import torch
    from safetensors.torch import save_file

    meta_s = {"meta": json.dumps(meta)}
    state = optimizer.state_dict()
    tensors = {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().clone().contiguous()
    _atomic_safetensors(
        folder / OPTIMIZER_FILE, tensors, {**meta_s, "param_groups": json.dumps(state["param_groups"])}, save_file
    )
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _atomic_safetensors(folder / CHECKPOINT_FILE, weights, meta_s, save_file)


def _atomic_safetensors(path: Path, tensors: dict, metadata: dict, save_file) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(folder: Path, model, optimizer=None) -> dict:
    """Restore the model (and the optimizer when its file belongs to the same epoch); returns the meta."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = folder / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    model.load_state_dict(load_file(str(path)))
    meta["optimizer_restored"] = False
    opt_path = folder / OPTIMIZER_FILE
    if optimizer is not None and opt_path.is_file():
        with safe_open(str(opt_path), framework="pt") as fh:
            md = fh.metadata()
            if json.loads(md["meta"]).get("epoch") == meta.get("epoch"):
                state: dict[int, dict] = {}
                for name in fh.keys():
                    _, idx, key = name.split(".", 2)
                    state.setdefault(int(idx), {})[key] = fh.get_tensor(name)
                optimizer.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
                meta["optimizer_restored"] = True
    return meta


def checkpoint_epoch(folder: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(folder / CHECKPOINT_FILE), framework="pt") as fh:
            return int(json.loads(fh.metadata()["meta"])["epoch"])
    except Exception:
        return None


LAUNCHED_ENV = "OODCORE_TRAIN_LAUNCHED"


def _launched_for_me(folder: Path) -> bool:
    """Started by the app's launcher, which cleared the cancel flag itself (a cancel since then counts)."""
    return os.environ.get(LAUNCHED_ENV) == folder.name
