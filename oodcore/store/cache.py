"""On-disk layout of the cache (format 2), its keys, integrity records and locks.

    <cache>/<benchmark>/<arch>/run.json                written last; points at the artifacts below
    <cache>/<benchmark>/<arch>/<split>-<key>.arrays/   logits, features, labels, paths, index, thumbnails
    <cache>/<benchmark>/<arch>/head-<key>.arrays/      final layer (rows of the protocol's classes)
    <cache>/<benchmark>/<arch>/odin_<split>-<key>.arrays/  ODIN grid scores
    <cache>/<benchmark>/<arch>/trained/<name>.json|npz trained detectors' scores
    <cache>/<benchmark>/<arch>/parts/...               chunks of an unfinished pass (resume)
    <cache>/<benchmark>/<arch>/.run.lock, .read.lock   see oodcore.store.locks

Each `.arrays` folder holds one `.npy` per array, opened with mmap_mode="r" (oodcore.store.arrays,
which also has the chunk writer extraction streams into). run.json's `integrity` records every
artifact's sizes and xxh3 checksums (oodcore.store.integrity); reads verify them and any bad file
is one typed error (CacheError) naming the run, the file and the repair command.

An artifact's key hashes everything that determines its content (model and
weights, preprocessing, protocol, class mask, the split's file list with sizes
and mtimes, KEY_VERSION), so a change is never served stale. Format-1 caches
(.npz files) are converted in place by `python -m oodcore verify --repair` (`migrate_v1`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from oodcore.store import locks
from oodcore.store.arrays import SUFFIX, artifact_name, write_arrays
from oodcore.store.atomic import read_json, write_json, write_npz
from oodcore.store.integrity import (
    ArtifactDamaged,
    CacheDamaged,
    CacheError,
    CacheMissing,
    artifact_digest,
    check_file,
    digest,
    load_arrays,
    verify,
)
from oodcore.store.rundata import BenchmarkData, OdinGrid, OodSet, SplitArrays, TrainedScores

__all__ = ["CacheError", "CacheMissing", "CacheDamaged", "ArtifactDamaged", "artifact_name"]

FORMAT_VERSION = 2  # 1: .npz artifacts (read by `verify --repair`, which converts them); 2: .npy folders
KEY_VERSION = 1  # part of every artifact key; unchanged by the format, so converted artifacts stay reusable
RUN_FILE = "run.json"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_ARTIFACT = re.compile(r"^[a-z_]+-[0-9a-f]{16}\.(npz|safetensors|arrays)$")
DEMO_REPAIR = "python -m oodcore verify --repair (or python -m oodcore demo --rebuild)"


def safe_name(name: str) -> str:
    """A benchmark/arch name as a single safe path component."""
    cleaned = _SAFE.sub("_", name).strip("._")
    if not cleaned:
        raise ValueError(f"unusable name {name!r}")
    return cleaned


def key_of(obj: Any) -> str:
    """Stable 16-hex-digit key of a JSON-able object."""
    blob = json.dumps({"format": KEY_VERSION, "what": obj}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def arch_dir(root: Path, benchmark: str, arch: str) -> Path:
    return Path(root) / safe_name(benchmark) / safe_name(arch)


def repair_command(benchmark: str, arch: str, run: dict | None = None) -> str:
    """The command that recomputes a run's damaged or missing artifacts (and only those)."""
    if benchmark == "demo":
        return DEMO_REPAIR
    if run and run.get("rerun"):
        return run["rerun"]
    return f"rerun the `python -m oodcore run --name {benchmark} --arch {arch} ...` command that made it"


def write_artifact(folder: Path, filename: str, arrays: dict[str, np.ndarray]) -> str:
    """Write an artifact: a `.arrays` name becomes a folder of memory-mappable .npy files, `.npz` one file."""
    if filename.endswith(SUFFIX):
        write_arrays(folder / filename, arrays)
    else:
        write_npz(folder / filename, arrays)
    return filename


