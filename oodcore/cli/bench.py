"""`python -m oodcore bench`: the engine against the plain way of doing the same work, in one run.

(a), (b), (e): extraction, the ODIN grid and the CUDA figures, in oodcore.cli.bench_engine;
(c) every registered method + all metrics with bootstrap CIs from the cache at
    ImageNet scale (synthetic 52k x 1000 logits, 52k x 1280 features), vs what
    re-running the network per method would cost at the throughput measured in (a);
(d) a slider move: one method's metrics on 12k samples (the app's live path);
(f) extraction's peak RSS at growing image counts (oodcore.cli.bench_rss, `--rss`);
(g) the app's cold start to the first rendered page (oodcore.cli.bench_app, `--cold-start`).
`--json FILE` writes the figures with stable top-level keys (see `stable_keys`).
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

from oodcore.cli.bench_engine import bench_cuda, bench_extraction, bench_odin, make_jpegs


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


def synthetic_benchmark(n_id: int = 50_000, n_ood: int = 2_000, k: int = 1000, d: int = 1280, seed: int = 0):
    """ImageNet-sized random features with some ID/OOD separation and the logits of a linear head on them
    (timing only).  As in a real cache, the logits are the head's output on the cached features: a row's
    features are non-negative (post-ReLU) and lean towards its class's weights, raising that logit by ~6."""
    from oodcore.store.rundata import BenchmarkData, SplitArrays

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, d), dtype=np.float32) / np.float32(np.sqrt(d))
    bias = np.zeros(k, np.float32)
    lean = np.maximum(weight, 0) * np.float32(12.0)  # f += lean[y]: logit y gains 12 Σ relu(w)·w ≈ 6

    def split(n, shift, labels):
        feats = np.abs(rng.standard_normal((n, d), dtype=np.float32)) * np.float32(1 + shift)
        toward = labels if shift == 0 else rng.integers(0, k, n)  # OOD rows lean half as far, to a random class
        for sl in (slice(i, i + 4096) for i in range(0, n, 4096)):
            feats[sl] += lean[toward[sl]] * np.float32(1 - shift)
        logits = feats @ weight.T + bias
        return SplitArrays(logits, feats, labels, np.asarray([f"x/{i}" for i in range(n)]))

    id_labels = rng.integers(0, k, n_id)
    return BenchmarkData(
        "synthetic",
        "synthetic",
        "full",
        [str(i) for i in range(k)],
        [f"c{i}" for i in range(k)],
        split(n_id, 0.0, id_labels),
        split(n_ood, 0.5, np.full(n_ood, -1)),
        head_weight=weight,
        head_bias=bias,
        fit=split(min(n_id, 10_000), 0.0, rng.integers(0, k, min(n_id, 10_000))),
    )


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


def detector_figures(quick: bool) -> dict:
    """Every detector + metrics + CIs on 52k synthetic rows and a slider move each (oodcore.cli.bench_detectors),
    plus the app's 12k-sample slider path; returns the raw sections and the stable keys."""
    from oodcore.cli.bench_detectors import bench_detectors

    with tempfile.TemporaryDirectory(prefix="oodcore-bench-states-") as folder:  # the run's fitted/ folder
        det = bench_detectors(
            synthetic_benchmark(n_id=5_000 if quick else 50_000, n_ood=2_000),
            n_boot=50 if quick else 200,
            folder=Path(folder),
        )
    return {
        "methods": det,
        "slider": bench_slider(),
        "methods_seconds_52k": det["methods_seconds_52k"],
        "methods_seconds_52k_cold": det["methods_seconds_52k_cold"],
        "per_method_seconds": det["per_method_seconds"],
        "slider_seconds_52k": det["slider_seconds_52k"],
    }


STUDY_GRID = ((1.0, 10.0, 100.0, 1000.0), (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005))


def stable_keys(report: dict) -> dict:
    """The figures a script tracks from run to run, under names that do not change."""
    return {
        "machine": report["machine"],
        "extraction_ratio": report.get("extraction", {}).get("ratio"),
        "odin_ratio": report.get("odin", {}).get("ratio"),
        "methods_seconds_52k": report.get("methods_seconds_52k"),
        "methods_seconds_52k_cold": report.get("methods_seconds_52k_cold"),
        "per_method_seconds": report.get("per_method_seconds"),
        "slider_seconds_52k": report.get("slider_seconds_52k"),
        "cold_start_seconds": report.get("cold_start", {}).get("seconds"),
        "extract_peak_rss_mb": report.get("rss", {}).get("extract_peak_rss_mb"),
    }


