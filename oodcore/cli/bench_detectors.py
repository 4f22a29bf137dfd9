"""Detector speed at ImageNet scale (issue 13 items 3-4): every registered detector + 5 metrics + bootstrap CIs,
and one slider move per detector, on a synthetic 52k-row run.

`bench_detectors(data)` returns a JSON-able dict with the stable keys `methods_seconds_52k` (all
methods, scores + metrics + CIs, fitted state computed once per run and counted in the first method
that needs it), `per_method_seconds` {method: s} and `slider_seconds_52k` {method: s} (the app's path
for one slider move, `analysis.metrics_for`: scores at the new setting + 5 metrics + the 95%-TPR
threshold, after the method's first evaluation), plus `methods` (score/metric split per method) for
the report.  Timings only; correctness is the tests' job.
"""

from __future__ import annotations

import time


def _timed(fn, cpu: dict | None = None, key: str = ""):
    """(wall seconds, result); with `cpu`, also adds the process CPU seconds to cpu[key] (all threads: a
    figure that contention from other processes inflates less than wall time)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    if cpu is not None:
        cpu[key] = cpu.get(key, 0.0) + time.process_time() - start_cpu
    return time.perf_counter() - start, out


def slider_target(method, param, data) -> float | None:
    """The value one slider move goes to: the next option after the default (select sliders), or ten
    steps up (plain sliders); None when the parameter offers only one value on this run."""
    from oodcore.evaluation.analysis import param_options

    options = param_options(method, param, data)
    if options is not None:
        later = [o for o in options if o > param.default]
        earlier = [o for o in options if o < param.default]
        return later[0] if later else (earlier[-1] if earlier else None)
    from oodcore.detectors.numerics import slider_step

    step = slider_step(param)
    if step is None:
        return None
    target = param.default + 10 * step
    return float(min(param.high, target)) if target != param.default else None


def _pass(data, methods, n_boot: int) -> tuple[dict, dict, dict]:
    """Every method's scores + metrics + CIs on `data`: ({method: seconds}, {method: split}, {method: cpu s})."""
    from oodcore.evaluation.metrics import evaluate

    per, rows, cpu = {}, {}, {}
    for method in methods:
        t_score, (s_id, s_ood) = _timed(lambda: method.score_id_ood(data), cpu, method.name)
        t_metric, _ = _timed(lambda: evaluate(s_id, s_ood, n_boot=n_boot), cpu, method.name)
        rows[method.name] = {"score_s": t_score, "metrics_s": t_metric}
        per[method.name] = t_score + t_metric
    return per, rows, cpu


# The dense float32 products with the run's shapes that methods cannot do without at their defaults (N rows,
# D features, K classes): ASH-P and ASH-B multiply shaped features by the head (they keep 40% and 35% of the
# activations: above the sparse path's share); Mahalanobis whitens (a triangular D x D factor: half a product)
# and projects on the class means (D x K); relative Mahalanobis whitens once more for its background; KL matching
# multiplies the softmax by its templates (K x K).  ReAct, DICE and ASH-S (at most 1/8 of the activations or
# weights) take sparse products, SCALE rescales the cached logits and OptFS uses the predicted class's row only:
# none of them is counted, so the figure stays a lower bound.
PRODUCTS = {"head": 3, "whiten": 2, "templates": 1}


