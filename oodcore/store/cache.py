"""On-disk layout of the cache and its keys.

    <cache>/<benchmark>/<arch>/run.json          written last; points at the artifacts below
    <cache>/<benchmark>/<arch>/<split>-<key>.npz logits, features, labels, paths, thumbnails
    <cache>/<benchmark>/<arch>/head-<key>.npz    final layer (rows of the protocol's classes)
    <cache>/<benchmark>/<arch>/odin-<split>-<key>.npz  ODIN grid scores
    <cache>/<benchmark>/<arch>/parts/...          chunks of an unfinished pass (resume)

An artifact's key hashes everything that determines its content (model and
weights, preprocessing, protocol, class mask, the split's file list with sizes
and mtimes, the format version), so a change is never served stale.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from oodcore.store.atomic import load_npz, read_json, write_json, write_npz
from oodcore.store.rundata import BenchmarkData, OdinGrid, OodSet, SplitArrays, TrainedScores

FORMAT_VERSION = 1
RUN_FILE = "run.json"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_ARTIFACT = re.compile(r"^[a-z_]+-[0-9a-f]{16}\.(npz|safetensors)$")


class CacheMissing(FileNotFoundError):
    """Nothing cached under that name: the message says which command creates it."""


def safe_name(name: str) -> str:
    """A benchmark/arch name as a single safe path component."""
    cleaned = _SAFE.sub("_", name).strip("._")
    if not cleaned:
        raise ValueError(f"unusable name {name!r}")
    return cleaned


def key_of(obj: Any) -> str:
    """Stable 16-hex-digit key of a JSON-able object."""
    blob = json.dumps({"format": FORMAT_VERSION, "what": obj}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def arch_dir(root: Path, benchmark: str, arch: str) -> Path:
    return Path(root) / safe_name(benchmark) / safe_name(arch)


def write_artifact(folder: Path, filename: str, arrays: dict[str, np.ndarray]) -> str:
    write_npz(folder / filename, arrays)
    return filename


def write_run(folder: Path, run: dict) -> None:
    """Publish a run: run.json is replaced atomically, then unreferenced artifacts are removed."""
    write_json(folder / RUN_FILE, {"format": FORMAT_VERSION, **run})
    keep = set(run["files"].values())
    for path in folder.iterdir():
        if path.is_file() and _ARTIFACT.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def read_run(root: Path, benchmark: str, arch: str) -> dict:
    path = arch_dir(root, benchmark, arch) / RUN_FILE
    if not path.is_file():
        hint = "python -m oodcore demo" if benchmark == "demo" else "python -m oodcore run ..."
        raise CacheMissing(
            f"no cached run for benchmark {benchmark!r}, arch {arch!r} under {root} (create it with `{hint}`)"
        )
    run = read_json(path)
    if run.get("format") != FORMAT_VERSION:
        raise CacheMissing(
            f"{path} has cache format {run.get('format')}, this version reads {FORMAT_VERSION}: rerun the command that made it"
        )
    return run


def list_runs(root: Path) -> list[dict]:
    """Every published run under `root`, newest first, as its run.json summary."""
    runs = []
    for path in Path(root).glob(f"*/*/{RUN_FILE}"):
        try:
            run = read_json(path)
        except (OSError, ValueError):
            continue
        if run.get("format") == FORMAT_VERSION:
            runs.append(run)
    return sorted(runs, key=lambda r: (r.get("benchmark") != "demo", r.get("benchmark", ""), r.get("arch", "")))


def _split_arrays(arrays: dict[str, np.ndarray], with_features: bool) -> SplitArrays:
    return SplitArrays(
        logits=arrays["logits"],
        features=arrays["features"] if with_features and "features" in arrays else None,
        labels=arrays["labels"],
        paths=arrays["paths"],
    )


def ood_set_entries(run: dict) -> list[dict]:
    """The run's OOD test sets as run.json lists them; a run from before OOD sets has one, named after its folder."""
    sets = run.get("ood_sets")
    if sets:
        return sets
    name = Path(run.get("ood_root") or "ood").name or "ood"
    return [{"name": name, "group": None, "files_key": "ood", "n": run.get("n_ood")}]


def concat_splits(parts: list[SplitArrays]) -> SplitArrays:
    with_features = all(p.features is not None for p in parts)
    return SplitArrays(
        logits=np.concatenate([p.logits for p in parts]),
        features=np.concatenate([p.features for p in parts]) if with_features else None,
        labels=np.concatenate([p.labels for p in parts]),
        paths=np.concatenate([np.asarray(p.paths, dtype=str) for p in parts]),
    )


