"""`python -m oodcore bench`: the engine against the plain way of doing the same work, in one run.

(a) extraction: our pass (parallel decoding, inference mode, chunked cache with
    thumbnails) vs a plain torchvision ImageFolder + DataLoader + forward loop;
(b) the ODIN grid: one forward+backward per T and one forward per eps, vs the
    textbook loop (decode, forward, backward, forward) per grid point;
(c) every registered method + all metrics with bootstrap CIs from the cache at
    ImageNet scale (synthetic 52k x 1000 logits, 52k x 1280 features), vs what
    re-running the network per method would cost at the throughput measured in (a);
(d) a slider move: one method's metrics on 12k samples (the app's live path);
(e) on CUDA: resnet50 extraction img/s in float32 vs mixed precision + channels-last.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from oodcore.extraction.odin import odin_grid_batch, odin_naive_point


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """`n` photo-sized JPEGs in ImageNet wnid folders (smooth noise, so JPEG decoding costs what photos cost)."""
    from PIL import Image

    from oodcore.data.imagenet import imagenet_wnids

    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()
    for i in range(n):
        folder = root / wnids[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"img{i:05d}.JPEG", quality=90)
    return root


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_extraction(bundle, image_root: Path, workers: int, batch_size: int, device: str) -> dict:
    """Our extraction pass vs ImageFolder + DataLoader + forward loop over the same images."""
    from torchvision.datasets import ImageFolder

    from oodcore.data.dataset import ImageFileDataset
    from oodcore.data.folders import scan_image_folder
    from oodcore.extraction.pipeline import extract_split

    entries = scan_image_folder(image_root).entries
    n = len(entries)
    c, h, w = bundle.input_size

    def plain():
        loader = torch.utils.data.DataLoader(
            ImageFolder(str(image_root), transform=bundle.transform), batch_size=batch_size, num_workers=workers
        )
        outs = []
        with torch.no_grad():
            for x, _ in loader:
                outs.append(bundle.network(x.to(device)).cpu())
        return torch.cat(outs)

    def ours():
        ds = ImageFileDataset(image_root, entries, bundle.transform, image_shape=(c, h, w))
        with tempfile.TemporaryDirectory() as tmp:
            out, _ = extract_split(
                bundle,
                ds,
                [e.relpath for e in entries],
                None,
                Path(tmp) / "parts",
                device=device,
                batch_size=batch_size,
                workers=workers,
                progress=lambda d, n: None,
            )
        return out

    plain()  # warm-up (page cache, allocator, lazy init) so neither side pays it
    t_plain, ref = _timed(plain)
    t_ours, out = _timed(ours)
    agree = float(np.abs(out["logits"] - ref.numpy()).max())
    return {
        "images": n,
        "plain_img_s": n / t_plain,
        "ours_img_s": n / t_ours,
        "ratio": t_plain / t_ours,
        "max_abs_logit_diff": agree,
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

    t_ours, fast = _timed(ours)
    t_naive, slow = _timed(naive)
    return {
        "images": len(ds),
        "grid": f"{len(temps)} T x {len(eps)} eps",
        "ours_s": t_ours,
        "naive_s": t_naive,
        "ratio": t_naive / t_ours,
        "max_abs_score_diff": float(np.abs(fast - slow).max()),
    }


def synthetic_benchmark(n_id: int = 50_000, n_ood: int = 2_000, k: int = 1000, d: int = 1280, seed: int = 0):
    """ImageNet-sized random logits/features with some ID/OOD separation (timing only)."""
    from oodcore.store.rundata import BenchmarkData, SplitArrays

    rng = np.random.default_rng(seed)

    def split(n, shift, labels):
        feats = np.abs(rng.standard_normal((n, d), dtype=np.float32)) * (1 + shift)
        logits = rng.standard_normal((n, k), dtype=np.float32) * 2
        logits[np.arange(n), labels % k] += 6 * (1 - shift)
        return SplitArrays(logits, feats, labels, np.asarray([f"x/{i}" for i in range(n)]))

    id_labels = rng.integers(0, k, n_id)
    weight = rng.standard_normal((k, d), dtype=np.float32) / np.sqrt(d)
    return BenchmarkData(
        "synthetic",
        "synthetic",
        "full",
        [str(i) for i in range(k)],
        [f"c{i}" for i in range(k)],
        split(n_id, 0.0, id_labels),
        split(n_ood, 0.5, np.full(n_ood, -1)),
        head_weight=weight,
        head_bias=np.zeros(k, np.float32),
        fit=split(min(n_id, 10_000), 0.0, rng.integers(0, k, min(n_id, 10_000))),
    )


def bench_methods(data, n_boot: int, plain_img_s: float | None) -> dict:
    """Every method + all metrics (with bootstrap CIs) from the cache."""
    from oodcore import detectors as M
    from oodcore.evaluation.metrics import evaluate

    rows = {}
    total = 0.0
    for method in M.available_methods(data):
        t_score, (s_id, s_ood) = _timed(lambda: method.score_id_ood(data))
        t_metric, _ = _timed(lambda: evaluate(s_id, s_ood, n_boot=n_boot))
        rows[method.name] = {"score_s": t_score, "metrics_s": t_metric}
        total += t_score + t_metric
    n = len(data.id) + len(data.ood)
    out = {
        "samples": n,
        "n_id": len(data.id),
        "n_ood": len(data.ood),
        "classes": data.n_classes,
        "feature_dim": None if data.id.features is None else data.id.features.shape[1],
        "bootstrap": n_boot,
        "methods": rows,
        "total_s": total,
    }
    if plain_img_s:
        out["plain_rerun_estimate_s"] = len(rows) * n / plain_img_s
        out["ratio_vs_rerun_estimate"] = out["plain_rerun_estimate_s"] / total
        out["note"] = "the plain way re-runs the network once per method; estimated from the measured plain img/s"
    return out


def bench_slider(n: int = 12_000, repeats: int = 20) -> dict:
    """The app's live path for one slider move: `analysis.metrics_for` (a method's scores, five metrics,
    the 95%-TPR threshold) plus the histogram, on 10k ID + 2k OOD samples over 200 classes."""
    from oodcore.evaluation.analysis import histogram_frame, metrics_for

    data = synthetic_benchmark(n_id=n - 2000, n_ood=2000, k=200, d=8)
    out = {"samples": n, "classes": 200}
    histogram_frame(*(lambda r: (r["scores_id"], r["scores_ood"]))(metrics_for(data, "msp")))  # warm-up: lazy imports
    for method, params in (("msp", {}), ("energy", {"T": 1.0}), ("odin", {"T": 1000.0, "eps": 0.0})):
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            res = metrics_for(data, method, params)
            histogram_frame(res["scores_id"], res["scores_ood"])
            times.append(time.perf_counter() - start)
        out[method] = {"median_ms": 1000 * float(np.median(times)), "max_ms": 1000 * float(np.max(times))}
    out["median_ms"] = max(v["median_ms"] for k, v in out.items() if isinstance(v, dict))
    return out


def bench_cuda_resnet50(batch_size: int = 256, steps: int = 20) -> dict:
    """resnet50 forward img/s on CUDA: float32 vs bf16/fp16 autocast + channels-last (random weights: speed only)."""
    import timm

    model = timm.create_model("resnet50", pretrained=False).cuda().eval()
    x = torch.randn(batch_size, 3, 224, 224, device="cuda")
    out = {}
    for label, amp, cl in (("fp32", False, False), ("amp_channels_last", True, True)):
        m = model.to(memory_format=torch.channels_last) if cl else model
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=amp):
            for _ in range(3):
                m(xx)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                m(xx)
            torch.cuda.synchronize()
        out[label + "_img_s"] = batch_size * steps / (time.perf_counter() - start)
    out["ratio"] = out["amp_channels_last_img_s"] / out["fp32_img_s"]
    return out


def run_bench(args) -> int:
    from oodcore.models.registry import load_model

    quick = args.quick
    device = args.device
    report = {"machine": machine(), "quick": quick}
    print(f"machine: {report['machine']}")
    bundle = load_model("efficientnet_lite0", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.images) if args.images else make_jpegs(Path(tmp) / "imgs", 48 if quick else 256)
        workers = min(4, os.cpu_count() or 1)
        ex = bench_extraction(bundle, root, workers=workers, batch_size=32, device=device)
        report["extraction"] = ex
        print(
            f"(a) extraction, efficientnet_lite0, {ex['images']} images, {workers} workers: plain {ex['plain_img_s']:.1f} img/s, "
            f"ours {ex['ours_img_s']:.1f} img/s, ratio {ex['ratio']:.2f}x (logits agree to {ex['max_abs_logit_diff']:.1e})"
        )
        temps, eps = (1.0, 10.0, 100.0, 1000.0), (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005)
        od = bench_odin(bundle, root, 4 if quick else 16, temps, eps, device)
        report["odin"] = od
        print(
            f"(b) ODIN grid {od['grid']} on {od['images']} images: naive {od['naive_s']:.1f} s, ours {od['ours_s']:.1f} s, "
            f"ratio {od['ratio']:.2f}x (scores agree to {od['max_abs_score_diff']:.1e})"
        )
    from oodcore.cli.bench_detectors import bench_detectors, describe

    det = bench_detectors(
        synthetic_benchmark(n_id=5_000 if quick else 50_000, n_ood=2_000), n_boot=50 if quick else 200
    )
    report["methods"] = det  # its stable keys: methods_seconds_52k, per_method_seconds, slider_seconds_52k
    rerun = len(det["per_method_seconds"]) * det["samples"] / ex["plain_img_s"]
    for line in describe(det):
        print(line)
    print(
        f"    re-running the network per method would take ~{rerun:.0f} s at the plain rate: "
        f"{rerun / det['methods_seconds_52k']:.0f}x"
    )
    sl = bench_slider()
    report["slider"] = sl
    per = ", ".join(f"{m} {sl[m]['median_ms']:.0f} ms (max {sl[m]['max_ms']:.0f})" for m in ("msp", "energy", "odin"))
    print(f"(d) slider move (the app's metrics_for + histogram, {sl['samples']} samples, median): {per}")
    if device == "cuda" or torch.cuda.is_available():
        cu = bench_cuda_resnet50()
        report["cuda_resnet50"] = cu
        print(
            f"(e) CUDA resnet50: fp32 {cu['fp32_img_s']:.0f} img/s, AMP+channels-last {cu['amp_channels_last_img_s']:.0f} img/s ({cu['ratio']:.2f}x)"
        )
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_file}")
    return 0
