"""Network passes over a dataset: feature extraction and the ODIN grid.

Both run through `extract.run_pass` (chunked, resumable, atomic). The model
adapter needs `network(x) -> logits`, `logits_and_features(x)`, `head` and `std`
(oodcore.models.ModelBundle and the demo's CNN both provide them).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from oodcore.data.dataset import normalise_batch
from oodcore.extraction.odin import odin_grid_batch
from oodcore.extraction.passes import ProgressFn, done_chunks, run_pass
from oodcore.extraction.stream import write_npz_stream
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


class _Features(torch.nn.Module):
    """`model.features` as a module (its network and head registered), so it can be traced and frozen."""

    def __init__(self, model):
        super().__init__()
        self.network, self.head = model.network, model.head
        self._fn = model.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


def prepare_features(model, example: torch.Tensor, *, channels_last: bool, freeze: bool) -> Callable:
    """The features function to run: eager, or traced + frozen (conv-BN folding) when `freeze`.

    Freezing is checked on `example` against the eager function and dropped (eager is kept) when
    it fails or differs beyond float tolerance; ``channels_last`` converts the network's weights.
    """
    if channels_last and isinstance(getattr(model, "network", None), torch.nn.Module):
        model.network.to(memory_format=torch.channels_last)
    if not (freeze and isinstance(getattr(model, "network", None), torch.nn.Module)):
        return model.features
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(_Features(model).eval(), example, check_trace=False))
            ref, got = model.features(example), frozen(example)
        if ref.shape == got.shape and torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max()))):
            return frozen
    except Exception:  # an untraceable model stays eager
        pass
    return model.features


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` intra-op threads (None: unchanged), then restore."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    freeze: bool = False,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    desc: str = "extract",
    stop_after_chunks: int | None = None,
    out_path: Path | None = None,
    row_arrays: dict[str, np.ndarray] | None = None,
    timings: dict | None = None,
    what: str = "split",
    dist=None,
    chunk_size: int = 1024,
    feature_dtype: str = "float32",
) -> tuple[dict[str, np.ndarray] | None, list[dict]]:
    """Logits (restricted to `class_indices`), features and thumbnails of every readable image.

    Returns the arrays of the good rows and a list of skipped files with reasons. With `out_path`
    the arrays are streamed chunk by chunk into that .npz (with `row_arrays`, per-dataset-index
    arrays such as labels, and the skipped list) and only `index`/`paths` are returned in memory.
    A dataset from `ImageFileDataset.for_model` hands over uint8 batches, normalised here once per batch.
    `timings` (a dict) receives the seconds spent waiting for batches, in the network and writing.
    Under torchrun (`dist`) every rank extracts its chunks and only rank 0 assembles (the others get None).
    """
    device = torch.device(device)
    mask = None if class_indices is None else torch.as_tensor(np.asarray(class_indices), device=device)
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    uint8 = bool(getattr(dataset, "uint8", False))
    state: dict = {"features": None}
    clock = timings if timings is not None else {}
    for k in ("network_s", "write_s"):
        clock.setdefault(k, 0.0)

    def process(batch: dict) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        if "raw" in batch:
            from oodcore.extraction.gpudecode import decode_batch

            decode_batch(batch, dataset, device)
        x = batch["image"]
        if uint8:
            x = normalise_batch(_to_device(x, device, False), mean, std)
        x = _to_device(x, device, channels_last)
        if state["features"] is None:
            state["features"] = prepare_features(model, x[:2], channels_last=channels_last, freeze=freeze)
        with torch.inference_mode():
            with _autocast(device, amp):
                feats = state["features"](x)
            feats = feats.float()
            logits = model.head(feats)  # float32 head: mixed-precision logits would tie MSP scores
        if mask is not None:
            logits = logits.index_select(1, mask)
        thumbs_in = batch["thumb"]
        jpegs = list(thumbs_in) if isinstance(thumbs_in, list) else [thumbs.encode_one(t) for t in thumbs_in.numpy()]
        ok = batch["ok"].numpy().astype(bool)
        jpegs = [j if good else b"" for j, good in zip(jpegs, ok)]
        out = {
            "logits": logits.float().cpu().numpy(),
            "features": feats.float().cpu().numpy(),
            "thumb_len": np.asarray([len(j) for j in jpegs], dtype=np.int64),
            "thumb_data": np.frombuffer(b"".join(jpegs), dtype=np.uint8),
        }
        clock["network_s"] += time.perf_counter() - t0
        return out

    _drop_old_chunks(parts_dir)
    with torch_threads(threads):
        chunks = run_pass(
            dataset,
            parts_dir,
            process,
            batch_size=batch_size,
            workers=workers,
            desc=desc,
            progress=progress,
            stop_after_chunks=stop_after_chunks,
            gather=False,
            persistent_workers=device.type == "cuda",
            dist=dist,
            chunk_size=chunk_size,
        )
    if dist is not None and not dist.is_main:
        return None, []
    t0 = time.perf_counter()
    result = assemble(chunks, paths, out_path=out_path, row_arrays=row_arrays, feature_dtype=feature_dtype)
    if out_path is not None and len(result[0]["index"]) == 0:
        if Path(out_path).is_dir():  # a cache artifact folder (.arrays)
            shutil.rmtree(out_path, ignore_errors=True)
        else:
            Path(out_path).unlink(missing_ok=True)
        skipped = result[1]
        raise ValueError(f"every {what} image was unreadable ({len(paths)} tried): {skipped[:3]} ...")
    clock["write_s"] += time.perf_counter() - t0
    return result


def _chunk_meta(chunks: Sequence[Path]) -> list[dict]:
    """The small per-row arrays of every chunk (the large ones are read one chunk at a time later)."""
    metas = []
    for path in chunks:
        with np.load(path, allow_pickle=False) as z:
            ok = z["ok"]
            metas.append(
                {
                    "path": path,
                    "ok": ok,
                    "index": z["index"],
                    "error": z["error"][~ok] if (~ok).any() else np.zeros(0, str),
                    "thumb_len": z["thumb_len"],
                }
            )
    if metas:
        with np.load(metas[0]["path"], allow_pickle=False) as z:
            metas[0]["dims"] = {k: z[k].shape[1:] for k in ("logits", "features")}
    return metas


def _drop_old_chunks(parts_dir: Path) -> None:
    """Chunks left by a version that stored raw thumbnails are recomputed, not mixed in."""
    for start in done_chunks(Path(parts_dir)):
        path = Path(parts_dir) / f"chunk-{start:08d}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                stale = "thumb_len" not in z.files
        except Exception:
            stale = True
        if stale:
            path.unlink(missing_ok=True)


def assemble(
    chunks: Sequence[Path],
    paths: Sequence[str],
    *,
    out_path: Path | None = None,
    row_arrays: dict[str, np.ndarray] | None = None,
    feature_dtype: str = "float32",
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The split's good rows from its chunk files: in memory, or streamed into `out_path` (one chunk at a time)."""
    metas = _chunk_meta(chunks)
    if not metas:
        raise ValueError("the split has no images")
    index = np.concatenate([m["index"][m["ok"]] for m in metas]).astype(np.int64)
    skipped = [
        {"path": str(paths[i]), "error": str(e)} for m in metas for i, e in zip(m["index"][~m["ok"]], m["error"])
    ]
    lengths = np.concatenate([m["thumb_len"][m["ok"]] for m in metas])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    path_array = np.asarray([str(paths[i]) for i in index], dtype=str)

    def rows(key: str, dtype=np.float32):
        def pieces():
            for m in metas:
                with np.load(m["path"], allow_pickle=False) as z:
                    yield z[key][m["ok"]].astype(dtype)

        return pieces

    def thumb_pieces():
        for m in metas:
            with np.load(m["path"], allow_pickle=False) as z:
                yield z["thumb_data"]

    members = {
        "logits": (np.float32, (len(index), *metas[0]["dims"]["logits"]), rows("logits")),
        "features": (
            np.dtype(feature_dtype),
            (len(index), *metas[0]["dims"]["features"]),
            rows("features", np.dtype(feature_dtype)),
        ),
        "index": (np.int64, index.shape, lambda: [index]),
        "paths": (path_array.dtype, path_array.shape, lambda: [path_array]),
        "thumb_data": (np.uint8, (int(offsets[-1]),), thumb_pieces),
        "thumb_offsets": (np.int64, offsets.shape, lambda: [offsets]),
    }
    if out_path is None:
        return {
            k: np.concatenate([np.asarray(p, dtype=d) for p in fn()]).reshape(shape)
            for k, (d, shape, fn) in members.items()
        }, skipped
    for name, values in (row_arrays or {}).items():
        picked = np.asarray(values)[index]
        members[name] = (picked.dtype, picked.shape, lambda picked=picked: [picked])
    sk_paths = np.asarray([s["path"] for s in skipped], dtype=str)
    sk_errors = np.asarray([s["error"] for s in skipped], dtype=str)
    members["skipped_paths"] = (sk_paths.dtype, sk_paths.shape, lambda: [sk_paths])
    members["skipped_errors"] = (sk_errors.dtype, sk_errors.shape, lambda: [sk_errors])
    write_npz_stream(out_path, members)
    return {"index": index, "paths": path_array}, skipped


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
    dist=None,
    chunk_size: int = 1024,
) -> np.ndarray | None:
    """ODIN scores on the grid, (N, len(temps), len(eps)), for the rows kept by extraction (rank 0 only)."""
    device = torch.device(device)
    mask = None if class_indices is None else torch.as_tensor(np.asarray(class_indices), device=device)
    std = tuple(float(s) for s in model.std)

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        logits = model.network(x)
        return logits if mask is None else logits.index_select(1, mask)

    mean, norm_std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    uint8 = bool(getattr(dataset, "uint8", False))

    def process(batch: dict) -> dict[str, np.ndarray]:
        x = batch["image"].to(device)
        if uint8:
            x = normalise_batch(x, mean, norm_std)
        return {"scores": odin_grid_batch(logits_fn, x, temps, eps, std)}

    rows = run_pass(
        dataset,
        parts_dir,
        process,
        batch_size=batch_size,
        workers=workers,
        desc=desc,
        progress=progress,
        dist=dist,
        chunk_size=chunk_size,
    )
    if dist is not None and not dist.is_main:
        return None
    position = {int(i): k for k, i in enumerate(rows["index"])}
    return rows["scores"][[position[int(i)] for i in keep_index]]
