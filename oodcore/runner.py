"""A real study run: (architecture, ID folder, OOD folder, protocol) -> a published cache entry.

Each split's extraction (and ODIN grid) is an artifact keyed by what determines
it, so re-running with unchanged inputs is instant, a killed run resumes from its
last chunk, and a changed file, model, preprocessing or protocol recomputes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import cache
from .datasets import ImageFileDataset, fingerprint
from .extract import discard_parts
from .imagenet_classes import class_name
from .methods import STUDY_EPSILONS, STUDY_TEMPERATURES
from .protocols import build_protocol

Progress = Callable[[str, float], None]


@dataclass
class RunOptions:
    arch: str
    id_dir: str
    ood_dir: str
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
    weights: str | None = None
    amp: bool = True
    channels_last: bool = True
    notes: list[str] = field(default_factory=list)


def default_name(opts: RunOptions) -> str:
    """`<id folder>-vs-<ood folder>-<protocol>[-limitN]`, e.g. `val-vs-imagenet-o-imagenet-o`."""
    name = f"{Path(opts.id_dir).resolve().name}-vs-{Path(opts.ood_dir).resolve().name}-{opts.protocol}"
    if opts.ood_list:
        name += f"-{opts.ood_list_mode}-{Path(opts.ood_list).stem}"
    if opts.limit:
        name += f"-limit{opts.limit}"
    return cache.safe_name(name)


def run_study(opts: RunOptions, root: Path, progress: Progress | None = None,
              stop_after_chunks: int | None = None) -> tuple[str, Path]:
    """Extract (or reuse) everything for one run and publish its run.json; returns (benchmark, folder)."""
    from .models import cache_key, load_model
    from .pipeline import extract_split, odin_split

    started = time.time()
    say = progress or (lambda msg, frac: None)
    spec = build_protocol(opts.id_dir, opts.ood_dir, opts.protocol, ood_list=opts.ood_list,
                          ood_list_mode=opts.ood_list_mode, limit=opts.limit)
    benchmark = opts.name or default_name(opts)
    say(f"loading {opts.arch}", 0.0)
    bundle = load_model(opts.arch, device=opts.device, weights=opts.weights)
    folder = cache.arch_dir(root, benchmark, opts.arch)
    model_key = cache_key(bundle)
    base = {"model": model_key, "protocol": spec.name, "classes": list(spec.class_wnids)}
    files: dict[str, str] = {}
    skipped: list[dict] = []
    counts = {}
    c, h, w = bundle.input_size
    splits = {"id": (spec.id_root, spec.id_files, spec.id_labels),
              "ood": (spec.ood_root, spec.ood_files, np.full(len(spec.ood_files), -1, np.int64))}
    for k, (split, (split_root, entries, labels)) in enumerate(splits.items()):
        key = cache.key_of({**base, "split": split, "root": str(split_root), "files": fingerprint(entries)})
        dataset = ImageFileDataset(split_root, entries, bundle.transform, image_shape=(c, h, w))
        paths = [e.relpath for e in entries]
        target = folder / f"{split}-{key}.npz"
        if target.is_file():
            say(f"{split}: cached", (k + 1) / 2)
            with np.load(target, allow_pickle=False) as z:
                index, split_skipped = z["index"], [{"path": p, "error": e} for p, e in zip(z["skipped_paths"], z["skipped_errors"])]
        else:
            parts = folder / "parts" / f"{split}-{key}"
            arrays, split_skipped = extract_split(
                bundle, dataset, paths, spec.class_indices, parts, device=opts.device, batch_size=opts.batch_size,
                workers=opts.workers, amp=opts.amp, channels_last=opts.channels_last, desc=f"{opts.arch} {split}",
                progress=lambda d, n, k=k, split=split: say(f"extracting {split} ({d}/{n})", (k + d / max(n, 1)) / 2),
                stop_after_chunks=stop_after_chunks)
            arrays["labels"] = labels[arrays["index"]]
            arrays["skipped_paths"] = np.asarray([s["path"] for s in split_skipped], dtype=str)
            arrays["skipped_errors"] = np.asarray([s["error"] for s in split_skipped], dtype=str)
            cache.write_artifact(folder, target.name, arrays)
            discard_parts(parts)
            index = arrays["index"]
        files[split] = target.name
        skipped += [{"split": split, **s} for s in split_skipped]
        counts[split] = int(len(index))
        if counts[split] == 0:
            raise ValueError(f"every {split} image was unreadable ({len(entries)} tried); see the skipped list")
        if opts.odin_grid:
            okey = cache.key_of({"of": key, "temps": list(opts.temps), "eps": list(opts.eps)})
            otarget = folder / f"odin_{split}-{okey}.npz"
            if not otarget.is_file():
                parts = folder / "parts" / f"odin_{split}-{okey}"
                scores = odin_split(bundle, dataset, spec.class_indices, index, parts, opts.temps, opts.eps,
                                    device=opts.device, batch_size=max(1, opts.batch_size // 2), workers=opts.workers,
                                    desc=f"{opts.arch} {split} ODIN",
                                    progress=lambda d, n, split=split: say(f"ODIN grid on {split} ({d}/{n})", d / max(n, 1)))
                cache.write_artifact(folder, otarget.name, {"temps": np.asarray(opts.temps, float),
                                                            "eps": np.asarray(opts.eps, float), "scores": scores})
                discard_parts(parts)
            files[f"odin_{split}"] = otarget.name
    head_key = cache.key_of({**base, "head": True})
    files["head"] = f"head-{head_key}.npz"
    if not (folder / files["head"]).is_file():
        weight = bundle.head.weight.detach().float().cpu().numpy()[spec.class_indices]
        bias = bundle.head.bias.detach().float().cpu().numpy()[spec.class_indices]
        cache.write_artifact(folder, files["head"], {"weight": weight, "bias": bias})
    cache.write_run(folder, {
        "benchmark": benchmark, "arch": opts.arch, "protocol": spec.name,
        "class_ids": list(spec.class_wnids), "class_names": [class_name(w) for w in spec.class_wnids],
        "files": files, "n_id": counts["id"], "n_ood": counts["ood"], "skipped": skipped,
        "model": bundle.identity, "preprocess": bundle.preprocess,
        "id_root": str(spec.id_root), "ood_root": str(spec.ood_root),
        "protocol_spec": {k: v for k, v in spec.to_json().items() if k != "class_wnids"},
        "limit": opts.limit, "ood_list": opts.ood_list, "ood_list_mode": opts.ood_list_mode if opts.ood_list else None,
        "ignored_files": spec.ignored[:100], "n_ignored_files": len(spec.ignored), "notes": spec.notes,
        "seconds": round(time.time() - started, 2),
    })
    discard_parts(folder / "parts")
    return benchmark, folder
