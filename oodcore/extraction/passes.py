"""One resumable pass over a dataset: batched, chunked, atomic.

The pass is generic: a `process_batch` function turns a batch (a dict from the
dataset: image, thumb, ok, error, index) into per-row numpy arrays. Rows are
gathered into chunks of `chunk_size` images; each finished chunk is written
atomically under `parts_dir`, so a killed run resumes at the first missing chunk.
Feature extraction and the ODIN grid are two uses of it.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from oodcore.store.atomic import load_npz, write_npz

ProgressFn = Callable[[int, int], None]

_CHUNK_RE = re.compile(r"^chunk-(\d{8})\.npz$")


def _chunk_path(parts_dir: Path, start: int) -> Path:
    return parts_dir / f"chunk-{start:08d}.npz"


def done_chunks(parts_dir: Path) -> set[int]:
    """Start indices of chunks already written (a temp file never matches)."""
    if not parts_dir.is_dir():
        return set()
    return {int(m.group(1)) for p in parts_dir.iterdir() if (m := _CHUNK_RE.match(p.name))}


def _collate(items: list[Mapping]) -> dict:
    """Default collate, but keep error strings as a plain list."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (str, bytes)):
            out[key] = values
        else:
            out[key] = torch.as_tensor(values)
    return out


def run_pass(
    dataset: Dataset,
    parts_dir: Path,
    process_batch: Callable[[dict], Mapping[str, np.ndarray]],
    *,
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = 1024,
    desc: str = "extract",
    progress: ProgressFn | None = None,
    stop_after_chunks: int | None = None,
    gather: bool = True,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    dist=None,
) -> dict[str, np.ndarray] | list[Path]:
    """Run `process_batch` over every item of `dataset`; return the concatenated rows.

    Besides the arrays from `process_batch`, rows carry `ok` (bool) and `error`
    (str) from the dataset. `stop_after_chunks` simulates a crash (tests).
    With ``gather=False`` nothing is held in memory beyond the chunk being filled: the
    chunk files are returned in order instead (see oodcore.extraction.stream).
    `dist` (oodcore.extraction.distributed.Dist under torchrun): this rank runs only the chunks it
    owns, all ranks meet at a barrier, and only rank 0 gathers or gets the chunk list (the others
    get an empty dict).
    """
    n = len(dataset)
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    have = done_chunks(parts_dir)
    starts = list(range(0, n, chunk_size))
    mine = [s for i, s in enumerate(starts) if dist is None or dist.owns(i)]
    todo = [s for s in mine if s not in have]
    batches: list[list[int]] = []
    for start in todo:
        stop = min(start + chunk_size, n)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]

    n_mine = sum(min(s + chunk_size, n) - s for s in mine)
    done_images = n_mine - sum(min(s + chunk_size, n) - s for s in todo)
    if dist is not None and dist.world > 1:
        desc = f"{desc} (rank {dist.rank}/{dist.world})"
    bar = _progress_bar(n_mine, done_images, desc, enabled=progress is None)
    if progress:
        progress(done_images, n_mine)
    written = 0
    if batches:
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=persistent_workers and workers > 0,
            pin_memory=torch.cuda.is_available(),
            **({"prefetch_factor": prefetch_factor} if workers > 0 and prefetch_factor else {}),
        )
        pending: dict[str, list] = {}
        chunk_start = None
        for batch in loader:
            index = batch["index"].numpy()
            start = (int(index[0]) // chunk_size) * chunk_size
            if chunk_start is None:
                chunk_start = start
            rows = dict(process_batch(batch))
            rows["ok"] = batch["ok"].numpy().astype(bool)
            rows["error"] = np.asarray(batch["error"], dtype=str)
            rows["index"] = index.astype(np.int64)
            for key, value in rows.items():
                pending.setdefault(key, []).append(np.asarray(value))
            done_images += len(index)
            bar.update(len(index))
            if progress:
                progress(done_images, n_mine)
            chunk_end = min(chunk_start + chunk_size, n)
            if int(index[-1]) + 1 >= chunk_end:
                write_npz(_chunk_path(parts_dir, chunk_start), {k: np.concatenate(v) for k, v in pending.items()})
                pending, chunk_start = {}, None
                written += 1
                if stop_after_chunks is not None and written >= stop_after_chunks:
                    bar.close()
                    raise KeyboardInterrupt(f"stopped after {written} chunk(s) (simulated crash)")
    bar.close()
    if dist is not None and dist.world > 1:
        dist.barrier()  # every shard's chunks are on disk
        if not dist.is_main:
            return {}
    if not gather:
        return [_chunk_path(parts_dir, s) for s in starts]
    return _gather(parts_dir, starts)


def _gather(parts_dir: Path, starts: Iterable[int]) -> dict[str, np.ndarray]:
    parts = [load_npz(_chunk_path(parts_dir, s)) for s in starts]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def discard_parts(parts_dir: Path) -> None:
    shutil.rmtree(parts_dir, ignore_errors=True)


def _progress_bar(total: int, initial: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, unless the caller reports progress its own way."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        disable=not enabled,
    )