def write_run(folder: Path, run: dict) -> None:
    """Publish a run: every artifact's size and checksum go into run.json, which is replaced atomically.

    Then artifacts no longer referenced are deleted, but only while no reader is loading this
    folder (see oodcore.store.locks); the caller holds the folder's run lock.
    """
    integrity = {name: artifact_digest(folder / name) for name in run["files"].values()}
    write_json(folder / RUN_FILE, {"format": FORMAT_VERSION, **run, "integrity": integrity})
    collect_garbage(folder, set(run["files"].values()))


def collect_garbage(folder: Path, keep: set[str]) -> int:
    """Delete superseded artifacts of `folder` when no reader holds it; returns how many went."""
    removed = 0
    with locks.collecting(folder) as safe:
        if not safe:
            return 0
        for path in folder.iterdir():
            if _ARTIFACT.match(path.name) and path.name not in keep:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
    return removed


def read_run(root: Path, benchmark: str, arch: str) -> dict:
    """A run's run.json; CacheMissing when there is none, CacheDamaged when it cannot be used."""
    path = arch_dir(root, benchmark, arch) / RUN_FILE
    if not path.is_file():
        hint = "python -m oodcore demo" if benchmark == "demo" else "python -m oodcore run ..."
        raise CacheMissing(
            f"no cached run for benchmark {benchmark!r}, arch {arch!r} under {root} (create it with `{hint}`)"
        )
    return _parse_run(path, benchmark, arch)


