"""`python -m oodcore bench --synthetic-study`: the study at full size, without a network or a dataset.

Writes a synthetic cache of `--archs` architectures laid out exactly as `run` writes one (run.json,
id/ood/fit/head artifacts with JPEG thumbnails) and measures what a 24-architecture study costs:
building every stored report, the leaderboard's first render from them, the app server's RSS
with the study open (`streamlit run app.py` driven by headless Chromium), and the peak RSS of
fitting detectors on a large float16 fit set read through a memory map.

The data are realistic in the ways the detectors care about: non-negative penultimate features
built from class prototypes, logits that are exactly the final layer applied to those features
(so ViM, GradNorm, ReAct and the logit methods agree with each other), OOD rows that mix several
prototypes with more noise (lower, flatter logits), and architectures that differ in separability.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from oodcore.store import cache, thumbs

BENCHMARK = "synthetic-study"


def _thumbnails(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n small JPEG thumbnails (smooth colour gradients), packed once and shared by every architecture."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 48, dtype=np.float32)
    base = np.stack(np.meshgrid(ramp, ramp), -1)  # (48, 48, 2)
    tiles = np.empty((n, 48, 48, 3), np.uint8)
    for i, (a, b, c) in enumerate(rng.random((n, 3))):
        tiles[i] = np.clip(np.dstack([base[..., 0] * a, base[..., 1] * b, np.full((48, 48), c)]) * 255, 0, 255)
    return thumbs.pack(tiles)


def _split(rng, protos: np.ndarray, labels: np.ndarray, ood: bool, noise: float) -> np.ndarray:
    n, d = len(labels), protos.shape[1]
    if ood:  # a blend of two classes' prototypes: plausible, but no one class
        mix = rng.integers(0, len(protos), (n, 2))
        feats = protos[mix[:, 0]] * 0.55 + protos[mix[:, 1]] * 0.45
    else:
        feats = protos[labels].copy()
    noise = noise * (d / 256) ** 0.75  # the same separability whatever the dimension
    feats += rng.standard_normal((n, d), dtype=np.float32) * noise * (1.15 if ood else 1.0)
    return np.maximum(feats, 0, out=feats)


def build_study(
    root: Path,
    archs: int = 24,
    n_id: int = 10_000,
    n_ood: int = 2_000,
    n_fit: int = 10_000,
    dim: int = 2048,
    k: int = 200,
    seed: int = 0,
    say=print,
) -> list[str]:
    """Write `archs` synthetic runs of one benchmark under `root`; returns the architecture names."""
    ids = [f"n{i:08d}" for i in range(k)]
    th_id, th_ood, th_fit = _thumbnails(n_id, seed), _thumbnails(n_ood, seed + 1), _thumbnails(n_fit, seed + 2)
    names = []
    for a in range(archs):
        arch = f"synthetic_{a:02d}"
        names.append(arch)
        rng = np.random.default_rng([seed, a])
        noise = 1.0 + 0.8 * a / max(1, archs - 1)  # from well to poorly separated (MSP AUROC ~0.95 to ~0.7 at 2048-d)
        protos = np.abs(rng.standard_normal((k, dim), dtype=np.float32)) * rng.gamma(2.0, 0.5, (1, dim)).astype(
            np.float32
        )
        weight = (protos - protos.mean(0)) / np.sqrt(dim)
        bias = rng.standard_normal(k).astype(np.float32) * 0.1
        folder = cache.arch_dir(root, BENCHMARK, arch)
        files = {}
        for split, n, (data, offsets) in (("id", n_id, th_id), ("ood", n_ood, th_ood), ("fit", n_fit, th_fit)):
            labels = np.full(n, -1, np.int64) if split == "ood" else rng.integers(0, k, n)
            feats = _split(rng, protos, np.maximum(labels, 0), split == "ood", noise)
            logits = feats @ weight.T + bias
            arrays = {
                "logits": logits.astype(np.float32),
                "features": feats,
                "labels": labels,
                "index": np.arange(n, dtype=np.int64),
                "paths": np.asarray([f"{split}/{i:06d}.JPEG" for i in range(n)]),
                "thumb_data": data,
                "thumb_offsets": offsets,
                "skipped_paths": np.zeros(0, str),
                "skipped_errors": np.zeros(0, str),
            }
            files[split] = cache.write_artifact(folder, f"{split}-{cache.key_of([seed, a, split, n, dim])}.npz", arrays)
        files["head"] = cache.write_artifact(
            folder, f"head-{cache.key_of([seed, a, 'head', dim])}.npz", {"weight": weight, "bias": bias}
        )
        cache.write_run(
            folder,
            {
                "benchmark": BENCHMARK,
                "arch": arch,
                "protocol": "imagenet-o",
                "class_ids": ids,
                "class_names": [f"class {i}" for i in range(k)],
                "files": files,
                "n_id": n_id,
                "n_ood": n_ood,
                "n_fit": n_fit,
                "skipped": [],
                "fit_split": f"fit split: {n_fit} synthetic train rows; every synthetic ID row is evaluated",
                "fit_source": {"kind": "synthetic"},
                "official_id_set": True,
                "model": {"name": arch, "source": "synthetic"},
                "notes": [f"synthetic study: noise {noise:.2f} (seed {seed})"],
            },
        )
        say(f"  wrote {arch} ({n_id} ID / {n_ood} OOD / {n_fit} fit, {dim}-d)")
    return names


def build_reports(root: Path, archs: list[str], n_boot: int = 200) -> dict:
    """Compute and store every architecture's report; seconds in all and per architecture."""
    from oodcore.evaluation.stored import stored_report

    per = {}
    start = time.perf_counter()
    for arch in archs:
        t = time.perf_counter()
        stored_report(root, BENCHMARK, arch, n_boot)
        per[arch] = round(time.perf_counter() - t, 2)
    return {"report_seconds": round(time.perf_counter() - start, 2), "report_seconds_per_arch": per}


