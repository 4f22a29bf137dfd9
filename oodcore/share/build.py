"""Make a shared bundle from a cache: what the read-only pages need, compact, in files under 50 MB.

Per architecture: every method's per-image scores at its default setting (computed here, where
the features and the fit split are), every trained detector's scores, the ODIN grid, the
protocol-masked logits in float16 (Energy's T and ODIN's T at ε = 0 stay live), labels,
predictions (from the full-precision logits), paths and thumbnails. With `with_features` also
the features (float16), the fit split and the final layer, so fitted methods' sliders stay live.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np

import oodcore
from oodcore import detectors as M
from oodcore.detectors.registry import registry_key
from oodcore.share import bundle as B
from oodcore.share.scoring import Progress, run_report
from oodcore.store import cache as C

# What a run's public summary may carry: no server paths (id_root, ood_root, fit folders), no timings.
PUBLIC_KEYS = (
    "benchmark",
    "arch",
    "protocol",
    "key",
    "class_ids",
    "class_names",
    "files",
    "n_id",
    "n_ood",
    "n_fit",
    "model",
    "preprocess",
)

REPORT_BOOT = 200  # the leaderboard's bootstrap replicates: its report is stored, not recomputed in the app


def _public_run(run: dict) -> dict:
    out = {k: run[k] for k in PUBLIC_KEYS if k in run}
    model = out.get("model")
    if isinstance(model, dict):  # a weights path is a server path
        out["model"] = {k: v for k, v in model.items() if k in ("name", "source", "epochs", "seed", "pretrained")}
    out["skipped"] = [
        {"path": Path(str(s.get("path", ""))).name, **{k: v for k, v in s.items() if k == "reason"}}
        for s in run.get("skipped", [])
        if isinstance(s, dict)
    ]
    return out


def _split_arrays(folder: Path, split: str, rows, *, features: bool) -> dict:
    arrays = {
        f"{split}/logits": B.save_array(folder, f"{split}-logits", np.asarray(rows.logits, dtype=np.float16)),
        f"{split}/labels": B.save_array(folder, f"{split}-labels", np.asarray(rows.labels, dtype=np.int32)),
        f"{split}/preds": B.save_array(folder, f"{split}-preds", np.asarray(rows.preds, dtype=np.int32)),
        f"{split}/paths": B.save_array(folder, f"{split}-paths", np.asarray(rows.paths, dtype=str)),
    }
    if features and rows.features is not None:
        arrays[f"{split}/features"] = B.save_array(
            folder, f"{split}-features", np.asarray(rows.features, dtype=np.float16)
        )
    return arrays


def _thumbs(root: Path, out: Path, benchmark: str, arch: str) -> dict:
    """Each split's packed thumbnails, stored once per benchmark (architectures share the images)."""
    entries = {}
    folder = out / C.safe_name(benchmark) / "thumbs"
    for split in ("id", "ood"):
        try:
            data, offsets = C.load_thumbnails(root, benchmark, arch, split)
        except (KeyError, OSError, ValueError):
            continue
        digest = hashlib.sha256(np.ascontiguousarray(offsets).tobytes())
        digest.update(np.ascontiguousarray(data).tobytes())
        stem = f"{split}-{digest.hexdigest()[:16]}"
        entry = {"data": None, "offsets": None}
        if (folder / f"{stem}-data.000.npy").is_file():
            entry["data"] = {"dtype": "|u1", "shape": [len(data)], "parts": _parts(folder, f"{stem}-data")}
            entry["offsets"] = {"dtype": "<i8", "shape": [len(offsets)], "parts": _parts(folder, f"{stem}-offsets")}
        else:
            entry["data"] = B.save_array(folder, f"{stem}-data", np.asarray(data, dtype=np.uint8))
            entry["offsets"] = B.save_array(folder, f"{stem}-offsets", np.asarray(offsets, dtype=np.int64))
        entries[split] = entry
    return entries