def product_floor(data) -> dict:
    """Seconds of the dense products above on this machine (each shape the better of two runs, all cores): a lower bound on
    `methods_seconds_52k` that no rewrite of the rest can beat.  The whitening is timed as the methods whiten
    (`distance.whiten`, a lower-triangular factor in column panels)."""
    import numpy as np

    from oodcore.detectors.distance import whiten, whitening

    n = len(data.id) + len(data.ood)
    d = int(data.id.features.shape[1])
    k = int(data.n_classes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    panels = whitening(np.tril(rng.standard_normal((d, d))) + d * np.eye(d))
    head = rng.standard_normal((d, k), dtype=np.float32)
    templates = rng.standard_normal((k, k), dtype=np.float32)
    products = {
        "head": (x, lambda rows: rows @ head),
        "whiten": (x, lambda rows: whiten(rows, panels)),
        "templates": (rng.standard_normal((n, k), dtype=np.float32), lambda rows: rows @ templates),
    }
    seconds = {}
    for name, (rows, product) in products.items():
        product(rows[:64])  # warm the kernels
        seconds[name] = min(_timed(lambda: product(rows))[0] for _ in range(2))  # a floor: the better of two
    total = sum(PRODUCTS[name] * t for name, t in seconds.items())
    return {"seconds": seconds, "counts": dict(PRODUCTS), "floor_s": float(total)}


def bench_detectors(data, n_boot: int = 200, slider: bool = True, folder=None) -> dict:
    """Every available method on `data` (a fresh run: nothing fitted yet) + metrics + CIs, then one slider move each.

    With `folder` (where the run's fitted states go, as `run` keeps them beside a run): a *cold* pass fits
    every method and builds its per-split tables (stored there), then a fresh copy of the run (new
    process-level state, the same arrays) is scored *from the cache*, reading the stored states and
    tables, as the app and every later command do; the sliders move on that copy.  Without `folder`,
    the one pass is the cold pass and the figures say so.
    """
    import dataclasses

    from oodcore import detectors as M
    from oodcore.evaluation.analysis import metrics_for

    methods = [m for m in M.available_methods(data) if not m.trained_on_ood]
    if folder is not None:
        from oodcore.detectors.persist import attach

        data.meta = {"key": "bench", **(data.meta or {})}  # the stored states' key: the run's own, else "bench"
        attach(data, folder)
    cold, cold_rows, _ = _pass(data, methods, n_boot)
    warm_data = data
    if folder is not None:
        warm_data = dataclasses.replace(data, states={})
        attach(warm_data, folder)
        per, rows, cpu = _pass(warm_data, methods, n_boot)
    else:
        per, rows, cpu = cold, cold_rows, {}
    for name, row in rows.items():
        row["cold_s"] = cold[name]
    sliders = {}
    if slider:
        for method in methods:
            for param in method.params:
                target = slider_target(method, param, warm_data)
                if target is None:
                    continue
                params = {**method.defaults(), param.name: target}
                t, _ = _timed(lambda: metrics_for(warm_data, method, params))
                sliders[method.name] = t
                rows[method.name]["slider"] = {"param": param.name, "to": target, "seconds": t}
                break
    n = len(data.id) + len(data.ood)
    return {
        "methods_seconds_52k": float(sum(per.values())),
        "methods_seconds_52k_cold": float(sum(cold.values())),
        "from_stored_state": folder is not None,
        "per_method_seconds": per,
        "per_method_seconds_cold": cold,
        "slider_seconds_52k": sliders,
        "per_method_cpu_seconds": cpu,
        "methods": rows,
        "samples": n,
        "n_id": len(data.id),
        "n_ood": len(data.ood),
        "n_fit": 0 if data.fit is None else len(data.fit),
        "classes": data.n_classes,
        "feature_dim": None if data.id.features is None else int(data.id.features.shape[1]),
        "bootstrap": n_boot,
        "faiss": _faiss_version(),
        "product_floor": product_floor(data) if data.id.features is not None and data.head_weight is not None else None,
    }


def _faiss_version() -> str | None:
    from oodcore.detectors.search import faiss_module

    faiss = faiss_module()
    return None if faiss is None else getattr(faiss, "__version__", "?")


def describe(result: dict) -> list[str]:
    """The bench's printed lines for the detectors: the total, each method's time and each slider move."""
    per = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(result["per_method_seconds"].items(), key=lambda kv: -kv[1]))
    slow = [k for k, v in result["slider_seconds_52k"].items() if v >= 1.0]
    sl = ", ".join(
        f"{k} {1000 * v:.0f} ms" for k, v in sorted(result["slider_seconds_52k"].items(), key=lambda kv: -kv[1])
    )
    head = (
        f"(c) {len(result['per_method_seconds'])} detectors + 5 metrics + {result['bootstrap']} bootstrap CIs on "
        f"{result['samples']:,} rows ({result['n_id']:,} ID / {result['n_ood']:,} OOD, {result['classes']} classes, "
        f"{result['feature_dim']}-d features, {result['n_fit']:,} fit rows; faiss {result['faiss'] or 'absent'}): "
    )
    if result.get("from_stored_state"):
        head += (
            f"{result['methods_seconds_52k']:.1f} s from the cache with the run's stored fitted states and tables "
            f"({per}); the first pass, fitting and building them, took {result['methods_seconds_52k_cold']:.1f} s"
        )
    else:
        head += f"{result['methods_seconds_52k']:.1f} s in total, fitting included ({per})"
    floor = result.get("product_floor")
    if floor:
        sec = floor["seconds"]
        head += (
            f"\n    of which at least {floor['floor_s']:.1f} s are dense float32 products no method can skip (timed "
            f"here: {floor['counts']['head']} with the head, {sec['head']:.2f} s each; {floor['counts']['whiten']} "
            f"triangular whitenings, {sec['whiten']:.2f} s each; KL templates {sec['templates']:.2f} s)"
        )
    return [
        head,
        f"    slider move per detector (scores at the new setting + 5 metrics + threshold): {sl}"
        + (f"; over 1 s: {', '.join(slow)}" if slow else "; every one under 1 s"),
    ]


