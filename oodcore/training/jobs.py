"""Training runs as resumable jobs, shared by `python -m oodcore train ...` and the app's Training page.

A job trains one detector (energy fine-tuning, oodcore.training.energy; a normalizing flow,
oodcore.training.flow) on a cached run and publishes its scores with `cache.save_trained`, so it
joins every report and page, scored on the held-out OOD rows only. Its files:

    <cache>/.train.lock                          one training job per cache: {"pid", "job_id", ...},
                                                 created with O_EXCL; a dead pid's lock is taken over
    <cache>/<benchmark>/<arch>/jobs/<job_id>/
        config.json         the resolved options (what `--resume JOB_ID` restarts from)
        status.json         state (queued|running|done|failed|cancelled), epoch/total, step/steps,
                            message, pid, started, updated; always replaced atomically
        loss.csv            one row per optimisation step
        checkpoint.safetensors, optimizer.safetensors   after every epoch (epoch 0 = the start);
                            tensors only (no pickle), the epoch and options in the metadata
        result.json         when done: the report row, the baseline, seconds, stopped_early
        cancel              flag file: the loop checks it before every step
        launcher.json, log.txt   when started from the app: the launcher's pid, the process output

The job id is `<detector name>-<8 hex>` where the hex hashes the options and the run's
artifact files, so the same options on the same cache always map to the same job:

* starting an unfinished job again (cancelled, failed, killed) resumes it from its last
  checkpoint (the partial epoch is redone; shuffling and noise are seeded per epoch, so a
  resumed run matches an uninterrupted one); `--fresh` starts it over;
* starting a finished job again trains it again from scratch;
* `--resume JOB_ID` resumes a job by id with the options stored in its config.json.

Stability: gradients are clipped (`--clip`); a non-finite loss, gradient norm or parameter
stops the run, restores the last good checkpoint, scores that model and says so in
`stopped_early`.
"""

from __future__ import annotations

import csv
import math
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from oodcore.store import cache as C
from oodcore.store.atomic import read_json, write_json
from oodcore.training.config import TrainConfig, detector_name, job_id_for, resolve
from oodcore.training.files import (
    CANCEL_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    JOBS_DIR,
    LOSS_COLUMNS,
    LOSS_FILE,
    OPTIMIZER_FILE,
    RESULT_FILE,
    JobError,
    _launched_for_me,
    acquire_lock,
    checkpoint_epoch,
    job_dir,
    jobs_dir,
    load_checkpoint,
    read_result,
    read_status,
    release_lock,
    save_checkpoint,
    write_status,
)
from oodcore.training.tasks import Task


def finished_runs(root: Path, benchmark: str, arch: str, run: dict | None = None) -> list[dict]:
    """result.json of every finished job of a run, newest first.

    With `run` (its run.json), only jobs trained on its current artifacts; each result gets
    `published`: whether its detector is the one now published under its name (a later run of
    the same variant replaces it).
    """
    base = jobs_dir(root, benchmark, arch)
    results = [r for r in (read_result(f) for f in base.glob("*/")) if r] if base.is_dir() else []
    if run is not None:

        def current(r: dict) -> bool:
            try:
                return job_id_for(TrainConfig.from_dict(r["options"]), run) == r.get("job_id")
            except (KeyError, TypeError):
                return False

        results = [r for r in results if current(r)]
    for r in results:
        try:
            meta = read_json(C.trained_paths(C.arch_dir(root, benchmark, arch), r["name"])[0])
            r["published"] = meta.get("job_id") == r.get("job_id") and meta.get("epochs_done") == r.get("epochs_done")
        except (OSError, ValueError, KeyError):
            r["published"] = False
    return sorted(results, key=lambda r: -float(r.get("finished", 0)))


def build_task(c: TrainConfig, data, root: Path) -> Task:
    if c.kind == "energy":
        from oodcore.training.energy import build_energy_task

        return build_energy_task(c, data, root)
    from oodcore.training.flow import build_flow_task

    return build_flow_task(c, data, root)


Progress = Callable[[str, dict], None]  # (event: start|step|epoch|end, status)


