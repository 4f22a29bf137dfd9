"""Network passes over a dataset: feature extraction and the ODIN grid.

Both run through `extract.run_pass` (chunked, resumable, atomic). The model
adapter needs `network(x) -> logits`, `logits_and_features(x)`, `head` and `std`
(oodcore.models.ModelBundle and the demo's CNN both provide them).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from oodcore.extraction.odin import odin_grid_batch
from oodcore.extraction.passes import ProgressFn, run_pass
from oodcore.store import thumbs


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def extract_split(
    model,
    dataset,
    paths: Sequence[str],
    class_indices: np.ndarray | None,
    parts_dir: Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = False,
    channels_last: bool = False,
    progress: ProgressFn | None = None,
    desc: str = "extract",
    stop_after_chunks: int | None = None,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Logits (restricted to `class_indices`), features and thumbnails of every readable image.

    Returns the arrays of the good rows and a list of skipped files with reasons.
    """
    device = torch.device(device)
    mask = None if class_indices is None else torch.as_tensor(np.asarray(class_indices), device=device)

    def process(batch: dict) -> dict[str, np.ndarray]:
        x = _to_device(batch["image"], device, channels_last)
        with torch.inference_mode():
            with _autocast(device, amp):
                feats = model.features(x)
            feats = feats.float()
            logits = model.head(feats)  # float32 head: mixed-precision logits would tie MSP scores
        if mask is not None:
            logits = logits.index_select(1, mask)
        return {
            "logits": logits.float().cpu().numpy(),
            "features": feats.float().cpu().numpy(),
            "thumb": batch["thumb"].numpy().astype(np.uint8),
        }

    rows = run_pass(
        dataset,
        parts_dir,
        process,
        batch_size=batch_size,
        workers=workers,
        desc=desc,
        progress=progress,
        stop_after_chunks=stop_after_chunks,
    )
    if not rows:
        raise ValueError("the split has no images")
    ok = rows["ok"]
    skipped = [{"path": str(paths[i]), "error": str(e)} for i, e in zip(rows["index"][~ok], rows["error"][~ok])]
    data, offsets = thumbs.pack(rows["thumb"][ok])
    out = {
        "logits": rows["logits"][ok].astype(np.float32),
        "features": rows["features"][ok].astype(np.float32),
        "index": rows["index"][ok],
        "paths": np.asarray([str(paths[i]) for i in rows["index"][ok]], dtype=str),
        "thumb_data": data,
        "thumb_offsets": offsets,
    }
    return out, skipped


def odin_split(
    model,
    dataset,
    class_indices: np.ndarray | None,
    keep_index: np.ndarray,
    parts_dir: Path,
    temps: Sequence[float],
    eps: Sequence[float],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    workers: int = 0,
    progress: ProgressFn | None = None,
    desc: str = "odin grid",
) -> np.ndarray:
    """ODIN scores on the grid, (N, len(temps), len(eps)), for the rows kept by extraction."""
    device = torch.device(device)
    mask = None if class_indices is None else torch.as_tensor(np.asarray(class_indices), device=device)
    std = tuple(float(s) for s in model.std)

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        logits = model.network(x)
        return logits if mask is None else logits.index_select(1, mask)

    def process(batch: dict) -> dict[str, np.ndarray]:
        x = batch["image"].to(device)
        return {"scores": odin_grid_batch(logits_fn, x, temps, eps, std)}

    rows = run_pass(dataset, parts_dir, process, batch_size=batch_size, workers=workers, desc=desc, progress=progress)
    position = {int(i): k for k, i in enumerate(rows["index"])}
    return rows["scores"][[position[int(i)] for i in keep_index]]
