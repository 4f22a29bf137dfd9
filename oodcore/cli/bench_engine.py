"""Bench parts that run a network: extraction and the ODIN grid against the plain way, and the CUDA figures.

(a) extraction: our pass (uint8 decoding workers, one normalisation per batch, channels-last,
    a traced + frozen network on every core beside the workers, JPEG thumbnails from the workers,
    chunks streamed to the artifact) vs a plain torchvision ImageFolder + DataLoader + forward loop;
    the time per stage (decode, resize, tensor conversion, thumbnail, network) is reported too;
(b) the ODIN grid: one forward, one backward per T, every perturbed input stacked, vs the
    textbook loop (decode, forward, backward, forward) per grid point;
(e) on CUDA: resnet50 img/s in float32, AMP + channels-last, with GPU JPEG decoding, and the ODIN grid.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodcore.extraction.odin import odin_grid_batch, odin_naive_point


def make_jpegs(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> Path:
    """`n` photo-sized JPEGs in ImageNet wnid folders (smooth noise, so JPEG decoding costs what photos cost)."""
    from PIL import Image

    from oodcore.data.imagenet import imagenet_wnids

    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()
    for i in range(n):
        folder = root / wnids[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"img{i:05d}.JPEG", quality=90)
    return root


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def stage_split(bundle, root: Path, entries, n: int = 32) -> dict:
    """Milliseconds per image of each stage, measured one after the other on `n` images in this process."""
    from torchvision.transforms import functional as F

    from oodcore.data.dataset import normalise_batch, split_transform
    from oodcore.data.images import load_rgb, make_thumbnail
    from oodcore.store.thumbs import encode_one

    pil, mean, std, _ = split_transform(bundle.transform)
    paths = [os.path.join(str(root), *e.relpath.split("/")) for e in entries[:n]]
    t_decode, imgs = timed(lambda: [load_rgb(p) for p in paths])
    t_resize, crops = timed(lambda: [pil(i) for i in imgs])
    t_thumb, _ = timed(lambda: [encode_one(make_thumbnail(i)) for i in imgs])
    t_float, _ = timed(lambda: [F.normalize(F.to_tensor(c), mean, std) for c in crops])
    t_u8, u8 = timed(lambda: torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in crops]))
    t_norm, x = timed(lambda: normalise_batch(u8, mean, std))
    with torch.inference_mode():
        bundle.network(x[:2])
        t_net, _ = timed(lambda: bundle.network(x))
    k = 1000.0 / len(paths)
    return {
        "decode_ms": t_decode * k,
        "resize_crop_ms": t_resize * k,
        "thumbnail_ms": t_thumb * k,
        "plain_to_tensor_normalize_ms": t_float * k,
        "ours_uint8_plus_batch_normalise_ms": (t_u8 + t_norm) * k,
        "network_eager_ms": t_net * k,
        "threads": torch.get_num_threads(),
    }


def bench_extraction(bundle, image_root: Path, workers: int, batch_size: int, device: str, repeats: int = 2) -> dict:
    """Our extraction pass vs ImageFolder + DataLoader + forward loop over the same images (same process)."""
    from torchvision.datasets import ImageFolder

    from oodcore.data.dataset import ImageFileDataset
    from oodcore.data.folders import scan_image_folder
    from oodcore.extraction.pipeline import extract_split

    entries = scan_image_folder(image_root).entries
    n = len(entries)
    c, h, w = bundle.input_size
    threads = torch.get_num_threads() if device == "cpu" else None  # every core, as `run` (see runner.py)
    stages = stage_split(bundle, image_root, entries)

    def plain():
        loader = torch.utils.data.DataLoader(
            ImageFolder(str(image_root), transform=bundle.transform), batch_size=batch_size, num_workers=workers
        )
        outs = []
        with torch.no_grad():
            for x, _ in loader:
                outs.append(bundle.network(x.to(device)).cpu())
        return torch.cat(outs)

    clock: dict = {}

    def ours():
        clock.clear()
        ds = ImageFileDataset.for_model(image_root, entries, bundle.transform, (c, h, w))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            arrays, _ = extract_split(
                bundle,
                ds,
                [e.relpath for e in entries],
                None,
                Path(tmp) / "parts",
                device=device,
                batch_size=batch_size,
                workers=workers,
                channels_last=True,
                freeze=device == "cpu",
                threads=threads,
                amp=device == "cuda",
                progress=lambda d, n: None,
                out_path=Path(tmp) / "split.npz",
                timings=clock,
            )
            clock["total_s"] = time.perf_counter() - start
            with np.load(Path(tmp) / "split.npz", allow_pickle=False) as z:
                logits = z["logits"]
        return logits

    network = bundle.network
    plain()  # warm-up (page cache, allocator, lazy init) so neither side pays it
    runs_plain, runs_ours = [], []
    for _ in range(repeats):  # interleaved, best of each: a shared machine's load moves in between
        t, ref = timed(plain)
        runs_plain.append(t)
        network.to(memory_format=torch.contiguous_format)  # ours converts it: each side starts as the user's
        t, logits = timed(ours)
        runs_ours.append(t)
        network.to(memory_format=torch.contiguous_format)  # undone for what follows
    t_plain, t_ours = min(runs_plain), min(runs_ours)
    clock["waiting_for_batches_s"] = max(0.0, clock["total_s"] - clock["network_s"] - clock["write_s"])
    return {
        "images": n,
        "workers": workers,
        "threads": threads,
        "plain_img_s": n / t_plain,
        "ours_img_s": n / t_ours,
        "ratio": t_plain / t_ours,
        "seconds_plain": [round(t, 2) for t in runs_plain],
        "seconds_ours": [round(t, 2) for t in runs_ours],
        "max_abs_logit_diff": float(np.abs(logits - ref.numpy()).max()),
        "stages_ms_per_image": stages,
        "ours_wall_split_s": {k: round(v, 3) for k, v in clock.items()},
        "note": "ours also stores penultimate features and JPEG thumbnails, and writes resumable chunks",
    }


def bench_odin(bundle, image_root: Path, n_images: int, temps, eps, device: str) -> dict:
    """Fast grid vs the per-grid-point loop (each point decodes, forwards, backwards, forwards)."""
    from oodcore.data.dataset import ImageFileDataset
    from oodcore.data.folders import scan_image_folder

    entries = scan_image_folder(image_root).entries[:n_images]
    c, h, w = bundle.input_size
    ds = ImageFileDataset(image_root, entries, bundle.transform, image_shape=(c, h, w))
    std = bundle.std

    def load():
        return torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)

    def ours():
        return odin_grid_batch(bundle.network, load(), temps, eps, std)

    def naive():
        out = np.empty((len(ds), len(temps), len(eps)))
        for i, t in enumerate(temps):
            for j, e in enumerate(eps):
                out[:, i, j] = odin_naive_point(bundle.network, load(), t, e, std)
        return out

    # warm-up, untimed: the first forward and backward at a new batch shape build the backend's kernels
    # (oneDNN primitives on the CPU), which would otherwise be charged to whichever runs first
    odin_naive_point(bundle.network, load(), temps[0], eps[-1], std)
    ours()
    t_ours, fast = timed(ours)
    t_naive, slow = timed(naive)
    return {
        "images": len(ds),
        "grid": f"{len(temps)} T x {len(eps)} eps",
        "ours_s": t_ours,
        "naive_s": t_naive,
        "ours_img_s": len(ds) / t_ours,
        "ratio": t_naive / t_ours,
        "max_abs_score_diff": float(np.abs(fast - slow).max()),
    }


def bench_cuda(image_root: Path, temps, eps, batch_size: int = 256, steps: int = 20) -> dict:
    """resnet50 on CUDA (random weights: speed only): forward img/s in float32 and AMP + channels-last,
    the whole extraction pass with CPU vs GPU JPEG decoding, and the ODIN grid's img/s."""
    import timm

    from oodcore.data.dataset import ImageFileDataset
    from oodcore.data.folders import scan_image_folder
    from oodcore.extraction.pipeline import extract_split
    from oodcore.models.bundle import ModelBundle, _timm_both, _timm_head

    model = timm.create_model("resnet50", pretrained=False).cuda().eval().requires_grad_(False)
    x = torch.randn(batch_size, 3, 224, 224, device="cuda")
    out: dict = {"gpu": torch.cuda.get_device_name(0)}
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    for label, amp, cl in (("fp32", False, False), ("amp_channels_last", True, True)):
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=amp):
            for _ in range(3):
                m(xx)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                m(xx)
            torch.cuda.synchronize()
        out[label + "_img_s"] = batch_size * steps / (time.perf_counter() - start)
    out["amp_ratio"] = out["amp_channels_last_img_s"] / out["fp32_img_s"]
    from timm.data import create_transform, resolve_data_config

    pp = resolve_data_config({}, model=model)
    head = _timm_head(model)
    bundle = ModelBundle(
        "resnet50",
        model,
        head,
        pp["mean"],
        pp["std"],
        (3, 224, 224),
        create_transform(**pp),
        pp,
        {},
        _timm_both(model, head),
    )
    entries = scan_image_folder(image_root).entries
    for label, gpu_decode in (("pipeline_cpu_decode", False), ("pipeline_gpu_decode", True)):
        ds = ImageFileDataset.for_model(image_root, entries, bundle.transform, (3, 224, 224), gpu_decode=gpu_decode)
        with tempfile.TemporaryDirectory() as tmp:
            t, _ = timed(
                lambda ds=ds, tmp=tmp: extract_split(
                    bundle,
                    ds,
                    [e.relpath for e in entries],
                    None,
                    Path(tmp) / "p",
                    device="cuda",
                    batch_size=batch_size,
                    workers=min(8, os.cpu_count() or 1),
                    amp=True,
                    channels_last=True,
                    progress=lambda d, n: None,
                )
            )
        out[label + "_img_s"] = len(entries) / t
    xs = torch.stack([bundle.transform(__import__("PIL.Image").Image.new("RGB", (320, 240))) for _ in range(64)]).cuda()
    t, _ = timed(lambda: odin_grid_batch(model, xs, temps, eps, bundle.std))
    out["odin_grid_img_s"] = len(xs) / t
    return out
