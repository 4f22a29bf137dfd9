"""A real study run: (architecture, ID folder, OOD folder, protocol) -> a published cache entry.

Each split's extraction (and ODIN grid) is an artifact keyed by what determines
it, so re-running with unchanged inputs is instant, a killed run resumes from its
last chunk, and a changed file, model, preprocessing or protocol recomputes.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from oodcore.data.dataset import ImageFileDataset
from oodcore.data.folders import fingerprint
from oodcore.data.imagenet import class_name
from oodcore.data.oodsets import OodSetArg, is_imagenet_shaped
from oodcore.data.splits import FIT_FRACTION, FIT_PER_CLASS, SPLIT_SEED, find_train_root, id_fit_split, sample_train
from oodcore.data.studysets import ood_labels, resolve_study
from oodcore.detectors import STUDY_EPSILONS, STUDY_TEMPERATURES
from oodcore.extraction.distributed import SINGLE, Dist
from oodcore.extraction.passes import discard_parts
from oodcore.store import cache, locks, thumbs
from oodcore.store.arrays import ArtifactWriter
from oodcore.store.integrity import load_arrays

Progress = Callable[[str, float], None]


@dataclass
class RunOptions:
    arch: str
    id_dir: str
    ood_dir: str | None
    protocol: str = "imagenet-o"
    name: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 2
    odin_grid: bool = False
    temps: tuple[float, ...] = STUDY_TEMPERATURES
    eps: tuple[float, ...] = STUDY_EPSILONS
    limit: int | None = None
    ood_list: str | None = None
    ood_list_mode: str = "exclude"
    ood_sets: list[OodSetArg] = field(default_factory=list)  # --ood NAME=PATH[:GROUP], after --ood-dir's set
    tune_ood: OodSetArg | None = None  # --tune-ood NAME=PATH: tuning only, never evaluated
    ood_subsets: dict[str | None, str] = field(default_factory=dict)  # --ood-subset [NAME=]KIND
    weights: str | None = None
    fit_dir: str | None = None
    fit_fraction: float = FIT_FRACTION
    fit_per_class: int = FIT_PER_CLASS
    chunk_size: int = 1024  # images per resumable chunk (and per torchrun shard unit)
    label: str = ""  # progress prefix, e.g. "[2/3] " in a multi-architecture study
    amp: bool = True
    channels_last: bool = True
    freeze: bool = True
    threads: int | None = None
    draft: bool = False
    gpu_decode: bool = False
    notes: list[str] = field(default_factory=list)
    feature_dtype: str = "float32"  # "float16" halves the features on disk (logits stay float32)
    replace: bool = False  # reuse a benchmark name that holds runs of other inputs
    lock_wait: float = 3600.0  # seconds to wait for another run of the same (benchmark, arch)
    log: Callable[[str], None] | None = None  # one-line notices (default: stderr)


class NameInUse(ValueError):
    """The benchmark name already holds runs of other inputs (refused without --replace)."""


def run_inputs(opts: RunOptions) -> dict:
    """What a benchmark name stands for: the resolved folders, list file, protocol and limit."""

    def resolved(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().resolve())

    return {
        "id_dir": resolved(opts.id_dir),
        "ood_dir": resolved(opts.ood_dir),
        "protocol": opts.protocol,
        "ood_list": resolved(opts.ood_list),
        "ood_list_mode": opts.ood_list_mode if opts.ood_list else None,
        "limit": opts.limit,
        "fit_dir": resolved(opts.fit_dir),
        "fit_fraction": None if opts.fit_dir else opts.fit_fraction,
    }


def test_sets(opts: RunOptions) -> list[OodSetArg]:
    """The run's OOD test sets in order: --ood-dir's (named after its folder) first, then each --ood."""
    first = [OodSetArg(cache.safe_name(Path(opts.ood_dir).resolve().name), opts.ood_dir)] if opts.ood_dir else []
    return first + list(opts.ood_sets)


def default_name(opts: RunOptions) -> str:
    """`<id folder>-vs-<ood folder>-<protocol>[-limitN]`, e.g. `val-vs-imagenet-o-imagenet-o`.

    With several sets the OOD part is --ood-dir's folder, else the class-mask set (imagenet-o) or the first
    set's name, so adding a set later keeps the name, and with it the cached ID extraction.
    """
    sets = test_sets(opts)
    if opts.ood_dir:
        ood = Path(opts.ood_dir).resolve().name
    else:
        shaped = [s for s in sets if is_imagenet_shaped(s.path)] if opts.protocol == "imagenet-o" else []
        ood = (shaped or sets)[0].name
    name = f"{Path(opts.id_dir).resolve().name}-vs-{ood}-{opts.protocol}"
    if None in opts.ood_subsets:
        name += f"-{opts.ood_subsets[None]}"
    if opts.ood_list:
        name += f"-{opts.ood_list_mode}-{Path(opts.ood_list).stem}"
    if opts.limit:
        name += f"-limit{opts.limit}"
    return cache.safe_name(f"{name}-{cache.key_of(run_inputs(opts))[:6]}")


def rerun_command(opts: RunOptions, benchmark: str) -> str:
    """The command that repeats this run (and recomputes only what is missing or damaged)."""
    inputs, q = run_inputs(opts), shlex.quote
    argv = ["python -m oodcore run", f"--arch {q(opts.arch)}", f"--id-dir {q(inputs['id_dir'])}"]
    if inputs["ood_dir"]:
        argv.append(f"--ood-dir {q(inputs['ood_dir'])}")
    argv += [f"--protocol {opts.protocol}", f"--name {q(benchmark)}"]
    if opts.ood_list:
        argv += [f"--ood-list {q(inputs['ood_list'])}", f"--ood-list-mode {opts.ood_list_mode}"]
    if opts.limit:
        argv.append(f"--limit {opts.limit}")
    if opts.fit_dir:
        argv.append(f"--fit-dir {q(inputs['fit_dir'])}")
    elif opts.fit_fraction != FIT_FRACTION:
        argv.append(f"--fit-fraction {opts.fit_fraction}")
    if opts.weights:
        argv.append(f"--weights {q(str(Path(opts.weights).expanduser().resolve()))}")
    if opts.odin_grid:
        argv.append("--odin-grid")
    if opts.feature_dtype != "float32":
        argv.append(f"--feature-dtype {opts.feature_dtype}")
    return " ".join(argv)


def check_name(root: Path, benchmark: str, opts: RunOptions) -> None:
    """Refuse (NameInUse) a benchmark name already used for other inputs, unless `opts.replace`."""
    if opts.replace:
        return
    mine = run_inputs(opts)
    for path in sorted((Path(root) / cache.safe_name(benchmark)).glob(f"*/{cache.RUN_FILE}")):
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged run.json is repaired by the run, not a reason to refuse
        if not isinstance(theirs, dict):
            continue
        recorded = theirs.get("inputs") or {
            "id_dir": theirs.get("id_root"),
            "ood_dir": theirs.get("ood_root"),
            "protocol": theirs.get("protocol"),
        }
        if theirs.get("inputs") is not None:
            different = [k for k, v in recorded.items() if mine.get(k) != v]
        else:  # older runs recorded the class-folder roots, not the arguments
            different = [k for k in ("protocol",) if recorded[k] != mine[k]] + [
                k for k in ("id_dir", "ood_dir") if not _same_root(mine[k], recorded[k])
            ]
        if different:
            shown = ", ".join(f"{k}={recorded.get(k)}" for k in different)
            raise NameInUse(
                f"benchmark {benchmark!r} already holds a run of other inputs ({path.parent.name}: {shown}); "
                "choose another --name, or pass --replace to overwrite it"
            )


def _same_root(given: str, recorded: str | None) -> bool:
    """Whether a --id-dir/--ood-dir argument is the class-folder root an older run recorded (or holds it as val/)."""
    return recorded in (given, str(Path(given) / "val"))


def run_study(
    opts: RunOptions,
    root: Path,
    progress: Progress | None = None,
    stop_after_chunks: int | None = None,
    dist: Dist = SINGLE,
) -> tuple[str, Path]:
    """Extract (or reuse) everything for one run and publish its run.json; returns (benchmark, folder).

    Fit images: `--fit-dir`, else a seeded `fit_per_class` sample of `train/` when the ID root is
    an ImageNet root holding it (every ID image is then evaluated, as the official protocol does),
    else a held-out fraction of the ID images (the evaluated ID set is then smaller than the
    official one, and run.json says so). Under torchrun (`dist`) the ranks share each pass.

    Holds the (benchmark, arch) run lock throughout: a second run of the same pair waits for it
    (up to `opts.lock_wait` s), then reuses what it published. Artifacts are reused only when they
    match the checksums recorded at publish time; a damaged one is said and recomputed (only it).
    """
    log = opts.log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    spec, sets, tune = resolve_study(
        opts.id_dir,
        test_sets(opts),
        opts.protocol,
        tune=opts.tune_ood,
        subsets=opts.ood_subsets,
        ood_list=opts.ood_list,
        ood_list_mode=opts.ood_list_mode,
        limit=opts.limit,
    )
    benchmark = opts.name or default_name(opts)
    check_name(root, benchmark, opts)
    folder = cache.arch_dir(root, benchmark, opts.arch)
    # under torchrun rank 0 holds the lock for the whole job (the other ranks only extract their chunks)
    lock = locks.run_lock(folder, f"oodcore run --arch {opts.arch}", wait=opts.lock_wait, say=log)
    with lock if dist.is_main else contextlib.nullcontext():
        check_name(root, benchmark, opts)  # again: a run that held the lock may have just published
        return _run_locked(opts, root, (spec, sets, tune), benchmark, folder, log, progress, stop_after_chunks, dist)


def _run_locked(opts, root, study, benchmark, folder, log, progress, stop_after_chunks, dist) -> tuple[str, Path]:
    spec, sets, tune = study
    from oodcore.extraction.pipeline import extract_split, odin_split
    from oodcore.models.registry import cache_key, load_model

    started = time.time()
    say = progress or (lambda msg, frac: None)
    previous = cache.previous_run(folder)

    def reusable(name: str) -> bool:
        return cache.artifact_ok(folder, name, previous, say=log)

    say(f"loading {opts.arch}", 0.0)
    bundle = load_model(opts.arch, device=opts.device, weights=opts.weights)
    channels_last = opts.channels_last  # measured faster on CPU too (bench), and on CUDA with AMP
    if channels_last:
        bundle.network.to(memory_format=torch.channels_last)
    # None: torch's default, every core, also beside decoding workers: decoding, resizing and the thumbnail take
    # about a fifth of a CPU forward per image, so the workers mostly wait on a full prefetch queue (bench (a), 2
    # workers on 2 cores: 1.84x the plain loop with the network on both cores, 1.37x on the one they were left)
    threads = opts.threads
    base = {"model": cache_key(bundle), "protocol": spec.name, "classes": list(spec.class_wnids)}
    gpu_decode = opts.gpu_decode and opts.device.startswith("cuda") and torch.cuda.is_available()
    if opts.draft or gpu_decode:  # other pixels than a full PIL decode: never mixed with those in one cache entry
        base["decode"] = "+".join(k for k, on in (("jpeg-draft-2x", opts.draft), ("gpu-nvjpeg", gpu_decode)) if on)
    c, h, w = bundle.input_size

    def split_key(split: str, split_root: Path, entries: list) -> str:
        what = {**base, "split": split, "root": str(split_root), "files": fingerprint(entries)}
        if opts.feature_dtype != "float32":  # float32 keys stay as they were
            what["feature_dtype"] = opts.feature_dtype
        return cache.key_of(what)

    def extract(split: str, split_root: Path, entries: list, labels: np.ndarray, step: float) -> tuple[str, str, dict]:
        """The split's artifact (cached or computed now): (filename, key, its arrays' index/labels/skipped)."""
        key = split_key(split, split_root, entries)
        target = folder / cache.artifact_name(split, key)
        if not reusable(target.name):
            parts = folder / "parts" / f"{split}-{key}-c{opts.chunk_size}"
            dataset = ImageFileDataset.for_model(
                split_root, entries, bundle.transform, (c, h, w), draft=opts.draft, gpu_decode=gpu_decode
            )
            say(f"{opts.label}{opts.arch}: extracting {split} ({len(entries)} images)", step)
            _, skipped = extract_split(
                bundle,
                dataset,
                [e.relpath for e in entries],
                spec.class_indices,
                parts,
                device=opts.device,
                batch_size=opts.batch_size,
                workers=opts.workers,
                amp=opts.amp,
                channels_last=channels_last,
                freeze=opts.freeze and opts.device == "cpu",
                threads=threads,
                desc=f"{opts.label}{opts.arch} {split}",
                stop_after_chunks=stop_after_chunks,
                progress=None if progress is None else lambda d, n: say(f"extracting {split} ({d}/{n})", step),
                out_path=target,  # streamed from the chunks: the split is never held in memory
                row_arrays={"labels": labels},
                what=split,
                dist=dist,  # under torchrun each rank extracts its chunks; rank 0 writes the artifact
                chunk_size=opts.chunk_size,
                feature_dtype=opts.feature_dtype,
            )
            if dist.is_main:
                discard_parts(parts)
            dist.barrier()  # the artifact is published before any rank reads it
        return target.name, key, _summary(folder / target.name)

    files: dict[str, str] = {}
    info: dict[str, dict] = {}
    id_key = split_key("id", spec.id_root, spec.id_files)
    train_root = None if opts.fit_dir else find_train_root(opts.id_dir, spec.id_root)
    holdout = not opts.fit_dir and train_root is None
    partitioned = _partition_names(id_key, opts.fit_fraction) if holdout else None
    if partitioned and all(reusable(n) for n in partitioned):
        id_name, id_info = None, {"skipped": _summary(folder / partitioned[0])["skipped"]}  # already split: reuse
    else:
        id_name, id_key, id_info = extract("id", spec.id_root, spec.id_files, spec.id_labels, 0.1)
    # each OOD set (and the tuning set) is its own artifact, keyed on its own files: adding a set extracts only it
    ood_parts = []  # (files key, artifact key, entries, root, info)
    for i, oset in enumerate(sets):
        fkey = "ood" if i == 0 else f"ood+{oset.name}"
        name, key, part = extract("ood", oset.root, oset.files, ood_labels(len(oset.files)), 0.5)
        files[fkey] = name
        ood_parts.append((fkey, key, oset.files, oset.root, part))
    if tune is not None:
        name, key, part = extract("tune", tune.root, tune.files, ood_labels(len(tune.files)), 0.6)
        files["tune"] = name
        ood_parts.append(("tune", key, tune.files, tune.root, part))
    info["ood"] = {"n": sum(p[4]["n"] for p in ood_parts if p[0] != "tune"), "skipped": []}
    for fkey, _, _, _, part in ood_parts:
        info["ood"]["skipped"] += [{**s, "set": fkey} for s in part["skipped"]]
    official = f"every ID image of the protocol's {spec.num_classes} classes is evaluated (the official ID set)"
    if opts.fit_dir:
        fit_spec = build_fit_entries(opts.fit_dir, spec.class_wnids)
        files["fit"], _, info["fit"] = extract("fit", fit_spec[0], fit_spec[1], fit_spec[2], 0.7)
        files["id"], info["id"] = id_name, id_info
        fit_source = {"kind": "fit-dir", "root": str(fit_spec[0])}
        fit_note = f"fit split: {info['fit']['n']} images from --fit-dir {opts.fit_dir}; {official}"
    elif train_root is not None:
        entries, labels = sample_train(train_root, spec.class_wnids, opts.fit_per_class, SPLIT_SEED)
        if not entries:
            raise ValueError(f"{train_root} holds no image of the protocol's {spec.num_classes} classes")
        files["fit"], _, info["fit"] = extract("fit", train_root, entries, labels, 0.7)
        files["id"], info["id"] = id_name, id_info
        fit_source = {"kind": "train", "root": str(train_root), "per_class": opts.fit_per_class, "seed": SPLIT_SEED}
        fit_note = (
            f"fit split: {info['fit']['n']} images from {train_root} ({opts.fit_per_class} per class of the "
            f"protocol's {spec.num_classes} classes, seed {SPLIT_SEED}); {official}"
        )
    else:
        if dist.is_main:
            _partition_id(folder, id_name, id_key, opts.fit_fraction, reusable)
        dist.barrier()
        files["id"], files["fit"], info["id"], info["fit"] = _partition_id(
            folder, id_name, id_key, opts.fit_fraction, reusable
        )
        fit_source = {"kind": "id-holdout", "fraction": opts.fit_fraction, "seed": SPLIT_SEED}
        fit_note = (
            f"fit split: {info['fit']['n']} ID images ({opts.fit_fraction:.0%} per class, seed {SPLIT_SEED}), "
            f"never evaluated; ID is scored on the other {info['id']['n']}: smaller than the official ID set "
            f"(no --fit-dir and no train/ beside the ID images)"
        )
    if opts.odin_grid:
        grid_jobs = [("id", id_key, spec.id_files, spec.id_root, info["id"])]
        grid_jobs += [(fkey, key, entries, root_dir, part) for fkey, key, entries, root_dir, part in ood_parts]
        for split, key, entries, root_dir, part in grid_jobs:
            index = part["index"]
            okey = cache.key_of(
                {"of": key, "rows": cache.key_of(index.tolist()), "temps": list(opts.temps), "eps": list(opts.eps)}
            )
            prefix = "odin_tune" if split == "tune" else "odin_id" if split == "id" else "odin_ood"
            target = folder / cache.artifact_name(prefix, okey)
            if not reusable(target.name):
                say(f"{opts.label}{opts.arch}: ODIN grid on {split.split('+')[-1]}", 0.9)
                parts = folder / "parts" / f"{prefix}-{okey}-c{opts.chunk_size}"
                dataset = ImageFileDataset.for_model(
                    root_dir, [entries[i] for i in index], bundle.transform, (c, h, w), draft=opts.draft
                )
                scores = odin_split(
                    bundle,
                    dataset,
                    spec.class_indices,
                    np.arange(len(index)),
                    parts,
                    opts.temps,
                    opts.eps,
                    device=opts.device,
                    batch_size=max(1, opts.batch_size // 2),
                    workers=opts.workers,
                    desc=f"{opts.label}{opts.arch} {split} ODIN",
                    progress=None
                    if progress is None
                    else lambda d, n, split=split: say(f"ODIN grid on {split.split('+')[-1]} ({d}/{n})", 0.9),
                    dist=dist,
                    chunk_size=opts.chunk_size,
                )
                if dist.is_main:
                    cache.write_artifact(
                        folder,
                        target.name,
                        {"temps": np.asarray(opts.temps, float), "eps": np.asarray(opts.eps, float), "scores": scores},
                    )
                    discard_parts(parts)
                dist.barrier()
            files[f"odin_{split}"] = target.name
    files["head"] = cache.artifact_name("head", cache.key_of({**base, "head": True}))
    if not dist.is_main:  # rank 0 writes the head and publishes run.json
        return benchmark, folder
    if not reusable(files["head"]):
        weight = bundle.head.weight.detach().float().cpu().numpy()[spec.class_indices]
        bias = bundle.head.bias.detach().float().cpu().numpy()[spec.class_indices]
        cache.write_artifact(folder, files["head"], {"weight": weight, "bias": bias})
    skipped = [{"split": split, **s} for split in ("id", "ood", "fit") for s in info.get(split, {}).get("skipped", [])]
    skipped += spec.scan_skipped  # broken symlinks and symlink loops, found while listing the folders
    cache.write_run(
        folder,
        {
            "benchmark": benchmark,
            "arch": opts.arch,
            "protocol": spec.name,
            "class_ids": list(spec.class_wnids),
            "class_names": [class_name(w) for w in spec.class_wnids],
            "files": files,
            "n_id": info["id"]["n"],
            "n_ood": info["ood"]["n"],
            "n_fit": info["fit"]["n"],
            "skipped": skipped,
            "fit_split": fit_note,
            "fit_source": fit_source,
            "official_id_set": not holdout,
            "model": bundle.identity,
            "preprocess": bundle.preprocess,
            "id_root": str(spec.id_root),
            "ood_root": str(spec.ood_root),
            "ood_sets": [
                {**oset.to_json(), "files_key": fkey, "n": part["n"]}
                for oset, (fkey, _, _, _, part) in zip(sets, ood_parts)
            ],
            "tune_set": None if tune is None else {**tune.to_json(), "files_key": "tune", "n": ood_parts[-1][4]["n"]},
            "ood_subsets": {k or "*": v for k, v in opts.ood_subsets.items()},
            "protocol_spec": {k: v for k, v in spec.to_json().items() if k != "class_wnids"},
            "limit": opts.limit,
            "ood_list": opts.ood_list,
            "ood_list_mode": opts.ood_list_mode if opts.ood_list else None,
            "ignored_files": spec.ignored[:100],
            "n_ignored_files": len(spec.ignored),
            "notes": spec.notes,
            "seconds": round(time.time() - started, 2),
            "inputs": run_inputs(opts),
            "rerun": rerun_command(opts, benchmark),
        },
    )
    discard_parts(folder / "parts")
    say("done", 1.0)
    return benchmark, folder


def _summary(path: Path) -> dict:
    z = load_arrays(path, ("labels", "index", "skipped_paths", "skipped_errors"), required=("labels", "index"))
    skipped = (
        [{"path": str(p), "error": str(e)} for p, e in zip(z["skipped_paths"], z["skipped_errors"])]
        if "skipped_paths" in z
        else []
    )
    return {"n": int(len(z["labels"])), "index": z["index"], "skipped": skipped}


def _partition_names(id_key: str, fraction: float) -> tuple[str, str]:
    key = cache.key_of({"of": id_key, "fit_fraction": fraction, "seed": SPLIT_SEED})
    return cache.artifact_name("id", key), cache.artifact_name("fit", key)


def _partition_id(
    folder: Path, id_name: str | None, id_key: str, fraction: float, reusable: Callable[[str], bool]
) -> tuple[str, str, dict, dict]:
    """Split the extracted ID rows into eval (`id`) and `fit` artifacts (stratified, seeded), once.

    The eval artifact keeps the extraction's skipped list, so a reused partition still reports it.
    """
    names = _partition_names(id_key, fraction)
    if not all(reusable(n) for n in names):
        arrays = load_arrays(folder / id_name)  # memory-mapped: rows are copied chunk by chunk below
        fit_idx, eval_idx = id_fit_split(np.asarray(arrays["labels"]), fraction, SPLIT_SEED)
        for name, rows in zip(names, (eval_idx, fit_idx)):
            with ArtifactWriter(folder / name) as out:
                if name == names[0]:
                    out.append(skipped_paths=arrays["skipped_paths"], skipped_errors=arrays["skipped_errors"])
                base = 0
                out.append(thumb_offsets=np.zeros(1, np.int64))
                for chunk in np.array_split(rows, max(1, -(-len(rows) // PARTITION_CHUNK))):
                    out.append(**{k: v[chunk] for k, v in arrays.items() if k in ROW_ARRAYS})
                    data, offsets = thumbs.take(arrays["thumb_data"], arrays["thumb_offsets"], chunk)
                    out.append(thumb_data=data, thumb_offsets=offsets[1:] + base)
                    base += int(offsets[-1])
    return names[0], names[1], _summary(folder / names[0]), _summary(folder / names[1])


ROW_ARRAYS = ("logits", "features", "index", "paths", "labels")
PARTITION_CHUNK = 4096  # rows copied at a time when the ID split is partitioned


def build_fit_entries(fit_dir: str, class_wnids: list[str]):
    """(root, entries, labels) of a --fit-dir (e.g. an ImageNet train subset), restricted to the protocol's classes."""
    from oodcore.data.folders import DatasetError, scan_image_folder

    scan = scan_image_folder(fit_dir)
    position = {w: i for i, w in enumerate(class_wnids)}
    entries = [e for e in scan.entries if e.wnid in position]
    if not entries:
        raise DatasetError(f"--fit-dir {fit_dir} has no images of the protocol's {len(class_wnids)} classes")
    return scan.root, entries, np.asarray([position[e.wnid] for e in entries], dtype=np.int64)
