"""Small builders shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from oodcore.store.rundata import BenchmarkData, SplitArrays


def make_data(logits_id, logits_ood, features_id=None, features_ood=None, **extra) -> BenchmarkData:
    logits_id, logits_ood = np.asarray(logits_id, float), np.asarray(logits_ood, float)
    k = logits_id.shape[1]
    return BenchmarkData(
        benchmark="t",
        arch="a",
        protocol="p",
        class_ids=[str(i) for i in range(k)],
        class_names=[f"c{i}" for i in range(k)],
        id=SplitArrays(
            logits_id, features_id, logits_id.argmax(1), np.asarray([f"id/{i}" for i in range(len(logits_id))])
        ),
        ood=SplitArrays(
            logits_ood,
            features_ood,
            np.full(len(logits_ood), -1),
            np.asarray([f"ood/{i}" for i in range(len(logits_ood))]),
        ),
        **extra,
    )


ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def record(name: str, value) -> None:
    """Timings worth reporting (not asserted) go to artifacts/timings.json (gitignored) and to stdout."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "timings.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=2))
    print(f"{name}: {value}")


DEMO_DIR = "oodcore-demo-cache"  # one demo cache per test session, whichever test needs it first builds it


def demo_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / DEMO_DIR


def demo_is_built(root: Path) -> bool:
    return (root / "demo" / "digits_cnn" / "run.json").is_file()


def add_perturbed_arch(root: Path, new_arch: str = "digits_cnn_b", seed: int = 1, benchmark: str = "demo") -> Path:
    """A second 'architecture' of the demo benchmark: the demo run copied, its logits and features perturbed
    with seeded noise (same images, paths and thumbnails), published under `new_arch`.  For study views only."""
    import shutil

    import numpy as np

    from oodcore.detectors.persist import FITTED_DIR
    from oodcore.evaluation.stored import REPORT_FILE
    from oodcore.store import cache
    from oodcore.store.arrays import read_arrays

    src = cache.arch_dir(root, benchmark, "digits_cnn")
    dst = cache.arch_dir(root, benchmark, new_arch)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    # what was computed from the source's arrays (fitted states, per-split tables, the report) is not the new
    # run's: its artifacts are rewritten below under the same names, so the keys would not tell them apart
    shutil.rmtree(dst / FITTED_DIR, ignore_errors=True)
    (dst / REPORT_FILE).unlink(missing_ok=True)
    run = cache.read_run(root, benchmark, "digits_cnn")
    rng = np.random.default_rng(seed)
    for split in ("id", "ood", "fit"):
        name = run["files"][split]
        if (dst / name).is_dir():  # the memory-mapped .arrays format: copy out of the maps before rewriting
            arrays = {k: np.array(v) for k, v in read_arrays(dst / name).items()}
        else:
            with np.load(dst / name, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        arrays["logits"] = (arrays["logits"] + rng.normal(0, 1.5, arrays["logits"].shape)).astype(np.float32)
        feats = arrays["features"]
        arrays["features"] = (feats * rng.uniform(0.8, 1.2, feats.shape)).astype(np.float32)
        cache.write_artifact(dst, name, arrays)
    cache.write_run(dst, {**run, "arch": new_arch})
    return dst
