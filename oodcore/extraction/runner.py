"""A real study run: (architecture, ID folder, OOD folder, protocol) -> a published cache entry.

Each split's extraction (and ODIN grid) is an artifact keyed by what determines
it, so re-running with unchanged inputs is instant, a killed run resumes from its
last chunk, and a changed file, model, preprocessing or protocol recomputes.
"""

from __future__ import annotations

import os
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
from oodcore.extraction.stream import open_npz_maps, take_rows, write_npz_stream
from oodcore.store import cache

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
    return cache.safe_name(name)


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
    """
    from oodcore.extraction.pipeline import extract_split, odin_split
    from oodcore.models.registry import cache_key, load_model

    started = time.time()
    say = progress or (lambda msg, frac: None)
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
    say(f"loading {opts.arch}", 0.0)
    bundle = load_model(opts.arch, device=opts.device, weights=opts.weights)
    channels_last = opts.channels_last  # measured faster on CPU too (bench), and on CUDA with AMP
    if channels_last:
        bundle.network.to(memory_format=torch.channels_last)
    threads = opts.threads
    if threads is None and opts.device == "cpu" and opts.workers > 0:
        threads = max(1, (os.cpu_count() or 1) - opts.workers)  # the cores the decoding workers leave
    folder = cache.arch_dir(root, benchmark, opts.arch)
    base = {"model": cache_key(bundle), "protocol": spec.name, "classes": list(spec.class_wnids)}
    gpu_decode = opts.gpu_decode and opts.device.startswith("cuda") and torch.cuda.is_available()
    if opts.draft or gpu_decode:  # other pixels than a full PIL decode: never mixed with those in one cache entry
        base["decode"] = "+".join(k for k, on in (("jpeg-draft-2x", opts.draft), ("gpu-nvjpeg", gpu_decode)) if on)
    c, h, w = bundle.input_size

    def split_key(split: str, split_root: Path, entries: list) -> str:
        return cache.key_of({**base, "split": split, "root": str(split_root), "files": fingerprint(entries)})

    def extract(split: str, split_root: Path, entries: list, labels: np.ndarray, step: float) -> tuple[str, str, dict]:
        """The split's artifact (cached or computed now): (filename, key, its arrays' index/labels/skipped)."""
        key = split_key(split, split_root, entries)
        target = folder / f"{split}-{key}.npz"
        if not target.is_file():
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
    if partitioned and all((folder / n).is_file() for n in partitioned):
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
            _partition_id(folder, id_name, id_key, opts.fit_fraction)
        dist.barrier()
        files["id"], files["fit"], info["id"], info["fit"] = _partition_id(folder, id_name, id_key, opts.fit_fraction)
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
            target = folder / f"{prefix}-{okey}.npz"
            if not target.is_file():
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
    files["head"] = f"head-{cache.key_of({**base, 'head': True})}.npz"
    if not dist.is_main:  # rank 0 writes the head and publishes run.json
        return benchmark, folder
    if not (folder / files["head"]).is_file():
        weight = bundle.head.weight.detach().float().cpu().numpy()[spec.class_indices]
        bias = bundle.head.bias.detach().float().cpu().numpy()[spec.class_indices]
        cache.write_artifact(folder, files["head"], {"weight": weight, "bias": bias})
    skipped = [{"split": split, **s} for split in ("id", "ood", "fit") for s in info.get(split, {}).get("skipped", [])]
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
        },
    )
    discard_parts(folder / "parts")
    say("done", 1.0)
    return benchmark, folder


def _summary(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        skipped = (
            [{"path": str(p), "error": str(e)} for p, e in zip(z["skipped_paths"], z["skipped_errors"])]
            if "skipped_paths" in z.files
            else []
        )
        return {"n": int(len(z["labels"])), "index": z["index"], "skipped": skipped}


def _partition_names(id_key: str, fraction: float) -> tuple[str, str]:
    key = cache.key_of({"of": id_key, "fit_fraction": fraction, "seed": SPLIT_SEED})
    return f"id-{key}.npz", f"fit-{key}.npz"


def _partition_id(folder: Path, id_name: str | None, id_key: str, fraction: float) -> tuple[str, str, dict, dict]:
    """Split the extracted ID rows into eval (`id`) and `fit` artifacts (stratified, seeded), once.

    The eval artifact keeps the extraction's skipped list, so a reused partition still reports it.
    """
    names = _partition_names(id_key, fraction)
    if not all((folder / n).is_file() for n in names):
        arrays = open_npz_maps(folder / id_name)  # memory maps: rows are copied a block at a time
        fit_idx, eval_idx = id_fit_split(np.asarray(arrays["labels"]), fraction, SPLIT_SEED)
        offsets = np.asarray(arrays["thumb_offsets"])
        for name, rows in zip(names, (eval_idx, fit_idx)):
            part = {
                k: (v.dtype, (len(rows), *v.shape[1:]), take_rows(v, rows))
                for k, v in arrays.items()
                if k in ROW_ARRAYS
            }
            if name == names[0]:
                for k in ("skipped_paths", "skipped_errors"):
                    part[k] = (arrays[k].dtype, arrays[k].shape, lambda a=arrays[k]: [np.asarray(a)])
            lengths = offsets[rows + 1] - offsets[rows]
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            part["thumb_data"] = (np.uint8, (int(new_offsets[-1]),), _thumb_pieces(arrays["thumb_data"], offsets, rows))
            part["thumb_offsets"] = (np.int64, new_offsets.shape, lambda o=new_offsets: [o])
            write_npz_stream(folder / name, part)
        del arrays
    return names[0], names[1], _summary(folder / names[0]), _summary(folder / names[1])


ROW_ARRAYS = ("logits", "features", "index", "paths", "labels")


def _thumb_pieces(data: np.ndarray, offsets: np.ndarray, rows: np.ndarray, block: int = 4096):
    def pieces():
        for start in range(0, len(rows), block):
            picked = rows[start : start + block]
            yield np.concatenate([np.asarray(data[offsets[i] : offsets[i + 1]]) for i in picked])

    return pieces


def build_fit_entries(fit_dir: str, class_wnids: list[str]):
    """(root, entries, labels) of a --fit-dir (e.g. an ImageNet train subset), restricted to the protocol's classes."""
    from oodcore.data.folders import DatasetError, scan_image_folder

    scan = scan_image_folder(fit_dir)
    position = {w: i for i, w in enumerate(class_wnids)}
    entries = [e for e in scan.entries if e.wnid in position]
    if not entries:
        raise DatasetError(f"--fit-dir {fit_dir} has no images of the protocol's {len(class_wnids)} classes")
    return scan.root, entries, np.asarray([position[e.wnid] for e in entries], dtype=np.int64)