def leaderboard_render(root: Path, timeout: float = 600) -> float | None:
    """Seconds for the app's first run of the leaderboard with the stored reports (AppTest, in a child process)."""
    repo = Path(__file__).resolve().parents[2]
    app = repo / "app.py"
    if not app.is_file():
        return None  # an installed package without the app
    proc = subprocess.run(
        [sys.executable, "-m", "oodcore.explorer.probe", str(root), str(app)],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the leaderboard probe failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["leaderboard_render_seconds"]


def app_rss(root: Path, timeout: float = 600) -> dict:
    """`streamlit run app.py` on the study; RSS of the server process after the leaderboard has rendered."""
    from oodcore.cli.appserver import CHROMIUM, ServerDidNotStart, streamlit_server

    try:
        from playwright import sync_api
    except ImportError:
        return {"app_rss_mb": None, "note": "playwright is not installed"}
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OODCORE_CACHE": str(root)}
    env.pop("OODCORE_READONLY", None)
    try:
        with streamlit_server("app.py", cwd=repo, env=env, timeout=120) as server:
            idle = _rss_mb(server.proc.pid)
            with sync_api.sync_playwright() as p:
                kwargs = {"executable_path": str(CHROMIUM)} if CHROMIUM.is_file() else {}
                browser = p.chromium.launch(args=["--no-sandbox"], **kwargs)
                page = browser.new_page(viewport={"width": 1440, "height": 1800})
                start = time.perf_counter()
                page.goto(server.url)
                page.get_by_role("heading", name="Leaderboard").wait_for(timeout=timeout * 1000)
                page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=timeout * 1000)
                seconds = time.perf_counter() - start
                time.sleep(2)
                rss, peak = _rss_mb(server.proc.pid), _rss_mb(server.proc.pid, "VmHWM")
                browser.close()
    except ServerDidNotStart:
        return {"app_rss_mb": None, "note": "streamlit did not start"}
    return {
        "app_rss_mb": rss,
        "app_peak_rss_mb": peak,
        "app_idle_rss_mb": idle,
        "browser_leaderboard_seconds": round(seconds, 2),
    }


def _rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    from oodcore.cli.bench_rss import proc_status_mb

    mb = proc_status_mb(field, pid)
    return None if mb is None else round(mb, 1)


FIT_METHODS = ("mahalanobis", "vim", "knn", "nnguide")
FIT_CLASSES = 200  # classes of the synthetic fit rows (their logits are written beside the features)


