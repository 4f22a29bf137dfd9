"""A synthetic multi-architecture study in the cache's own format, for measuring share bundles and the shared app.

`python -m oodcore.cli.synthetic --out DIR [--archs 24 --n-id 10000 --n-ood 2000 --n-fit 2000 --classes 200 --dim 256]`

Per architecture: features drawn around class means (ID) or shifted and blurred (OOD) with an
architecture-dependent separation, logits = features @ W.T + b over the protocol's classes, an ODIN
grid (4 T x 7 ε) derived from the logits, and the same JPEG thumbnails for every architecture
(smooth random images of realistic size). Seeded; numpy and Pillow only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from oodcore.detectors.numerics import max_softmax
from oodcore.store import cache as C
from oodcore.store.thumbs import pack

TEMPS = np.array([1.0, 10.0, 100.0, 1000.0])
EPS = np.array([0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005])


def thumbnails(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random RGB images (low-frequency noise, upsampled), JPEG-packed like the cache's thumbnails."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        small = rng.uniform(0, 255, size=(8, 8, 3))
        big = np.kron(small, np.ones((size // 8, size // 8, 1)))
        out[i] = np.clip(big + rng.normal(0, 6, size=big.shape), 0, 255).astype(np.uint8)
    return pack(out)


def _split(rng, means, labels, shift: float, noise: float, w, b):
    feats = means[labels] + rng.normal(0, noise, size=(len(labels), means.shape[1]))
    if shift:
        feats = (1 - shift) * feats + shift * rng.normal(0, 1.0, size=feats.shape)
    feats = np.maximum(feats, 0).astype(np.float32)  # post-ReLU penultimate features
    return feats, (feats @ w.T + b).astype(np.float32)


def _odin(logits: np.ndarray, rng) -> np.ndarray:
    """(N, T, ε) scores: -max softmax(z / T) with a perturbation gain that grows with ε (ID gains more)."""
    out = np.empty((len(logits), len(TEMPS), len(EPS)), np.float32)
    for t, temp in enumerate(TEMPS):
        for e, eps in enumerate(EPS):
            boost = 1.0 + 40 * eps * (1 + 0.2 * rng.standard_normal(len(logits)))
            out[:, t, e] = -max_softmax(logits * boost[:, None], temp)
    return out


def write_study(
    out: Path,
    *,
    benchmark: str = "synthetic",
    archs: int = 24,
    n_id: int = 10_000,
    n_ood: int = 2_000,
    n_fit: int = 2_000,
    classes: int = 200,
    dim: int = 256,
    seed: int = 0,
) -> list[str]:
    """Write `archs` runs of `benchmark` under the cache root `out`; returns the architecture names."""
    out = Path(out)
    thumbs = {"id": thumbnails(n_id, seed), "ood": thumbnails(n_ood, seed + 1)}
    class_ids = [f"n{10_000_000 + k:08d}" for k in range(classes)]
    rng0 = np.random.default_rng(seed)
    labels = {"id": rng0.integers(0, classes, n_id), "fit": rng0.integers(0, classes, n_fit)}
    paths = {
        "id": np.array([f"{class_ids[k]}/ILSVRC2012_val_{i:08d}.JPEG" for i, k in enumerate(labels["id"])]),
        "ood": np.array([f"ood/{i:05d}.jpg" for i in range(n_ood)]),
        "fit": np.array([f"{class_ids[k]}/train_{i:08d}.JPEG" for i, k in enumerate(labels["fit"])]),
    }
    names = []
    for a in range(archs):
        arch = f"synth_arch{a:02d}"
        rng = np.random.default_rng(seed + 100 + a)
        means = rng.gamma(2.0, 0.5, size=(classes, dim))
        w = rng.normal(0, 1 / np.sqrt(dim), size=(classes, dim)) + 0.5 * (means - means.mean(0)) / dim**0.5
        b = rng.normal(0, 0.1, size=classes)
        noise, shift = 0.6 + 0.02 * a, 0.35 + 0.01 * a
        f_id, z_id = _split(rng, means, labels["id"], 0.0, noise, w, b)
        ood_labels = rng.integers(0, classes, n_ood)
        f_ood, z_ood = _split(rng, means, ood_labels, shift, noise, w, b)
        f_fit, z_fit = _split(rng, means, labels["fit"], 0.0, noise, w, b)
        key = C.key_of({"synthetic": seed, "arch": arch, "n": [n_id, n_ood, n_fit, classes, dim]})
        folder = C.arch_dir(out, benchmark, arch)
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split, feats, logits, lab in (
            ("id", f_id, z_id, labels["id"]),
            ("ood", f_ood, z_ood, np.full(n_ood, -1)),
            ("fit", f_fit, z_fit, labels["fit"]),
        ):
            arrays = {"logits": logits, "features": feats, "labels": lab.astype(np.int64), "paths": paths[split]}
            if split in thumbs:
                arrays["thumb_data"], arrays["thumb_offsets"] = thumbs[split]
            files[split] = C.write_artifact(folder, C.artifact_name(split, key), arrays)
        files["head"] = C.write_artifact(
            folder, C.artifact_name("head", key), {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}
        )
        for split, logits in (("id", z_id), ("ood", z_ood)):
            files[f"odin_{split}"] = C.write_artifact(
                folder,
                C.artifact_name(f"odin_{split}", key),
                {"temps": TEMPS, "eps": EPS, "scores": _odin(logits, rng)},
            )
        C.write_run(
            folder,
            {
                "benchmark": benchmark,
                "arch": arch,
                "protocol": "imagenet-o",
                "key": key,
                "class_ids": class_ids,
                "class_names": [f"class {k}" for k in range(classes)],
                "files": files,
                "n_id": n_id,
                "n_ood": n_ood,
                "n_fit": n_fit,
                "skipped": [],
                "model": {"name": arch, "source": "synthetic (oodcore.cli.synthetic)", "seed": seed},
            },
        )
        names.append(arch)
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oodcore.cli.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="cache root to write")
    p.add_argument("--benchmark", default="synthetic")
    p.add_argument("--archs", type=int, default=24)
    p.add_argument("--n-id", type=int, default=10_000)
    p.add_argument("--n-ood", type=int, default=2_000)
    p.add_argument("--n-fit", type=int, default=2_000)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--dim", type=int, default=256)
    args = p.parse_args(argv)
    for value, flag in (
        (args.archs, "--archs"),
        (args.n_id, "--n-id"),
        (args.n_ood, "--n-ood"),
        (args.classes, "--classes"),
    ):
        if value < 1:
            p.error(f"{flag} must be at least 1")
    names = write_study(
        Path(args.out),
        benchmark=args.benchmark,
        archs=args.archs,
        n_id=args.n_id,
        n_ood=args.n_ood,
        n_fit=args.n_fit,
        classes=args.classes,
        dim=args.dim,
    )
    print(f"wrote {len(names)} synthetic runs of {args.benchmark!r} under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
