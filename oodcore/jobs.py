"""Training runs as resumable jobs, shared by `python -m oodcore train ...` and the app's Training page.

A job trains one detector (energy fine-tuning, oodcore.train_energy; a normalizing flow,
oodcore.train_flow) on a cached run and publishes its scores with `cache.save_trained`, so it
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
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import cache as C
from .atomic import read_json, write_json

from .job_files import (  # noqa: F401  (re-exported: the page and tests use jobs.<name>)
    CANCEL_FILE, CHECKPOINT_FILE, CONFIG_FILE, JOBS_DIR, LAUNCHER_FILE, LOCK_FILE, LOG_FILE, LOSS_COLUMNS, LOSS_FILE,
    OPTIMIZER_FILE, RESULT_FILE, STATES, STATUS_FILE, JobBusy, JobError, acquire_lock, busy_message, checkpoint_epoch,
    job_dir, jobs_dir, list_jobs, load_checkpoint, lock_path, pid_alive, read_lock, read_loss,
    read_result, read_status, release_lock, request_cancel, save_checkpoint, write_status,
)

KINDS = ("energy", "flow")
INPUTS = ("pixels", "features")
MARGIN_MODES = ("auto", "paper")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ options


@dataclass
class TrainConfig:
    """Everything that determines a training run (None = the kind's default, filled by `resolve`)."""

    kind: str
    benchmark: str
    arch: str | None = None
    input: str | None = None  # pixels (demo only) | features
    mask: str | None = None  # flows: checkerboard|horizontal|cyclic (pixels), halves|random (features)
    ood_objective: bool = False  # flows: push exposure-split OOD NLL above a margin
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None  # energy 64, flow 16 (pixels) / 64 (features)
    seed: int = 0
    clip: float = 10.0  # gradient-norm clipping
    # energy fine-tuning (Liu et al. 2020)
    lam: float | None = None  # energy 0.1, flow 1.0
    m_in: float | None = None
    m_out: float | None = None
    margins: str = "auto"  # when m_in/m_out are not given: auto (fit-split quantiles) | paper (-25/-7)
    temperature: float = 1.0
    # flows
    layers: int | None = None
    width: int | None = None
    bottleneck: int | None = None
    pca: int = 0
    margin: float | None = None  # absolute OOD margin in bits/dim; None -> ID batch NLL + margin_gap
    margin_gap: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_input(benchmark: str) -> str:
    return "pixels" if benchmark == "demo" else "features"


def resolve(cfg: TrainConfig, run: dict) -> TrainConfig:
    """Fill the defaults of this kind and input, and reject what cannot work (JobError)."""
    from . import flows

    c = TrainConfig.from_dict(cfg.to_dict())
    if c.kind not in KINDS:
        raise JobError(f"unknown detector {c.kind!r}; choose from {', '.join(KINDS)}")
    c.arch = run["arch"]
    c.input = c.input or default_input(c.benchmark)
    if c.input not in INPUTS:
        raise JobError(f"--input must be one of {', '.join(INPUTS)}")
    if c.input == "pixels" and c.benchmark != "demo":
        raise JobError("--input pixels needs the images' pixels, which only the demo benchmark keeps; "
                       "use --input features (the cached penultimate features) for this benchmark")
    for name, value in (("epochs", c.epochs), ("batch-size", c.batch_size), ("layers", c.layers),
                        ("width", c.width), ("bottleneck", c.bottleneck)):
        if value is not None and value < 1:
            raise JobError(f"--{name} must be at least 1 (got {value})")
    for name, value in (("lr", c.lr), ("clip", c.clip), ("temperature", c.temperature)):
        if value is not None and not value > 0:
            raise JobError(f"--{name} must be positive (got {value})")
    if c.lam is not None and c.lam < 0:
        raise JobError(f"--lam must be >= 0 (got {c.lam})")
    if c.pca < 0:
        raise JobError(f"--pca must be >= 0 (got {c.pca})")
    if c.kind == "energy":
        if c.mask or c.ood_objective or c.pca or c.layers or c.width or c.bottleneck or c.margin is not None:
            raise JobError("--mask, --ood-objective, --pca, --layers, --width, --bottleneck and --margin are flow options")
        if (c.m_in is None) != (c.m_out is None):
            raise JobError("give both --m-in and --m-out, or neither (then --margins decides)")
        if c.margins not in MARGIN_MODES:
            raise JobError(f"--margins must be one of {', '.join(MARGIN_MODES)}")
        if c.m_in is not None and not c.m_in < c.m_out:
            raise JobError(f"--m-in ({c.m_in}) must be below --m-out ({c.m_out}): ID energies go low, OOD high")
        c.epochs = c.epochs or (5 if c.input == "pixels" else 10)
        c.lr = c.lr or 1e-3
        c.batch_size = c.batch_size or 64
        c.lam = 0.1 if c.lam is None else c.lam
    else:
        masks = flows.PIXEL_MASKS if c.input == "pixels" else flows.FEATURE_MASKS
        c.mask = c.mask or masks[0]
        if c.mask not in masks:
            raise JobError(f"--mask {c.mask} does not apply to {c.input}; choose from {', '.join(masks)}")
        if c.m_in is not None or c.m_out is not None:
            raise JobError("--m-in/--m-out are energy fine-tuning options")
        if c.input == "pixels" and c.pca:
            raise JobError("--pca applies to --input features")
        pixels = c.input == "pixels"
        c.epochs = c.epochs or (6 if pixels else 30)
        c.lr = c.lr or 1e-3
        c.batch_size = c.batch_size or (16 if pixels else 64)
        c.layers = c.layers or (8 if pixels else 6)
        c.width = c.width or (16 if pixels else 128)
        c.bottleneck = c.bottleneck or (8 if pixels else 32)
        c.lam = 1.0 if c.lam is None else c.lam
        if c.margin_gap < 0:
            raise JobError(f"--margin-gap must be >= 0 (got {c.margin_gap})")
    return c


def detector_name(c: TrainConfig) -> str:
    """The name the detector is published under (one per variant; a rerun replaces it)."""
    if c.kind == "energy":
        return "energy_ft" if c.input == "pixels" else "energy_ft_head"
    name = f"flow_{c.input}_{c.mask}"
    if c.pca:
        name += f"_pca{c.pca}"
    return name + ("_ood" if c.ood_objective else "")


def job_id_for(c: TrainConfig, run: dict) -> str:
    key = C.key_of({"config": c.to_dict(), "run": run.get("key"), "files": run.get("files", {})})
    return f"{detector_name(c)}-{key[:8]}"


def add_train_arguments(p) -> None:
    """The `train` subcommand's options (oodcore.cli registers them)."""
    p.add_argument("kind", choices=KINDS, help="energy: energy-bounded fine-tuning; flow: a RealNVP normalizing flow")
    p.add_argument("--benchmark", default="demo", help="a cached benchmark (default: demo)")
    p.add_argument("--arch", default=None, help="its architecture (default: the benchmark's only one)")
    p.add_argument("--input", choices=INPUTS, default=None,
                   help="pixels (demo only: the whole CNN / a flow on 32x32 digits) or features "
                        "(cached penultimate features: the classifier head / a flow on embeddings); "
                        "default: pixels for the demo, else features")
    p.add_argument("--mask", default=None,
                   help="flow coupling masks: checkerboard|horizontal|cyclic (pixels), halves|random (features)")
    p.add_argument("--ood-objective", action="store_true",
                   help="flow: also push OOD exposure-split NLL above a margin (bits/dim)")
    p.add_argument("--epochs", type=int, default=None, help="default: energy 5 (pixels) / 10 (head), flow 6 (pixels) / 30")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="ID rows per step, and as many OOD rows (default: 64; pixel flows 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=float, default=10.0, help="gradient-norm clipping")
    p.add_argument("--lam", type=float, default=None, help="weight of the OOD term (energy 0.1, flow 1.0)")
    p.add_argument("--m-in", type=float, default=None, help="energy: ID energy margin (with --m-out)")
    p.add_argument("--m-out", type=float, default=None, help="energy: OOD energy margin (with --m-in)")
    p.add_argument("--margins", choices=MARGIN_MODES, default="auto",
                   help="energy margins without --m-in/--m-out: auto = median / 95th percentile of the "
                        "untuned fit-split energies; paper = -25 / -7 (Liu et al.'s CIFAR values)")
    p.add_argument("--temperature", type=float, default=1.0, help="energy temperature T")
    p.add_argument("--layers", type=int, default=None, help="flow coupling layers (default 8 pixels / 6 features)")
    p.add_argument("--width", type=int, default=None, help="flow s/t-network width (default 16 pixels / 128 features)")
    p.add_argument("--bottleneck", type=int, default=None, help="flow s/t-network bottleneck (default 8 pixels / 32 features)")
    p.add_argument("--pca", type=int, default=0, help="flow on features: reduce to N principal components first")
    p.add_argument("--margin", type=float, default=None,
                   help="flow --ood-objective: absolute OOD margin in bits/dim (default: ID batch NLL + --margin-gap)")
    p.add_argument("--margin-gap", type=float, default=1.0, help="flow --ood-objective: relative margin in bits/dim")
    p.add_argument("--resume", default=None, metavar="JOB_ID", help="resume that job with its stored options")
    p.add_argument("--fresh", action="store_true", help="start over even if an unfinished job with these options exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the demo's small models, which run fastest on one "
                        "thread; torch's choice otherwise)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for the 95%% CIs")
    p.add_argument("--json", dest="json_file", default=None, help="write the result as JSON to FILE")


def config_from_args(args) -> TrainConfig:
    return TrainConfig(kind=args.kind, benchmark=args.benchmark, arch=args.arch, input=args.input, mask=args.mask,
                       ood_objective=args.ood_objective, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       seed=args.seed, clip=args.clip, lam=args.lam, m_in=args.m_in, m_out=args.m_out,
                       margins=args.margins, temperature=args.temperature, layers=args.layers, width=args.width,
                       bottleneck=args.bottleneck, pca=args.pca, margin=args.margin, margin_gap=args.margin_gap)


def config_to_argv(c: TrainConfig) -> list[str]:
    """CLI arguments that reproduce `c` (what the app's launcher runs)."""
    argv = [c.kind, "--benchmark", c.benchmark]
    flags = {"arch": "--arch", "input": "--input", "mask": "--mask", "epochs": "--epochs", "lr": "--lr",
             "batch_size": "--batch-size", "seed": "--seed", "clip": "--clip", "lam": "--lam", "m_in": "--m-in",
             "m_out": "--m-out", "margins": "--margins", "temperature": "--temperature", "layers": "--layers",
             "width": "--width", "bottleneck": "--bottleneck", "pca": "--pca", "margin": "--margin",
             "margin_gap": "--margin-gap"}
    for key, flag in flags.items():
        value = getattr(c, key)
        if value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    if c.ood_objective:
        argv.append("--ood-objective")
    return argv


# ------------------------------------------------------------------ finished runs


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


# ------------------------------------------------------------------ what a trainer provides


class Task:
    """One detector's training problem; oodcore.train_energy / oodcore.train_flow implement it.

    `batches(epoch)` must be deterministic given the epoch (seeded per epoch), so a resumed
    run sees the same batches as an uninterrupted one.
    """

    name: str = ""
    label: str = ""
    summary: str = ""
    paper: str = ""
    baseline: tuple[str, dict] = ("msp", {})  # a registered method: the untuned reference
    baseline_note: str = ""
    terms: tuple[str, str] = ("id term", "ood term")  # what loss.csv's id_term / ood_term mean
    trained_on: dict = {}
    model: Any = None

    def n_batches(self) -> int:
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterable:
        raise NotImplementedError

    def loss(self, batch) -> tuple[Any, float, float]:
        """(loss tensor, id term, ood term)."""
        raise NotImplementedError

    def score(self) -> tuple[np.ndarray, np.ndarray]:
        """OOD scores (higher = more OOD) of the trained model on every ID eval and every OOD row."""
        raise NotImplementedError

    def extra_meta(self) -> dict:
        return {}


def demo_pixels(data) -> dict[str, np.ndarray]:
    """The demo's 16x16 pixels of the cached fit / id / ood rows, in the cache's row order.

    The cache keeps no pixels, but the demo's rows are oodcore.demo.demo_splits() in order; this is
    checked against the cached paths (`digit<d>/<original index>.png`) rather than assumed.
    """
    from . import demo

    splits = demo.demo_splits()
    out = {}
    for name in ("fit", "id", "ood"):
        rows = getattr(data, name)
        pixels, _, original = splits[name]
        if rows is None:
            raise JobError(f"the demo cache has no {name} split; rebuild it with `python -m oodcore demo --rebuild`")
        cached = np.asarray([int(Path(str(p)).stem) for p in rows.paths])
        if len(cached) != len(original) or not np.array_equal(cached, original):
            raise JobError(f"the cached demo {name} rows do not match oodcore.demo.demo_splits(); "
                           "rebuild the demo with `python -m oodcore demo --rebuild`")
        out[name] = pixels
    return out


def build_task(c: TrainConfig, data, root: Path) -> Task:
    if c.kind == "energy":
        from .train_energy import build_energy_task

        return build_energy_task(c, data, root)
    from .train_flow import build_flow_task

    return build_flow_task(c, data, root)


# ------------------------------------------------------------------ the job loop


Progress = Callable[[str, dict], None]  # (event: start|step|epoch|end, status)


def run_job(root: Path, cfg: TrainConfig | None = None, *, resume: str | None = None, fresh: bool = False,
            progress: Progress | None = None, cancel_event: threading.Event | None = None,
            n_boot: int = 200, threads: int | None = None) -> dict:
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
        resuming = (start_epoch is not None and (folder / CONFIG_FILE).is_file()
                    and (bool(resume) or (not fresh and prev_state != "done")))
        if resume and start_epoch is None:
            raise JobError(f"job {job_id} has no checkpoint to resume from; start it without --resume")
        if not resuming:  # (a previous result.json stays until this run replaces it: it describes what is published)
            for name in (LOSS_FILE, CHECKPOINT_FILE, OPTIMIZER_FILE):
                (folder / name).unlink(missing_ok=True)
            start_epoch = 0
        if not _launched_for_me(folder):
            (folder / CANCEL_FILE).unlink(missing_ok=True)
        write_json(folder / CONFIG_FILE, cfg.to_dict())
        status = {"job_id": job_id, "kind": cfg.kind, "name": detector_name(cfg), "label": "",
                  "benchmark": cfg.benchmark, "arch": cfg.arch, "state": "running", "epoch": start_epoch,
                  "total": cfg.epochs, "step": 0, "steps": 0, "loss": None, "pid": os.getpid(),
                  "started": time.time(), "message": "loading the cached run", "resumed_from": start_epoch if resuming else None,
                  "stopped_early": None, "config": cfg.to_dict()}
        write_status(folder, status)
        return _train(root, cfg, run, folder, status, start_epoch, resuming, progress, cancel_event, n_boot)
    except KeyboardInterrupt:
        if status:
            status.update(state="cancelled", message="interrupted (Ctrl-C); the last epoch's checkpoint is kept: "
                                                     "start the same options again to resume")
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
    except C.CacheMissing as exc:
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
        raise JobError(f"no job {job_id!r} under {root} (the Training page and `ls <cache>/<benchmark>/<arch>/jobs` list them)")
    return TrainConfig.from_dict(read_json(matches[0]))


LAUNCHED_ENV = "OODCORE_TRAIN_LAUNCHED"


def _launched_for_me(folder: Path) -> bool:
    """Started by the app's launcher, which cleared the cancel flag itself (a cancel since then counts)."""
    return os.environ.get(LAUNCHED_ENV) == folder.name


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
    status.update(label=task.label, steps=n_steps, terms=list(task.terms),
                  message=(f"resumed from epoch {start_epoch}" if resuming else "training") + f" · {task.label}")
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
                writer.writerow([epoch, step, global_step, f"{value:.6g}", f"{id_term:.6g}", f"{ood_term:.6g}",
                                 f"{grad_norm:.6g}", f"{seconds_before + time.perf_counter() - started:.3f}"])
                now = time.perf_counter()
                if now - last_write > 0.5:
                    log.flush()
                    status.update(epoch=epoch - 1, step=step, loss=value,
                                  message=f"epoch {epoch}/{cfg.epochs} · step {step}/{n_steps} · loss {value:.4g}")
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
            status.update(epoch=epoch, step=n_steps, loss=mean,
                          message=f"epoch {epoch}/{cfg.epochs} done · mean loss {mean:.4g}")
            write_status(folder, status)
            say("epoch", status)
    seconds = seconds_before + time.perf_counter() - started
    if cancelled:
        kept = checkpoint_epoch(folder) or 0
        (folder / CANCEL_FILE).unlink(missing_ok=True)
        status.update(state="cancelled", epoch=kept,
                      message=f"cancelled during epoch {epoch}; the checkpoint of epoch {kept} is kept "
                              "(start the same options again, or --resume, to continue)")
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

    from . import methods as M
    from .evaluation import evaluate_run
    from .metrics import METRIC_NAMES, evaluate
    from .splits import ood_split

    t0 = time.perf_counter()
    task.model.eval()
    with torch.no_grad():
        s_id, s_ood = task.score()
    s_id, s_ood = np.asarray(s_id, np.float64), np.asarray(s_ood, np.float64)
    n_bad = int((~np.isfinite(s_id)).sum() + (~np.isfinite(s_ood)).sum())
    if n_bad:  # a flow's NLL can overflow on a far-out input: that input is simply very OOD
        s_id = np.nan_to_num(s_id, nan=np.finfo(np.float64).max, posinf=np.finfo(np.float64).max)
        s_ood = np.nan_to_num(s_ood, nan=np.finfo(np.float64).max, posinf=np.finfo(np.float64).max)
    split = ood_split(len(data.ood))
    arch_folder = C.arch_dir(root, cfg.benchmark, cfg.arch)
    options = cfg.to_dict()
    split_text = (f"trained on {task.trained_on.get('id', 'the ID fit split')}"
                  + (f" and {task.trained_on['ood']}" if task.trained_on.get("ood") else "")
                  + f"; scored on the {len(data.id)} ID eval rows and the held-out {len(split.heldout)} OOD rows "
                  f"(OOD split seed {split.seed}, {split.fraction:.0%} exposure)")
    meta = {"label": task.label, "summary": task.summary, "paper": task.paper, "kind": cfg.kind,
            "options": options, "split": split_text, "trained_on": task.trained_on, "job_id": status["job_id"],
            "checkpoint": str(Path(JOBS_DIR) / folder.name / CHECKPOINT_FILE), "epochs_done": status["epoch"],
            "stopped_early": stopped_early, "non_finite_scores": n_bad, **task.extra_meta()}
    C.save_trained(arch_folder, task.name, s_id, s_ood, meta)
    data.trained = C.load_trained(arch_folder, C.read_run(root, cfg.benchmark, cfg.arch))
    report = evaluate_run(data, [task.name], n_boot=n_boot, tune=False)
    row = report["results"][0]
    base_name, base_params = task.baseline
    method = M.get(base_name)
    b_id, b_ood = method.score_id_ood(data, **base_params)
    b_ood = b_ood[split.heldout]
    b = evaluate(b_id, b_ood, n_boot=n_boot, seed=0)
    baseline = {"method": base_name, "label": method.label, "params": method.resolve(base_params),
                **{k: float(b[k]) for k in METRIC_NAMES}, "ci": b.get("ci", {}), "n_ood_scored": int(len(b_ood)),
                "tuned_on": split.tag(), "note": task.baseline_note + f"; same held-out {len(split.heldout)} OOD rows"}
    return {**row, "name": task.name, "label": task.label, "options": options, "baseline": baseline,
            "seconds": round(seconds + time.perf_counter() - t0, 2), "train_seconds": round(seconds, 2),
            "stopped_early": stopped_early, "epochs_done": status["epoch"], "epochs": cfg.epochs,
            "job_id": status["job_id"], "resumed_from": status.get("resumed_from"), "benchmark": cfg.benchmark,
            "arch": cfg.arch, "split": split_text, "finished": time.time(), **task.extra_meta()}


def _done_message(result: dict) -> str:
    b = result["baseline"]
    text = (f"done: held-out AUROC {100 * result['auroc']:.2f}% vs {b['label']} {100 * b['auroc']:.2f}% "
            f"({result['seconds']:.1f} s); published as '{result['name']}'")
    if result.get("stopped_early"):
        text += f" — stopped early: {result['stopped_early']}"
    return text


# ------------------------------------------------------------------ CLI and app entry points


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
            print(f"training {status['label']} · job {status['job_id']}"
                  + (f" (resumed from epoch {status['resumed_from']})" if status.get("resumed_from") else ""), file=out)
        elif event == "step" and time.perf_counter() - state["t"] > 2:
            print(f"  {status['message']}", file=out, flush=True)
            state["t"] = time.perf_counter()
        elif event == "epoch":
            print(f"  {status['message']}", file=out, flush=True)
            state["t"] = time.perf_counter()
        elif event == "end":
            print(status["message"], file=out, flush=True)

    try:
        status = run_job(root, cfg, resume=args.resume, fresh=args.fresh, progress=show, cancel_event=cancel,
                         n_boot=args.bootstrap, threads=args.threads)
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
    lines = [f"{result['label']} · {result['benchmark']} · {result['arch']} · job {result['job_id']}",
             f"{result['note']}",
             f"{'detector':<30}{'AUROC':>9}{'AUPR-Out':>10}{'AUPR-In':>9}{'FPR95':>8}{'FPR95-In':>10}"]
    for name, row in ((result["name"], result), (f"{b['method']} (untuned baseline)", b)):
        lines.append(f"{name:<30}" + "".join(f"{100 * row[k]:>{w}.1f}" for k, w in
                                             (("auroc", 9), ("aupr_out", 10), ("aupr_in", 9), ("fpr95", 8), ("fpr95_in", 10))))
    lines.append(f"{result['seconds']:.1f} s · {result['epochs_done']}/{result['epochs']} epochs"
                 + (f" · stopped early: {result['stopped_early']}" if result.get("stopped_early") else ""))
    lines.append(f"published as trained detector '{result['name']}': it appears in `python -m oodcore demo`/`run` "
                 "reports and on every app page")
    return "\n".join(lines)


def start_job_process(root: Path, cfg: TrainConfig, *, fresh: bool = False) -> str:
    """Start `python -m oodcore train ...` as a detached process (the app's Start button); returns the job id.

    JobBusy when a job already runs on this cache; JobError when the options cannot work.
    """
    root = Path(root)
    holder = read_lock(root)
    if holder is not None:
        raise JobBusy(busy_message(holder))
    cfg, run, job_id = _resolve_job(root, cfg)
    folder = job_dir(root, cfg.benchmark, cfg.arch, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CANCEL_FILE).unlink(missing_ok=True)
    previous = read_status(folder) or {}
    write_status(folder, {"job_id": job_id, "kind": cfg.kind, "name": detector_name(cfg), "label": "",
                          "benchmark": cfg.benchmark, "arch": cfg.arch, "state": "queued", "epoch": 0,
                          "total": cfg.epochs, "step": 0, "steps": 0, "pid": None, "started": time.time(),
                          "message": "starting the training process", "config": cfg.to_dict(),
                          "previous_state": previous.get("state")})
    argv = [sys.executable, "-m", "oodcore", "train", *config_to_argv(cfg), "--cache-dir", str(root)]
    if fresh:
        argv.append("--fresh")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env[LAUNCHED_ENV] = job_id
    with open(folder / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(REPO_ROOT), env=env, start_new_session=True)
    write_json(folder / LAUNCHER_FILE, {"pid": proc.pid, "argv": argv, "started": time.time()})
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends (no zombie)
    return job_id