def write_fit_rows(path: Path, rows: int, dim: int, k: int = FIT_CLASSES, chunk: int = 65_536, seed: int = 0) -> None:
    """Float16 (rows, dim) features, their float32 logits under a synthetic head, and labels, written in chunks
    through memory maps (as extraction writes a fit split)."""
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(seed)
    protos = np.abs(rng.standard_normal((k, dim), dtype=np.float32))
    head = (protos - protos.mean(0)) / np.sqrt(dim)
    feats = open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, dim))
    logits = open_memmap(path.with_name(path.stem + "-logits.npy"), mode="w+", dtype=np.float32, shape=(rows, k))
    labels = np.empty(rows, np.int64)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        labels[start : start + n] = rng.integers(0, k, n)
        block = _split(rng, protos, labels[start : start + n], False, 0.8).astype(np.float16)
        feats[start : start + n] = block
        logits[start : start + n] = block.astype(np.float32) @ head.T
    feats.flush()
    logits.flush()
    del feats, logits
    np.save(path.with_name(path.stem + "-labels.npy"), labels)
    np.save(path.with_name(path.stem + "-head.npy"), head)


def fit_peak(path: Path, method: str, n_query: int = 1000) -> dict:
    """Fit `method` on the memory-mapped fit rows in a fresh process, then score `n_query` rows with it (for the
    neighbour methods that is the search through the whole fit set): peak RSS (MB) and seconds.

    `peak_rss_mb` is the kernel's high-water mark (VmHWM), which counts the pages of the memory-mapped fit
    file the process has touched (page cache, reclaimable, shared); `peak_private_mb` is the peak of the
    process's own (anonymous) memory, sampled every 10 ms: what fitting itself allocates.
    """
    code = (
        "import sys, threading, time, numpy as np\n"
        "from oodcore import detectors as M\n"
        "from oodcore.store.rundata import BenchmarkData, SplitArrays\n"
        "p, method, nq = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "from oodcore.cli.bench_rss import proc_status_mb as status\n"
        "peak = {'anon': 0.0}; done = threading.Event()\n"
        "def sample():\n"
        "    while not done.wait(0.01):\n"
        "        peak['anon'] = max(peak['anon'], status('RssAnon'))\n"
        "feats = np.load(p, mmap_mode='r'); labels = np.load(p[:-4] + '-labels.npy')\n"
        "w = np.load(p[:-4] + '-head.npy').astype(np.float32); k = w.shape[0]\n"
        "fit_logits = np.lib.format.open_memmap(p[:-4] + '-logits.npy', mode='r')\n"
        "q = np.asarray(feats[:nq], dtype=np.float32) * np.float32(1.1)\n"
        "rows = SplitArrays(q @ w.T, q, np.zeros(nq, np.int64), np.asarray(['q'] * nq))\n"
        "fit = SplitArrays(fit_logits, feats, labels, np.asarray(['f']))\n"
        "data = BenchmarkData('fit', 'fit', 'p', [str(i) for i in range(k)], [str(i) for i in range(k)], rows, rows,"
        " head_weight=w, head_bias=np.zeros(k, np.float32), fit=fit)\n"
        "base_anon = status('RssAnon'); threading.Thread(target=sample, daemon=True).start()\n"
        "t = time.perf_counter(); M.get(method).state(data); t_fit = time.perf_counter() - t\n"
        "t = time.perf_counter(); M.get(method).score(data, rows); t_score = time.perf_counter() - t\n"
        "done.set(); peak['anon'] = max(peak['anon'], status('RssAnon'))\n"
        "print(status('VmHWM'), peak['anon'], base_anon, t_fit, t_score)\n"
    )
    repo = Path(__file__).resolve().parents[2]  # `python -c` in the checkout imports this oodcore
    args = [sys.executable, "-c", code, str(path), method, str(n_query)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=repo)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"peak_rss_mb": None, "error": f"exit {proc.returncode}: {tail}"}
    hwm, anon, base, t_fit, t_score = (float(v) for v in proc.stdout.split()[-5:])
    return {
        "peak_rss_mb": round(hwm, 1),
        "peak_private_mb": round(anon, 1),
        "private_before_fit_mb": round(base, 1),
        "fit_seconds": round(t_fit, 2),
        "score_seconds": round(t_score, 2),
        "query_rows": n_query,
    }


def _free_disk_mb(folder: Path) -> float:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize / 2**20