def _parts(folder: Path, stem: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{stem}.[0-9][0-9][0-9].npy"))


def bundle_run(root: Path, out: Path, benchmark: str, arch: str, *, with_features: bool = False) -> dict:
    """Write one architecture's part of the bundle under `out`; returns its run manifest."""
    data = C.load_benchmark(root, benchmark, arch, features=True)  # defaults need what fitted methods need
    run = _public_run(data.meta)
    folder = out / C.safe_name(benchmark) / C.safe_name(arch)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    arrays = {}
    for split in ("id", "ood"):
        arrays.update(_split_arrays(folder, split, getattr(data, split), features=with_features))
    if with_features and data.fit is not None and len(data.fit):
        arrays.update(_split_arrays(folder, "fit", data.fit, features=True))
    elif data.fit is not None and len(data.fit):  # logit-fitted methods (temperature scaling) stay live
        arrays.update(_split_arrays(folder, "fit", data.fit, features=False))
    if with_features and data.head_weight is not None:
        arrays["head/weight"] = B.save_array(folder, "head-weight", np.asarray(data.head_weight, np.float32))
        arrays["head/bias"] = B.save_array(folder, "head-bias", np.asarray(data.head_bias, np.float32))
    if data.odin is not None:
        for name in ("temps", "eps"):
            arrays[f"odin/{name}"] = B.save_array(folder, f"odin-{name}", np.asarray(getattr(data.odin, name)))
        for split in ("id", "ood"):
            arrays[f"odin/{split}"] = B.save_array(
                folder, f"odin-{split}", np.asarray(getattr(data.odin, split), np.float32)
            )
    defaults, missing = [], {}
    for method in M.REGISTRY.values():
        if not method.available(data):
            missing[method.name] = f"the cache lacks {', '.join(sorted(M.missing_needs(method, data)))}"
            continue
        try:
            s_id, s_ood = method.score_id_ood(data)
        except M.MethodUnavailable as exc:
            missing[method.name] = str(exc)
            continue
        arrays[f"default/{method.name}/id"] = B.save_array(folder, f"default-{method.name}-id", s_id)
        arrays[f"default/{method.name}/ood"] = B.save_array(folder, f"default-{method.name}-ood", s_ood)
        defaults.append(method.name)
    trained = {}
    for i, (name, scores) in enumerate(sorted(data.trained.items())):
        arrays[f"trained/{name}/id"] = B.save_array(folder, f"trained-{i}-id", np.asarray(scores.id, np.float64))
        arrays[f"trained/{name}/ood"] = B.save_array(folder, f"trained-{i}-ood", np.asarray(scores.ood, np.float64))
        trained[name] = {k: v for k, v in scores.meta.items() if k not in ("run_files", "checkpoint", "job_dir")}
    run["bundle"] = {
        "arrays": arrays,
        "thumbs": _thumbs(root, out, benchmark, arch),
        "defaults": defaults,
        "not_stored": missing,
        "trained": trained,
        "with_features": bool(with_features),
        "logits_dtype": "float16",
        "id_top1": data.id_top1(),
        # the leaderboard's report from the full-precision cache (the app serves it instead of recomputing it)
        "report": {"n_boot": REPORT_BOOT, "registry": registry_key(), "report": run_report(data, REPORT_BOOT)},
    }
    B.write_run_manifest(folder, run)
    return run


def build_bundle(
    root: Path,
    benchmark: str,
    archs: list[str] | None,
    out: Path,
    *,
    with_features: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Bundle `archs` (default: every cached one) of `benchmark` from the cache at `root` into `out`."""
    root, out = Path(root), Path(out)
    archs = C.benchmark_archs(root, benchmark, archs)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    runs = []
    for i, arch in enumerate(archs):
        if progress:
            progress(f"bundling {arch} ({i + 1}/{len(archs)})", i / len(archs))
        runs.append(bundle_run(root, out, benchmark, arch, with_features=with_features))
    manifest = {
        "oodcore_version": oodcore.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "benchmark": benchmark,
        "with_features": bool(with_features),
        "runs": [{"benchmark": r["benchmark"], "arch": r["arch"]} for r in runs],
    }
    B.write_bundle_manifest(out, manifest)
    if progress:
        progress("bundle written", 1.0)
    return {**manifest, "run_summaries": runs}
