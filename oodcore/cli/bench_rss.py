"""Extraction's peak memory at growing image counts: it should grow with the chunk size, not the split.

Each count runs in a fresh process (`python -m oodcore.cli.bench_rss ROOT N`) that extracts the first
N synthetic JPEGs with a stand-in network of ImageNet shape (1280-d features, 1000 logits, cheap to
run) through the real pass: uint8 decoding, chunks, JPEG thumbnails, the artifact streamed from
the chunks. It reports its own peak RSS (the kernel's VmHWM; `ru_maxrss` would carry the parent's peak
over fork + exec, and `bench` runs this after large in-process work), so the figures are the engine's.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_small_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image

    from oodcore.data.imagenet import imagenet_wnids

    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()
    base = [Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((96, 72)) for _ in range(16)]
    for i in range(n):
        folder = root / wnids[i % 50]
        folder.mkdir(parents=True, exist_ok=True)
        base[i % 16].save(folder / f"img{i:06d}.JPEG", quality=90)
    return root


class StandIn:
    """ImageNet-shaped outputs (1280-d features, 1000 logits) from a network that costs next to nothing."""

    std = (0.5, 0.5, 0.5)

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.network = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 1280)
        ).eval()
        self.head = torch.nn.Linear(1280, 1000).eval()

    def features(self, x):
        return self.network(x)


def measure(root: Path, n: int) -> float:
    """Extract the first `n` images under `root` in this process; returns the peak RSS in MB."""
    from torchvision import transforms as T

    from oodcore.data.dataset import ImageFileDataset
    from oodcore.data.folders import scan_image_folder
    from oodcore.extraction.pipeline import extract_split

    entries = scan_image_folder(root).entries[:n]
    transform = T.Compose([T.Resize(72), T.CenterCrop(64), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = ImageFileDataset.for_model(root, entries, transform, (3, 64, 64))
    with tempfile.TemporaryDirectory() as tmp:
        extract_split(
            StandIn(),
            ds,
            [e.relpath for e in entries],
            None,
            Path(tmp) / "parts",
            batch_size=64,
            workers=0,
            progress=lambda d, t: None,
            out_path=Path(tmp) / "split.npz",
            row_arrays={"labels": np.zeros(len(entries), np.int64)},
        )
    return own_peak_mb()


def proc_status_mb(field: str, pid: int | str = "self") -> float | None:
    """A memory figure of /proc/<pid>/status in MB (VmRSS, VmHWM, RssAnon, ...); None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def own_peak_mb() -> float:
    """This process's own peak RSS in MB (VmHWM; ru_maxrss where /proc is absent)."""
    peak = proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_rss(counts: tuple[int, ...] = (2000, 8000, 32000)) -> dict:
    out: dict = {"extract_peak_rss_mb": {}, "chunk_size": 1024, "feature_dim": 1280, "classes": 1000}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_small_jpegs(Path(tmp) / "imgs", max(counts))
        for n in counts:
            res = subprocess.run(
                [sys.executable, "-m", "oodcore.cli.bench_rss", str(root), str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            out["extract_peak_rss_mb"][str(n)] = float(res.stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    print(round(measure(Path(sys.argv[1]), int(sys.argv[2])), 1))
