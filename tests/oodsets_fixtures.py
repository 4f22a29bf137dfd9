"""Small multi-set study folders for tests: ImageNet val sample as ID, an ImageNet-O-shaped set named like
ImageNet-O's files (so NINCO's annotation matches some), and flat generated sets."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from oodcore.data.oodsets import NINCO_CSV

NINCO = Path(__file__).resolve().parents[1] / "oodcore" / "data" / "ninco" / NINCO_CSV


def ninco_rows(wnids: set[str]) -> list[tuple[str, str, str]]:
    """(wnid, file, decision) of NINCO's annotated ImageNet-O images whose wnid is in `wnids`."""
    out = []
    for row in csv.DictReader(NINCO.read_text().splitlines()):
        wnid, name = row["image_location"].split("/")[-2:]
        if wnid in wnids:
            out.append((wnid, name, row["decision"]))
    return out


def noise_image(path: Path, seed: int, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")


def make_study(shared: Path, out: Path, n_clean: int = 4, n_contaminated: int = 2, n_other: int = 6) -> dict:
    """ID = the sample's images of the ImageNet-O-shaped set's classes; returns the folders and the chosen files."""
    sample = shared / "imagenet-sample"
    rows = ninco_rows({p.name for p in sample.iterdir()})
    clean = [r for r in rows if r[2] == "o"][:n_clean]
    contaminated = [r for r in rows if r[2] == "i"][:n_contaminated]
    imo = out / "imagenet-o"
    for i, (wnid, name, _) in enumerate(clean + contaminated):
        noise_image(imo / wnid / name, i)
    wnids = sorted({r[0] for r in clean + contaminated})
    spare = sorted({p.name for p in sample.iterdir()} - set(wnids))[:n_other]
    for j, wnid in enumerate(spare):  # ImageNet-O images NINCO did not annotate (more classes, so more ID images)
        noise_image(imo / wnid / f"unlisted_{j}.JPEG", 100 + j)
    wnids = sorted(set(wnids) | set(spare))
    val = out / "val"
    for wnid in wnids:
        shutil.copytree(sample / wnid, val / wnid)
    for name, n, seed in (("textures", 3, 200), ("inat", 3, 300), ("extra", 2, 400), ("tune", 3, 500)):
        for j in range(n):
            sub = f"cat{j % 2}/" if name == "textures" else ""  # Textures ships <category>/<image>
            noise_image(out / name / f"{sub}img_{j}.jpg", seed + j)
    return {
        "val": val,
        "imagenet_o": imo,
        "clean": [f"{w}/{n}" for w, n, _ in clean],
        "contaminated": [f"{w}/{n}" for w, n, _ in contaminated],
        **{name: out / name for name in ("textures", "inat", "extra", "tune")},
    }