def _parse_run(path: Path, benchmark: str, arch: str) -> dict:
    repair = repair_command(benchmark, arch)
    try:
        run = read_json(path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "truncated or not JSON"
        raise CacheDamaged(
            f"run {benchmark} · {arch}: run.json is damaged ({reason})", path=path, repair=repair
        ) from None
    if not isinstance(run, dict):
        raise CacheDamaged(f"run {benchmark} · {arch}: run.json is damaged (not an object)", path=path, repair=repair)
    if run.get("format") == 1:
        raise CacheMissing(
            f"run {benchmark} · {arch} is in the old cache format 1 (.npz files read whole); this version reads "
            "memory-mapped .npy folders (format 2)",
            path=path,
            repair="python -m oodcore verify --repair (converts it in place) or rerun the command that made it",
        )
    if run.get("format") != FORMAT_VERSION:
        raise CacheMissing(
            f"run {benchmark} · {arch} has cache format {run.get('format')}, this version reads {FORMAT_VERSION}",
            path=path,
            repair=run.get("rerun") or "rerun the command that made it",
        )
    files = run.get("files")
    lacking = [k for k in ("benchmark", "arch", "protocol", "class_ids", "class_names") if k not in run]
    if not isinstance(files, dict) or not files or lacking or not all(isinstance(v, str) for v in files.values()):
        what = "its list of files" if not isinstance(files, dict) or not files else ", ".join(lacking) or "file names"
        raise CacheDamaged(f"run {benchmark} · {arch}: run.json is damaged (it lacks {what})", path=path, repair=repair)
    return run


def artifact_record(run: dict | None, name: str) -> dict | None:
    return ((run or {}).get("integrity") or {}).get(name)


def previous_run(folder: Path) -> dict | None:
    """The run.json now published in `folder`, or None when there is none or it is damaged."""
    try:
        return _parse_run(folder / RUN_FILE, folder.parent.name, folder.name)
    except CacheError:
        return None


def artifact_ok(folder: Path, name: str, previous: dict | None, say=None) -> bool:
    """Whether an artifact can be reused: present and matching its record (or, unrecorded, readable whole).

    A damaged one is reported through `say` and will be recomputed by the caller.
    """
    path = Path(folder) / name
    if not path.exists():
        return False
    try:
        check_file(path, artifact_record(previous, name))
    except CacheDamaged as exc:
        if say is not None:
            say(f"{exc.what}: recomputing it")
        return False
    return True


def verify_run(root: Path, benchmark: str, arch: str, *, full: bool = True, fitted: bool = False) -> list[CacheError]:
    """Every problem of one run: its run.json, each artifact (size + checksum), its trained detectors, and (with
    `fitted`, as `oodcore verify` asks) its stored fitted states and tables. Those are recomputed on use when
    damaged, so a reader that needs the run itself (the app, `train`, the demo's check) is never stopped by them."""
    folder = arch_dir(root, benchmark, arch)
    try:
        run = _parse_run(folder / RUN_FILE, benchmark, arch)
    except CacheError as exc:
        return [exc]
    repair = repair_command(benchmark, arch, run)
    problems: list[CacheError] = []
    for name in dict.fromkeys(run["files"].values()):
        record = artifact_record(run, name)
        try:
            if record is not None and full:
                verify(folder / name, record, full=True, repair=repair)
            else:
                check_file(folder / name, record, repair=repair)
        except CacheError as exc:
            problems.append(exc)
    for meta_path in sorted((folder / TRAINED_DIR).glob("*.json")):
        try:
            _load_one_trained(meta_path, run)
        except CacheError as exc:
            problems.append(exc)
    stored = sorted((folder / FITTED_DIR).glob("*.npz")) + sorted((folder / FITTED_DIR).glob("*.arrays"))
    for path in stored if fitted else []:  # fitted states (read back whole) and per-split tables (recorded checksums)
        try:
            check_file(path, None, repair=FITTED_REPAIR)
        except CacheError as exc:
            problems.append(exc)
    return problems


def list_runs(root: Path, damaged: list | None = None) -> list[dict]:
    """Every published run under `root` as its run.json summary; unusable ones go to `damaged` (CacheError)."""
    runs = []
    for path in sorted(Path(root).glob(f"*/*/{RUN_FILE}")):
        try:
            run = _parse_run(path, path.parent.parent.name, path.parent.name)
        except CacheError as exc:
            if damaged is not None:
                damaged.append(exc)
            continue
        runs.append(run)
    return sorted(runs, key=lambda r: (r.get("benchmark") != "demo", r.get("benchmark", ""), r.get("arch", "")))


def benchmark_archs(root: Path, benchmark: str, archs: list[str] | None = None) -> list[str]:
    """`archs` (default: every cached architecture of `benchmark`), each checked to have a usable run under `root`."""
    known = [r["arch"] for r in list_runs(root) if r.get("benchmark") == benchmark]
    if not known:
        raise CacheMissing(f"no cached run of benchmark {benchmark!r} under {root} (see `oodcore list`)")
    archs = list(archs or known)
    unknown = [a for a in archs if a not in known]
    if unknown:
        raise CacheMissing(f"benchmark {benchmark!r} has no cached run for {', '.join(unknown)}; cached: {known}")
    return archs


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
    """Load a published run into memory (pickle-free, every file verified; CacheError when it cannot be used)."""
    folder = arch_dir(root, benchmark, arch)
    with locks.reading(folder):
        run = read_run(root, benchmark, arch)
        files = run["files"]
        repair = repair_command(benchmark, arch, run)
        for role in ("id", "ood"):
            if role not in files:
                raise CacheDamaged(
                    f"run {benchmark} · {arch}: run.json lacks its {role} split", path=folder / RUN_FILE, repair=repair
                )

        def load(role: str, keys=None, required=()) -> dict[str, np.ndarray]:
            name = files[role]
            return load_arrays(folder / name, keys, record=artifact_record(run, name), repair=repair, required=required)

        wanted = ("logits", "features", "labels", "paths") if features else ("logits", "labels", "paths")
        rows = ("logits", "labels", "paths")
        data = BenchmarkData(
            benchmark=run["benchmark"],
            arch=run["arch"],
            protocol=run["protocol"],
            class_ids=list(run["class_ids"]),
            class_names=list(run["class_names"]),
            id=_split_arrays(load("id", wanted, rows), features),
            ood=_split_arrays(load("ood", wanted, rows), features),
            meta=run,
        )
        sets = ood_set_entries(run)
        parts = [data.ood] + [_split_arrays(load(s["files_key"], wanted, rows), features) for s in sets[1:]]
        if len(parts) > 1:  # several OOD test sets: `ood` is their rows in order (oodcore.store.scopes)
            for part, s in zip(parts, sets):  # paths are relative to each set's root: `<set>/<path>` keeps them apart
                part.paths = np.char.add(f"{s['name']}/", np.asarray(part.paths, dtype=str))
            data.ood = concat_splits(parts)
        bounds = np.cumsum([0] + [len(p) for p in parts])
        data.ood_sets = [OodSet(s["name"], s.get("group"), int(a), int(b)) for s, a, b in zip(sets, bounds, bounds[1:])]
        if run.get("tune_set") and "tune" in files:
            data.tune, data.tune_name = _split_arrays(load("tune", wanted, rows), features), run["tune_set"]["name"]
        if "fit" in files:
            data.fit = _split_arrays(load("fit", wanted, rows), features)
        if "head" in files:
            head = load("head", required=("weight", "bias"))
            data.head_weight, data.head_bias = head["weight"], head["bias"]
        grid = ("temps", "eps", "scores")
        odin_keys = ["odin_" + s["files_key"] for s in sets]
        if "odin_id" in files and all(k in files for k in odin_keys):
            gid = load("odin_id", required=grid)
            good = np.concatenate([load(k, required=grid)["scores"] for k in odin_keys])
            tuned = data.tune is not None and "odin_tune" in files
            tune = load("odin_tune", required=grid)["scores"] if tuned else None
            data.odin = OdinGrid(temps=gid["temps"], eps=gid["eps"], id=gid["scores"], ood=good, tune=tune)
        damaged: list[CacheError] = []
        data.trained = load_trained(folder, run, damaged=damaged)
        if damaged:
            data.meta = {**run, "damaged_trained": [exc.public() for exc in damaged]}
    return data


TRAINED_DIR = "trained"
FITTED_DIR = "fitted"  # where oodcore.detectors.persist keeps fitted detector states (recomputable)
FITTED_REPAIR = "delete it (the state is refitted on next use; verify --repair does this)"


def trained_paths(folder: Path, name: str) -> tuple[Path, Path]:
    base = folder / TRAINED_DIR / safe_name(name)
    return base.with_suffix(".json"), base.with_suffix(".npz")


def save_trained(folder: Path, name: str, scores_id: np.ndarray, scores_ood: np.ndarray, meta: dict) -> None:
    """Publish a trained detector's scores next to the run it was trained on (scores first, then its JSON)."""
    run = read_json(folder / RUN_FILE)
    meta_path, npz_path = trained_paths(folder, name)
    write_npz(npz_path, {"id": np.asarray(scores_id, np.float64), "ood": np.asarray(scores_ood, np.float64)})
    write_json(
        meta_path,
        {**meta, "name": name, "run_files": _score_inputs(run["files"]), "integrity": digest(npz_path)},
    )


def _score_inputs(files: dict) -> dict:
    """The artifacts a trained detector's scores depend on: ID, every OOD set, the tuning set."""
    return {k: v for k, v in files.items() if k in ("id", "tune") or k == "ood" or k.startswith("ood+")}


def _load_one_trained(meta_path: Path, run: dict) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """(meta, id scores, ood scores) of one trained detector; None when it belongs to older artifacts."""
    retrain = f"retrain it (python -m oodcore train ... --benchmark {run['benchmark']} --arch {run['arch']})"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        raise CacheDamaged(
            f"trained detector {meta_path.stem}: its description is damaged", path=meta_path, repair=retrain
        ) from None
    if not isinstance(meta, dict) or meta.get("run_files") != _score_inputs(run["files"]):
        return None
    scores = load_arrays(
        meta_path.with_suffix(".npz"), record=meta.get("integrity"), repair=retrain, required=("id", "ood")
    )
    return meta, scores["id"], scores["ood"]


def load_trained(folder: Path, run: dict, damaged: list | None = None) -> dict[str, TrainedScores]:
    """Trained detectors whose inputs are the run's current artifacts; stale ones are ignored, damaged ones listed."""
    out = {}
    for meta_path in sorted((folder / TRAINED_DIR).glob("*.json")):
        try:
            found = _load_one_trained(meta_path, run)
        except CacheError as exc:
            if damaged is not None:
                damaged.append(exc)
            continue
        if found is not None:
            meta, s_id, s_ood = found
            out[meta.get("name", meta_path.stem)] = TrainedScores(s_id, s_ood, meta)
    return out


def load_thumbnails(root: Path, benchmark: str, arch: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(packed JPEG bytes, offsets) of a split's thumbnails; see oodcore.store.thumbs.unpack_one.

    `ood` gives every OOD test set's thumbnails, in the order of the run's `ood` rows."""
    folder = arch_dir(root, benchmark, arch)
    with locks.reading(folder):
        run = read_run(root, benchmark, arch)
        repair = repair_command(benchmark, arch, run)
        keys = [s["files_key"] for s in ood_set_entries(run)] if split == "ood" else [split]
        data, offsets, base = [], [], 0
        for key in keys:
            name = run["files"].get(key)
            if name is None:
                raise CacheDamaged(f"run {benchmark} · {arch} has no {key} split", repair=repair)
            z = load_arrays(
                folder / name,
                ("thumb_data", "thumb_offsets"),
                record=artifact_record(run, name),
                repair=repair,
                required=("thumb_data", "thumb_offsets"),
            )
            d, o = z["thumb_data"], z["thumb_offsets"]
            data.append(d)
            offsets.append((o if not offsets else o[1:]) + base)
            base += len(d)
    if len(keys) == 1:
        return data[0], offsets[0]
    return np.concatenate(data), np.concatenate(offsets)


def migrate_v1(folder: Path, say=None) -> dict:
    """Convert a format-1 run (.npz artifacts) in place to format 2 (.npy folders); returns the new run.json.

    Artifact keys are unchanged, so `run` reuses the converted artifacts; trained detectors are re-pointed.
    """
    folder = Path(folder)
    with locks.run_lock(folder, "oodcore verify --repair (format 1 -> 2)"):
        try:
            run = read_json(folder / RUN_FILE)
        except (OSError, ValueError):
            raise CacheDamaged("run.json is damaged", path=folder / RUN_FILE) from None
        if run.get("format") != 1 or not isinstance(run.get("files"), dict):
            return run
        renamed = {}
        for name in dict.fromkeys(run["files"].values()):
            if name.endswith(".npz"):
                new = name[: -len(".npz")] + SUFFIX
                if say is not None:
                    say(f"converting {name} to {new}")
                write_arrays(folder / new, load_arrays(folder / name))
                renamed[name] = new
        files = {role: renamed.get(name, name) for role, name in run["files"].items()}
        for meta_path in sorted((folder / TRAINED_DIR).glob("*.json")):
            try:
                meta = read_json(meta_path)
                meta["run_files"] = {k: renamed.get(v, v) for k, v in meta["run_files"].items()}
                if "integrity" not in meta:
                    meta["integrity"] = digest(meta_path.with_suffix(".npz"))
                write_json(meta_path, meta)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a damaged trained detector stays as it is; verify reports it
        run = {k: v for k, v in run.items() if k not in ("format", "integrity")}
        write_run(folder, {**run, "files": files})
    return read_json(folder / RUN_FILE)