def fit_memory(work: Path, sizes: list[int], dim: int, say=print) -> dict:
    """Peak RSS of fitting each fitted method (and scoring 1,000 rows with it) at each fit size, the fit rows
    float16 on disk and read through a memory map.  A size whose files would not fit on the disk is skipped."""
    out: dict = {}
    for rows in sizes:
        need_mb = rows * (dim * 2 + FIT_CLASSES * 4 + 8) / 2**20
        if need_mb > _free_disk_mb(work) * 0.8:
            out[str(rows)] = {"skipped": f"the fit rows need ~{need_mb / 1024:.0f} GB of disk; not attempted"}
            say(f"  fit {rows} rows: skipped ({out[str(rows)]['skipped']})")
            continue
        path = work / f"fit-{rows}.npy"
        write_fit_rows(path, rows, dim)
        out[str(rows)] = {}
        for method in FIT_METHODS:
            out[str(rows)][method] = fit_peak(path, method)
            say(f"  fit {rows} rows x {dim} float16, {method}: {out[str(rows)][method]}")
        for p in work.glob(f"fit-{rows}*.npy"):
            p.unlink()
    return out


def _existing(root: Path, args) -> list[str] | None:
    """The architectures of a complete study of these sizes already under `root` (`--study-dir`), else None."""
    names = [f"synthetic_{a:02d}" for a in range(args.archs)]
    for arch in names:
        try:
            run = cache.read_run(root, BENCHMARK, arch)
        except (OSError, ValueError):
            return None
        if [run.get("n_id"), run.get("n_ood"), run.get("n_fit")] != [args.n_id, args.n_ood, args.n_fit]:
            return None
        with np.load(cache.arch_dir(root, BENCHMARK, arch) / run["files"]["head"], allow_pickle=False) as z:
            if z["weight"].shape[1] != args.dim:
                return None
    return names


def run_study_bench(args) -> int:
    """The synthetic-study bench; prints a table and writes `--json` with stable keys."""
    say = print
    keep = getattr(args, "study_dir", None)
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="oodcore-study-")
    root = Path(keep) if keep else Path(tmp.name)
    try:
        t = time.perf_counter()
        archs = _existing(root, args)
        if archs is None:
            say(f"writing a synthetic study of {args.archs} architectures under {root}")
            archs = build_study(root, args.archs, args.n_id, args.n_ood, args.n_fit, args.dim, say=say)
        else:
            say(f"reusing the synthetic study under {root}")
        out = {"archs": args.archs, "n_id": args.n_id, "n_ood": args.n_ood, "n_fit": args.n_fit, "dim": args.dim}
        out["build_seconds"] = round(time.perf_counter() - t, 2)
        out.update(build_reports(root, archs))
        say(f"reports: {out['report_seconds']} s for {len(archs)} architectures")
        out["leaderboard_render_seconds"] = leaderboard_render(root)
        say(f"leaderboard first render from stored reports: {out['leaderboard_render_seconds']} s")
        out.update(app_rss(root))
        say(f"app server RSS with the study open: {out.get('app_rss_mb')} MB")
        sizes = [int(s) for s in str(args.fit_rows).split(",") if s.strip()]
        fit_dim = getattr(args, "fit_dim", None) or args.dim
        out["fit_dim"] = fit_dim
        fit = fit_memory(root, sizes, fit_dim, say=say)
        out["fit_peak_rss"] = fit
        peaks = {r: max((v.get("peak_rss_mb") or 0) for v in m.values()) for r, m in fit.items() if "skipped" not in m}
        out["fit_peak_rss_mb"] = peaks
        out["fit_peak_private_mb"] = {
            r: max((v.get("peak_private_mb") or 0) for v in m.values()) for r, m in fit.items() if "skipped" not in m
        }
        out["fit_note"] = (
            "each fitted method in a fresh process: fit on float16 fit rows read through a memory map (chunked "
            "float64 accumulators; neighbour methods search the fit set block by block), then score 1,000 rows; "
            "fit_peak_rss_mb is VmHWM (it counts the touched pages of the memory-mapped file, reclaimable page "
            "cache), fit_peak_private_mb the peak of the process's own memory"
        )
        out["extract_peak_rss_mb"] = None  # with --rss: extraction's peak RSS at those image counts
        if getattr(args, "rss", None):
            from oodcore.cli.bench_rss import bench_rss

            counts = tuple(int(n) for n in str(args.rss).split(",") if n.strip())
            out["extract_peak_rss_mb"] = bench_rss(counts)["extract_peak_rss_mb"]
            say(f"extraction peak RSS: {out['extract_peak_rss_mb']} MB")
        out["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        say(json.dumps({k: v for k, v in out.items() if k != "report_seconds_per_arch"}, indent=1))
        if args.json_file:
            Path(args.json_file).write_text(json.dumps(out, indent=2) + "\n")
            say(f"wrote {args.json_file}")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()