def run_job(
    root: Path,
    cfg: TrainConfig | None = None,
    *,
    resume: str | None = None,
    fresh: bool = False,
    progress: Progress | None = None,
    cancel_event: threading.Event | None = None,
    n_boot: int = 200,
    threads: int | None = None,
) -> dict:
    """Train (or resume) one job in this process and publish its detector; returns the job's final status.

    The returned status has `state` done (with `result`), cancelled or failed; JobError/JobBusy
    are raised before anything is written when the options or the cache cannot work.
    """
    root = Path(root)
    if resume:
        cfg = _config_of(root, resume, cfg)
    if cfg is None:
        raise JobError("nothing to train: give a config or --resume JOB_ID")
    cfg, run, job_id = _resolve_job(root, cfg)
    if resume and resume != job_id:
        raise JobError(f"job {resume} was made on other cached artifacts (now {job_id}); start it with --fresh")
    folder = job_dir(root, cfg.benchmark, cfg.arch, job_id)
    acquire_lock(root, job_id, cfg.benchmark, cfg.arch)
    import torch

    threads_before = torch.get_num_threads()
    threads = threads or (1 if cfg.benchmark == "demo" else None)
    if threads:
        torch.set_num_threads(threads)
    status: dict = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        previous = read_status(folder) or {}
        # the app's launcher marks the job queued; what counts is the state before that
        prev_state = previous.get("previous_state") if previous.get("state") == "queued" else previous.get("state")
        start_epoch = checkpoint_epoch(folder)
        resuming = (
            start_epoch is not None
            and (folder / CONFIG_FILE).is_file()
            and (bool(resume) or (not fresh and prev_state != "done"))
        )
        if resume and start_epoch is None:
            raise JobError(f"job {job_id} has no checkpoint to resume from; start it without --resume")
        if not resuming:  # (a previous result.json stays until this run replaces it: it describes what is published)
            for name in (LOSS_FILE, CHECKPOINT_FILE, OPTIMIZER_FILE):
                (folder / name).unlink(missing_ok=True)
            start_epoch = 0
        if not _launched_for_me(folder):
            (folder / CANCEL_FILE).unlink(missing_ok=True)
        write_json(folder / CONFIG_FILE, cfg.to_dict())
        status = {
            "job_id": job_id,
            "kind": cfg.kind,
            "name": detector_name(cfg),
            "label": "",
            "benchmark": cfg.benchmark,
            "arch": cfg.arch,
            "state": "running",
            "epoch": start_epoch,
            "total": cfg.epochs,
            "step": 0,
            "steps": 0,
            "loss": None,
            "pid": os.getpid(),
            "started": time.time(),
            "message": "loading the cached run",
            "resumed_from": start_epoch if resuming else None,
            "stopped_early": None,
            "config": cfg.to_dict(),
        }
        write_status(folder, status)
        return _train(root, cfg, run, folder, status, start_epoch, resuming, progress, cancel_event, n_boot)
    except KeyboardInterrupt:
        if status:
            status.update(
                state="cancelled",
                message="interrupted (Ctrl-C); the last epoch's checkpoint is kept: "
                "start the same options again to resume",
            )
            write_status(folder, status)
        raise
    except JobError as exc:
        if status:
            status.update(state="failed", message=str(exc))
            write_status(folder, status)
        raise
    except Exception as exc:
        if status:
            status.update(state="failed", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            write_status(folder, status)
        raise
    finally:
        release_lock(root)
        torch.set_num_threads(threads_before)


def _resolve_job(root: Path, cfg: TrainConfig) -> tuple[TrainConfig, dict, str]:
    """The options resolved against the cached run they train on, that run.json, and the job id."""
    try:
        arch = cfg.arch or _only_arch(root, cfg.benchmark)
        run = C.read_run(root, cfg.benchmark, arch)
    except C.CacheError as exc:
        raise JobError(str(exc)) from None
    cfg = resolve(TrainConfig.from_dict({**cfg.to_dict(), "arch": arch}), run)
    return cfg, run, job_id_for(cfg, run)


def _only_arch(root: Path, benchmark: str) -> str:
    archs = sorted({r["arch"] for r in C.list_runs(root) if r.get("benchmark") == benchmark})
    if not archs:
        hint = "python -m oodcore demo" if benchmark == "demo" else "python -m oodcore run ..."
        raise JobError(f"no cached run for benchmark {benchmark!r} under {root} (create it with `{hint}`)")
    if len(archs) > 1:
        raise JobError(f"benchmark {benchmark!r} has several architectures ({', '.join(archs)}); pick one with --arch")
    return archs[0]


def _config_of(root: Path, job_id: str, cfg: TrainConfig | None) -> TrainConfig:
    matches = list(Path(root).glob(f"*/*/{JOBS_DIR}/{C.safe_name(job_id)}/{CONFIG_FILE}"))
    if cfg is not None:
        matches = [m for m in matches if m.parents[3].name == C.safe_name(cfg.benchmark)]
    if not matches:
        raise JobError(
            f"no job {job_id!r} under {root} (the Training page and `ls <cache>/<benchmark>/<arch>/jobs` list them)"
        )
    return TrainConfig.from_dict(read_json(matches[0]))


def _finite_params(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _train(root, cfg, run, folder, status, start_epoch, resuming, progress, cancel_event, n_boot) -> dict:
    import torch

    say = progress or (lambda event, status: None)
    data = C.load_benchmark(root, cfg.benchmark, cfg.arch)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, data, root)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    seconds_before = 0.0
    if resuming:
        meta = load_checkpoint(folder, model, optimizer)
        seconds_before = float(meta.get("seconds", 0.0))
        _truncate_loss(folder, start_epoch)
    else:
        save_checkpoint(folder, model, optimizer, {"epoch": 0, "seconds": 0.0, "job_id": status["job_id"]})
    n_steps = task.n_batches()
    status.update(
        label=task.label,
        steps=n_steps,
        terms=list(task.terms),
        message=(f"resumed from epoch {start_epoch}" if resuming else "training") + f" · {task.label}",
    )
    write_status(folder, status)
    say("start", status)
    started = time.perf_counter()
    last_write = 0.0
    stopped_early = None
    cancelled = False
    cancel_file = folder / CANCEL_FILE
    global_step = start_epoch * n_steps
    new_file = not (folder / LOSS_FILE).is_file()
    with open(folder / LOSS_FILE, "a", newline="") as log:
        writer = csv.writer(log)
        if new_file:
            writer.writerow(LOSS_COLUMNS)
        epoch = start_epoch
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            model.train()
            losses = []
            for step, batch in enumerate(task.batches(epoch), start=1):
                if cancel_file.exists() or (cancel_event is not None and cancel_event.is_set()):
                    cancelled = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss, id_term, ood_term = task.loss(batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    stopped_early = f"non-finite loss ({value}) at epoch {epoch}, step {step}"
                    break
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
                if not math.isfinite(grad_norm):
                    stopped_early = f"non-finite gradient norm at epoch {epoch}, step {step}"
                    break
                optimizer.step()
                global_step += 1
                losses.append(value)
                writer.writerow(
                    [
                        epoch,
                        step,
                        global_step,
                        f"{value:.6g}",
                        f"{id_term:.6g}",
                        f"{ood_term:.6g}",
                        f"{grad_norm:.6g}",
                        f"{seconds_before + time.perf_counter() - started:.3f}",
                    ]
                )
                now = time.perf_counter()
                if now - last_write > 0.5:
                    log.flush()
                    status.update(
                        epoch=epoch - 1,
                        step=step,
                        loss=value,
                        message=f"epoch {epoch}/{cfg.epochs} · step {step}/{n_steps} · loss {value:.4g}",
                    )
                    write_status(folder, status)
                    last_write = now
                say("step", status)
            log.flush()
            if cancelled or stopped_early:
                break
            if not _finite_params(model):
                stopped_early = f"non-finite parameters after epoch {epoch}"
                break
            seconds = seconds_before + time.perf_counter() - started
            save_checkpoint(folder, model, optimizer, {"epoch": epoch, "seconds": seconds, "job_id": status["job_id"]})
            mean = float(np.mean(losses)) if losses else float("nan")
            status.update(
                epoch=epoch, step=n_steps, loss=mean, message=f"epoch {epoch}/{cfg.epochs} done · mean loss {mean:.4g}"
            )
            write_status(folder, status)
            say("epoch", status)
    seconds = seconds_before + time.perf_counter() - started
    if cancelled:
        kept = checkpoint_epoch(folder) or 0
        (folder / CANCEL_FILE).unlink(missing_ok=True)
        status.update(
            state="cancelled",
            epoch=kept,
            message=f"cancelled during epoch {epoch}; the checkpoint of epoch {kept} is kept "
            "(start the same options again, or --resume, to continue)",
        )
        write_status(folder, status)
        say("end", status)
        return status
    if stopped_early:
        meta = load_checkpoint(folder, model)  # the last good checkpoint
        kept = int(meta["epoch"])
        stopped_early += f"; stopped and kept the last good checkpoint (epoch {kept})"
        status.update(epoch=kept, stopped_early=stopped_early)
    status.update(message="scoring the ID and OOD rows")
    write_status(folder, status)
    result = _publish(root, cfg, run, folder, task, data, status, seconds, stopped_early, n_boot)
    write_json(folder / RESULT_FILE, result)
    status.update(state="done", result=result, message=_done_message(result))
    write_status(folder, status)
    say("end", status)
    return status


def _truncate_loss(folder: Path, epoch: int) -> None:
    """Drop log rows of the epochs after the checkpoint (they are redone)."""
    path = folder / LOSS_FILE
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1]
    for line in lines[1:]:
        head = line.split(",", 1)[0]
        if line.endswith("\n") and head.isdigit() and int(head) <= epoch:
            keep.append(line)
    path.write_text("".join(keep))


def _publish(root, cfg, run, folder, task, data, status, seconds, stopped_early, n_boot) -> dict:
    import torch

    from oodcore import detectors as M
    from oodcore.evaluation.metrics import METRIC_NAMES, evaluate
    from oodcore.evaluation.report import evaluate_run

    t0 = time.perf_counter()
    task.model.eval()
    with torch.no_grad():
        s_id, s_ood = task.score()
    s_id, s_ood = np.asarray(s_id, np.float64), np.asarray(s_ood, np.float64)
    n_bad = int((~np.isfinite(s_id)).sum() + (~np.isfinite(s_ood)).sum())
    if n_bad:  # a flow's NLL can overflow on a far-out input: that input is simply very OOD
        s_id = np.nan_to_num(s_id, nan=np.finfo(np.float64).max, posinf=np.finfo(np.float64).max)
        s_ood = np.nan_to_num(s_ood, nan=np.finfo(np.float64).max, posinf=np.finfo(np.float64).max)
    split = data.tuning_split()
    arch_folder = C.arch_dir(root, cfg.benchmark, cfg.arch)
    options = cfg.to_dict()
    split_text = (
        f"trained on {task.trained_on.get('id', 'the ID fit split')}"
        + (f" and {task.trained_on['ood']}" if task.trained_on.get("ood") else "")
        + (
            f"; scored on the {len(data.id)} ID eval rows and all {len(split.heldout)} test OOD rows "
            f"(OOD tuning set {split.name!r})"
            if split.uses_tune_set
            else f"; scored on the {len(data.id)} ID eval rows and the held-out {len(split.heldout)} OOD rows "
            f"(OOD split seed {split.seed}, {split.fraction:.0%} exposure)"
        )
    )
    meta = {
        "label": task.label,
        "summary": task.summary,
        "paper": task.paper,
        "kind": cfg.kind,
        "options": options,
        "split": split_text,
        "trained_on": task.trained_on,
        "job_id": status["job_id"],
        "checkpoint": str(Path(JOBS_DIR) / folder.name / CHECKPOINT_FILE),
        "epochs_done": status["epoch"],
        "stopped_early": stopped_early,
        "non_finite_scores": n_bad,
        **task.extra_meta(),
    }
    C.save_trained(arch_folder, task.name, s_id, s_ood, meta)
    data.trained = C.load_trained(arch_folder, C.read_run(root, cfg.benchmark, cfg.arch))
    from oodcore.evaluation.stored import stored_report

    stored_report(root, cfg.benchmark, cfg.arch, load=lambda: data)  # the leaderboard's report gains this row
    report = evaluate_run(data, [task.name], n_boot=n_boot, tune=False)
    row = report["results"][0]
    base_name, base_params = task.baseline
    method = M.get(base_name)
    b_id, b_ood = method.score_id_ood(data, **base_params)
    b_ood = b_ood[split.heldout]
    b = evaluate(b_id, b_ood, n_boot=n_boot, seed=0)
    baseline = {
        "method": base_name,
        "label": method.label,
        "params": method.resolve(base_params),
        **{k: float(b[k]) for k in METRIC_NAMES},
        "ci": b.get("ci", {}),
        "n_ood_scored": int(len(b_ood)),
        "tuned_on": split.tag(),
        "note": task.baseline_note + f"; same held-out {len(split.heldout)} OOD rows",
    }
    return {
        **row,
        "name": task.name,
        "label": task.label,
        "options": options,
        "baseline": baseline,
        "seconds": round(seconds + time.perf_counter() - t0, 2),
        "train_seconds": round(seconds, 2),
        "stopped_early": stopped_early,
        "epochs_done": status["epoch"],
        "epochs": cfg.epochs,
        "job_id": status["job_id"],
        "resumed_from": status.get("resumed_from"),
        "benchmark": cfg.benchmark,
        "arch": cfg.arch,
        "split": split_text,
        "finished": time.time(),
        **task.extra_meta(),
    }


def _done_message(result: dict) -> str:
    b = result["baseline"]
    text = (
        f"done: held-out AUROC {100 * result['auroc']:.2f}% vs {b['label']} {100 * b['auroc']:.2f}% "
        f"({result['seconds']:.1f} s); published as '{result['name']}'"
    )
    if result.get("stopped_early"):
        text += f" — stopped early: {result['stopped_early']}"
    return text