def run_bench(args) -> int:
    from oodcore.models.registry import load_model

    quick = args.quick
    device = args.device
    report: dict = {"machine": machine(), "quick": quick}
    print(f"machine: {report['machine']}")
    bundle = load_model("efficientnet_lite0", device=device)
    temps, eps = STUDY_GRID
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.images) if args.images else make_jpegs(Path(tmp) / "imgs", 48 if quick else 256)
        workers = min(2, os.cpu_count() or 1)
        ex = bench_extraction(bundle, root, workers=workers, batch_size=32, device=device, repeats=1 if quick else 2)
        report["extraction"] = ex
        print(
            f"(a) extraction, efficientnet_lite0, {ex['images']} images, {workers} workers, {ex['threads']} network "
            f"thread(s): plain {ex['plain_img_s']:.1f} img/s, ours {ex['ours_img_s']:.1f} img/s, ratio "
            f"{ex['ratio']:.2f}x (logits agree to {ex['max_abs_logit_diff']:.1e})"
        )
        st, wall = ex["stages_ms_per_image"], ex["ours_wall_split_s"]
        print(
            "    per image, one core: decode {decode_ms:.1f} ms, resize+crop {resize_crop_ms:.1f} ms, thumbnail "
            "{thumbnail_ms:.1f} ms, ToTensor+Normalize {plain_to_tensor_normalize_ms:.1f} ms (ours: uint8 + one "
            "normalisation per batch {ours_uint8_plus_batch_normalise_ms:.1f} ms), eager network "
            "{network_eager_ms:.1f} ms".format(**st)
        )
        print(
            f"    ours, wall: network {wall['network_s']:.1f} s, waiting for batches {wall['waiting_for_batches_s']:.1f}"
            f" s, assembling the artifact {wall['write_s']:.2f} s of {wall['total_s']:.1f} s"
        )
        od = bench_odin(bundle, root, 4 if quick else 16, temps, eps, device)
        report["odin"] = od
        print(
            f"(b) ODIN grid {od['grid']} on {od['images']} images: naive {od['naive_s']:.1f} s, ours {od['ours_s']:.1f} s, "
            f"ratio {od['ratio']:.2f}x (scores agree to {od['max_abs_score_diff']:.1e})"
        )
        if args.cuda:
            if torch.cuda.is_available():
                cu = bench_cuda(root, temps, eps)
                report["cuda"] = cu
                print(
                    f"(e) CUDA ({cu['gpu']}) resnet50: fp32 {cu['fp32_img_s']:.0f} img/s, AMP+channels-last "
                    f"{cu['amp_channels_last_img_s']:.0f} img/s; whole pass with CPU decoding "
                    f"{cu['pipeline_cpu_decode_img_s']:.0f} img/s, GPU decoding {cu['pipeline_gpu_decode_img_s']:.0f}"
                    f" img/s; ODIN grid {cu['odin_grid_img_s']:.1f} img/s"
                )
            else:
                report["cuda"] = {"skipped": "no CUDA device"}
                print("(e) --cuda: no CUDA device here, nothing measured")
    figures = detector_figures(quick)
    report.update(figures)
    det, sl = figures["methods"], figures["slider"]
    from oodcore.cli.bench_detectors import describe

    for line in describe(det):
        print(line)
    rerun = len(det["per_method_seconds"]) * det["samples"] / ex["plain_img_s"]
    print(
        f"    re-running the network per method would take ~{rerun:.0f} s at the plain rate: "
        f"{rerun / det['methods_seconds_52k']:.0f}x"
    )
    per = ", ".join(f"{m} {sl[m]['median_ms']:.0f} ms (max {sl[m]['max_ms']:.0f})" for m in ("msp", "energy", "odin"))
    print(f"(d) slider move (the app's metrics_for + histogram, {sl['samples']} samples, median): {per}")
    if args.rss:
        from oodcore.cli.bench_rss import bench_rss

        rss = bench_rss(tuple(int(n) for n in args.rss.split(",")))
        report["rss"] = rss
        print(
            "(f) extraction peak RSS: "
            + ", ".join(f"{n} images {mb:.0f} MB" for n, mb in rss["extract_peak_rss_mb"].items())
        )
    if args.cold_start:
        from oodcore.cli.bench_app import bench_cold_start

        cs = bench_cold_start()
        report["cold_start"] = cs
        runs = f" ({cs['statistic']}: {', '.join(f'{v:.2f}' for v in cs['runs'])} s)" if cs.get("runs") else ""
        print(
            f"(g) app cold start to the first rendered page: {cs.get('seconds')} s{runs} {cs.get('note', '')}".rstrip()
        )
    if args.json_file:
        Path(args.json_file).write_text(json.dumps({**stable_keys(report), "details": report}, indent=2) + "\n")
        print(f"wrote {args.json_file}")
    return 0
