"""The shared bundle's on-disk format and its reader (numpy + JSON only: no torch, no pickle).

    <bundle>/bundle.json                         {"format": "oodcore-bundle", "version", "runs": [...], ...}
    <bundle>/<benchmark>/<arch>/run.json         the run's public summary + {"bundle": {"arrays", "thumbs", ...}}
    <bundle>/<benchmark>/<arch>/<name>.<i>.npy   an array, split along its first axis into parts
    <bundle>/<benchmark>/thumbs/<split>-<key>.<i>.npy  JPEG-packed thumbnails, stored once per benchmark

Every file stays under PART_BYTES (GitHub refuses files over 100 MB and warns above 50 MB).
The reader builds the same BenchmarkData the cache gives, with each method's default-setting
scores attached as per-row precomputed values (oodcore.detectors.registry.DEFAULT_SCORES), so
the explorer reads a bundle exactly like a cache (OODCORE_CACHE pointing at it).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from oodcore.detectors.registry import DEFAULT_SCORES
from oodcore.store.atomic import read_json, write_json
from oodcore.store.cache import CacheMissing, safe_name
from oodcore.store.rundata import BenchmarkData, OdinGrid, SplitArrays, TrainedScores

FORMAT = "oodcore-bundle"
VERSION = 1
BUNDLE_FILE = "bundle.json"
RUN_FILE = "run.json"
PART_BYTES = 45 * 2**20  # every file below GitHub's 50 MB warning
_PART = re.compile(r"^[A-Za-z0-9._+-]+\.[0-9]{3}\.npy$")
_STEM = re.compile(r"^[A-Za-z0-9._+/-]+$")


def is_bundle(root: Path) -> bool:
    return (Path(root) / BUNDLE_FILE).is_file()


def read_manifest(root: Path) -> dict:
    manifest = read_json(Path(root) / BUNDLE_FILE)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMissing(
            f"not an oodcore bundle of version {VERSION} (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r}): make it again with `oodcore share`"
        )
    return manifest


# ---------------------------------------------------------------- writing


def save_array(folder: Path, stem: str, array: np.ndarray, part_bytes: int = PART_BYTES) -> dict:
    """Write `array` as <stem>.000.npy, <stem>.001.npy, ... each under `part_bytes`; returns its manifest entry."""
    array = np.ascontiguousarray(array)
    if array.dtype == object:
        raise TypeError(f"{stem}: object arrays cannot be stored without pickle")
    folder.mkdir(parents=True, exist_ok=True)
    row_bytes = max(1, array.nbytes // max(len(array), 1)) if array.ndim else array.nbytes
    rows_per_part = max(1, (part_bytes - 4096) // row_bytes)
    parts = []
    starts = range(0, max(len(array), 1), rows_per_part) if array.ndim else [0]
    for i, start in enumerate(starts):
        name = f"{Path(stem).name}.{i:03d}.npy"
        chunk = array[start : start + rows_per_part] if array.ndim else array
        np.save(folder / name, chunk, allow_pickle=False)
        parts.append(name)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "parts": parts}


def write_bundle_manifest(root: Path, manifest: dict) -> None:
    write_json(Path(root) / BUNDLE_FILE, {"format": FORMAT, "version": VERSION, **manifest})


def write_run_manifest(folder: Path, run: dict) -> None:
    write_json(folder / RUN_FILE, run)


# ---------------------------------------------------------------- reading


def load_array(folder: Path, entry: dict) -> np.ndarray:
    """Concatenate an array's parts (pickle-free); a single part stays memory-mapped."""
    parts = entry["parts"]
    for name in parts:
        if not _PART.match(name):
            raise ValueError(f"bad part name {name!r} in the bundle")
    arrays = [np.load(folder / name, mmap_mode="r", allow_pickle=False) for name in parts]
    out = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    if list(out.shape) != list(entry["shape"]) or out.dtype.str != entry["dtype"]:
        raise ValueError(f"{folder / parts[0]}: shape {out.shape} {out.dtype.str}, expected {entry}")
    return out


def list_runs(root: Path) -> list[dict]:
    """The bundle's runs, in the order the manifest lists them."""
    root = Path(root)
    runs = []
    for item in read_manifest(root).get("runs", []):
        try:
            runs.append(read_run(root, item["benchmark"], item["arch"]))
        except (OSError, ValueError, KeyError):
            continue
    return runs


def run_dir(root: Path, benchmark: str, arch: str) -> Path:
    return Path(root) / safe_name(benchmark) / safe_name(arch)


def read_run(root: Path, benchmark: str, arch: str) -> dict:
    path = run_dir(root, benchmark, arch) / RUN_FILE
    if not path.is_file():
        raise CacheMissing(f"this bundle has no run for benchmark {benchmark!r}, arch {arch!r}")
    return read_json(path)


def _split(folder: Path, arrays: dict, split: str, features: bool) -> SplitArrays | None:
    if f"{split}/logits" not in arrays:
        return None
    get = lambda name: load_array(folder, arrays[f"{split}/{name}"])  # noqa: E731
    rows = SplitArrays(
        logits=get("logits"),
        features=get("features") if features and f"{split}/features" in arrays else None,
        labels=np.asarray(get("labels"), dtype=np.int64),
        paths=get("paths"),
        predictions=np.asarray(get("preds"), dtype=np.int64) if f"{split}/preds" in arrays else None,
    )
    return rows


def load_benchmark(root: Path, benchmark: str, arch: str, *, features: bool = True) -> BenchmarkData:
    """A bundled run as BenchmarkData: float16 logits, stored predictions, default scores as precomputed rows."""
    folder = run_dir(root, benchmark, arch)
    run = read_run(root, benchmark, arch)
    info = run["bundle"]
    arrays = info["arrays"]
    data = BenchmarkData(
        benchmark=run["benchmark"],
        arch=run["arch"],
        protocol=run["protocol"],
        class_ids=list(run["class_ids"]),
        class_names=list(run["class_names"]),
        id=_split(folder, arrays, "id", features),
        ood=_split(folder, arrays, "ood", features),
        meta=run,
    )
    data.fit = _split(folder, arrays, "fit", features)
    if "head/weight" in arrays:
        data.head_weight = load_array(folder, arrays["head/weight"])
        data.head_bias = load_array(folder, arrays["head/bias"])
    if "odin/id" in arrays:
        data.odin = OdinGrid(
            temps=load_array(folder, arrays["odin/temps"]),
            eps=load_array(folder, arrays["odin/eps"]),
            id=load_array(folder, arrays["odin/id"]),
            ood=load_array(folder, arrays["odin/ood"]),
        )
    data.trained = {
        name: TrainedScores(
            load_array(folder, arrays[f"trained/{name}/id"]), load_array(folder, arrays[f"trained/{name}/ood"]), meta
        )
        for name, meta in info.get("trained", {}).items()
    }
    for name in info.get("defaults", []):
        for split in ("id", "ood"):
            getattr(data, split).precomputed[DEFAULT_SCORES + name] = load_array(
                folder, arrays[f"default/{name}/{split}"]
            )
    return data


def load_thumbnails(root: Path, benchmark: str, arch: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(packed JPEG bytes, offsets) of a split's thumbnails, as oodcore.store.cache.load_thumbnails gives them."""
    run = read_run(root, benchmark, arch)
    entry = run["bundle"].get("thumbs", {}).get(split)
    if entry is None:
        raise KeyError(f"this bundle has no thumbnails for the {split} split of {arch}")
    folder = Path(root) / safe_name(benchmark) / "thumbs"
    return load_array(folder, entry["data"]), load_array(folder, entry["offsets"])