def load_benchmark(root: Path, benchmark: str, arch: str, *, features: bool = True) -> BenchmarkData:
    """Load a published run into memory (pickle-free)."""
    folder = arch_dir(root, benchmark, arch)
    run = read_run(root, benchmark, arch)
    files = run["files"]

    def load(name: str) -> dict[str, np.ndarray]:
        wanted = ("logits", "features", "labels", "paths") if features else ("logits", "labels", "paths")
        with np.load(folder / files[name], allow_pickle=False) as z:
            return {k: z[k] for k in wanted if k in z.files}

    data = BenchmarkData(
        benchmark=run["benchmark"],
        arch=run["arch"],
        protocol=run["protocol"],
        class_ids=list(run["class_ids"]),
        class_names=list(run["class_names"]),
        id=_split_arrays(load("id"), features),
        ood=_split_arrays(load("ood"), features),
        meta=run,
    )
    sets = ood_set_entries(run)
    parts = [data.ood] + [_split_arrays(load(s["files_key"]), features) for s in sets[1:]]
    if len(parts) > 1:  # several OOD test sets: `ood` is their rows in order (oodcore.store.scopes)
        for part, s in zip(parts, sets):  # paths are relative to each set's root: `<set>/<path>` keeps them apart
            part.paths = np.char.add(f"{s['name']}/", np.asarray(part.paths, dtype=str))
        data.ood = concat_splits(parts)
    bounds = np.cumsum([0] + [len(p) for p in parts])
    data.ood_sets = [OodSet(s["name"], s.get("group"), int(a), int(b)) for s, a, b in zip(sets, bounds, bounds[1:])]
    if run.get("tune_set") and "tune" in files:
        data.tune, data.tune_name = _split_arrays(load("tune"), features), run["tune_set"]["name"]
    if "fit" in files:
        data.fit = _split_arrays(load("fit"), features)
    if "head" in files:
        head = load_npz(folder / files["head"])
        data.head_weight, data.head_bias = head["weight"], head["bias"]
    odin_keys = ["odin_" + s["files_key"] for s in sets]
    if "odin_id" in files and all(k in files for k in odin_keys):
        gid = load_npz(folder / files["odin_id"])
        good = np.concatenate([load_npz(folder / files[k])["scores"] for k in odin_keys])
        tune = (
            load_npz(folder / files["odin_tune"])["scores"] if data.tune is not None and "odin_tune" in files else None
        )
        data.odin = OdinGrid(temps=gid["temps"], eps=gid["eps"], id=gid["scores"], ood=good, tune=tune)
    data.trained = load_trained(folder, run)
    return data


TRAINED_DIR = "trained"


def trained_paths(folder: Path, name: str) -> tuple[Path, Path]:
    base = folder / TRAINED_DIR / safe_name(name)
    return base.with_suffix(".json"), base.with_suffix(".npz")


def save_trained(folder: Path, name: str, scores_id: np.ndarray, scores_ood: np.ndarray, meta: dict) -> None:
    """Publish a trained detector's scores next to the run it was trained on (scores first, then its JSON)."""
    run = read_json(folder / RUN_FILE)
    meta_path, npz_path = trained_paths(folder, name)
    write_npz(npz_path, {"id": np.asarray(scores_id, np.float64), "ood": np.asarray(scores_ood, np.float64)})
    write_json(meta_path, {**meta, "name": name, "run_files": _score_inputs(run["files"])})


def _score_inputs(files: dict) -> dict:
    """The artifacts a trained detector's scores depend on: ID, every OOD set, the tuning set."""
    return {k: v for k, v in files.items() if k in ("id", "tune") or k == "ood" or k.startswith("ood+")}


def load_trained(folder: Path, run: dict) -> dict[str, TrainedScores]:
    """Trained detectors whose inputs are the run's current artifacts; stale ones are ignored."""
    out = {}
    for meta_path in sorted((folder / TRAINED_DIR).glob("*.json")):
        try:
            meta = read_json(meta_path)
            if meta.get("run_files") != _score_inputs(run["files"]):
                continue
            scores = load_npz(meta_path.with_suffix(".npz"))
        except (OSError, ValueError, KeyError):
            continue
        out[meta["name"]] = TrainedScores(scores["id"], scores["ood"], meta)
    return out


def load_thumbnails(root: Path, benchmark: str, arch: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(packed JPEG bytes, offsets) of a split's thumbnails; see oodcore.store.thumbs.unpack_one.

    `ood` gives every OOD test set's thumbnails, in the order of the run's `ood` rows."""
    run = read_run(root, benchmark, arch)
    keys = [s["files_key"] for s in ood_set_entries(run)] if split == "ood" else [split]
    data, offsets, base = [], [], 0
    for key in keys:
        with np.load(arch_dir(root, benchmark, arch) / run["files"][key], allow_pickle=False) as z:
            d, o = z["thumb_data"], z["thumb_offsets"]
        data.append(d)
        offsets.append((o if not offsets else o[1:]) + base)
        base += len(d)
    if len(keys) == 1:
        return data[0], offsets[0]
    return np.concatenate(data), np.concatenate(offsets)