_FIT_RSS_SCRIPT = """
import json, sys  # noqa: E401
import numpy as np
from oodcore import detectors as M
from oodcore.store.rundata import BenchmarkData, SplitArrays
n_fit, d, k, method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
feats = np.abs(rng.standard_normal((n_fit, d), dtype=np.float32))
labels = rng.integers(0, k, n_fit)
w = rng.standard_normal((k, d), dtype=np.float32) / np.sqrt(d)
logits = feats @ w.T
q = SplitArrays(logits[:8].copy(), feats[:8].copy(), labels[:8].copy(), np.array(["q"] * 8))
data = BenchmarkData("s", "s", "full", [str(i) for i in range(k)], [str(i) for i in range(k)], q, q,
                     head_weight=w, head_bias=np.zeros(k, np.float32),
                     fit=SplitArrays(logits, feats, labels, np.array(["f"] * n_fit)))
from oodcore.cli.bench_rss import own_peak_mb, proc_status_mb
before = proc_status_mb("VmRSS") or own_peak_mb()  # the inputs in RAM
try:  # reset the peak (VmHWM) so it measures fitting, not the construction of the inputs
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
M.get(method).score(data, data.id)
print(json.dumps({"inputs_mb": before, "peak_mb": own_peak_mb()}))
"""


def fit_peak_rss(
    sizes=(10_000, 20_000, 40_000), d: int = 1280, k: int = 1000, methods=("mahalanobis", "vim", "knn")
) -> dict:
    """Peak RSS of fitting each method, in a fresh process per (method, fit size): {method: {n_fit: {...}}}.

    `inputs_mb` is the process's RSS before fitting (the synthetic fit features, logits and head in
    RAM); `peak_mb` its peak RSS while fitting (the peak counter reset first, Linux); `fit_mb` the
    difference, what fitting itself added at its peak.
    """
    import json
    import subprocess
    import sys

    out: dict = {}
    for method in methods:
        for n in sizes:
            res = subprocess.run(
                [sys.executable, "-c", _FIT_RSS_SCRIPT, str(n), str(d), str(k), method],
                capture_output=True,
                text=True,
                check=True,
            )
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            rec["fit_mb"] = rec["peak_mb"] - rec["inputs_mb"]
            out.setdefault(method, {})[n] = rec
    return out
