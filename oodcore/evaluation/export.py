"""Export one cached run as a plain .npz (+ a JSON side file) for use outside oodcore.

    python -m oodcore export --benchmark demo --arch digits_cnn --npz out/demo.npz

The .npz is written with np.savez (no pickles: `np.load(FILE, allow_pickle=False)`):

    logits_id, logits_ood            (N, K) float32, restricted to the protocol's K classes
    features_id, features_ood        (N, D) float32 penultimate features      (when cached)
    features_fit, labels_fit         the ID fit split (int64 labels in 0..K-1) (when cached)
    labels_id                        (N_id,) int64, index within the K classes
    fc_weight, fc_bias               (K, D), (K,) float32 final layer          (when cached)
    paths_id, paths_ood              unicode arrays, relative to each split's root
    scores_<method>_id / _ood        float64, every available method at its default parameters
                                     (exactly the registry's scores; higher = more OOD)

The JSON side file (same name, .json suffix) holds the benchmark's protocol, class ids
and names, n_id / n_ood / n_fit, every exported method's parameters, label, paper and
needs, the fitted quantities worth reporting (temperature, ReAct threshold, ViM α, ...),
the methods that could not be scored and why, and each array's shape and dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oodcore import detectors as M
from oodcore.store.atomic import write_json, write_npz
from oodcore.store.rundata import BenchmarkData
from oodcore.store.scopes import set_column


def _fitted_summary(data: BenchmarkData) -> dict:
    """The scalars of every fitted state at default parameters (e.g. temp_scaling's T, ReAct's clip, ViM's α)."""
    out: dict = {}
    for method in M.available_methods(data):
        if method.fit_fn is None or method.trained_on_ood:
            continue
        try:
            state = method.state(data)
        except M.MethodUnavailable:
            continue
        if isinstance(state, dict):
            scalars = {
                k: v.item() if isinstance(v, np.generic) else v
                for k, v in state.items()
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            }
            if scalars:
                out[method.name] = scalars
    return out


def export_run(data: BenchmarkData, npz_path: str | Path) -> tuple[Path, Path]:
    """Write `npz_path` and its .json side file; returns both paths."""
    npz_path = Path(npz_path)
    json_path = npz_path.with_suffix(".json")
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    arrays: dict[str, np.ndarray] = {
        "logits_id": f32(data.id.logits),
        "logits_ood": f32(data.ood.logits),
        "labels_id": np.asarray(data.id.labels, dtype=np.int64),
        "paths_id": np.asarray(data.id.paths, dtype=str),
        "paths_ood": np.asarray(data.ood.paths, dtype=str),
        "ood_set_ood": set_column(data),  # each OOD row's set name
    }
    if data.id.features is not None and data.ood.features is not None:
        arrays["features_id"], arrays["features_ood"] = f32(data.id.features), f32(data.ood.features)
    if data.fit is not None:
        if data.fit.features is not None:
            arrays["features_fit"] = f32(data.fit.features)
        arrays["labels_fit"] = np.asarray(data.fit.labels, dtype=np.int64)
    if data.head_weight is not None:
        arrays["fc_weight"] = f32(data.head_weight)
        if data.head_bias is not None:
            arrays["fc_bias"] = f32(data.head_bias)

    exported, skipped = {}, {}
    for method in M.available_methods(data):
        params = method.defaults()
        try:
            s_id, s_ood = method.score_id_ood(data, **params)
        except M.MethodUnavailable as exc:
            skipped[method.name] = str(exc)
            continue
        arrays[f"scores_{method.name}_id"] = np.asarray(s_id, dtype=np.float64)
        arrays[f"scores_{method.name}_ood"] = np.asarray(s_ood, dtype=np.float64)
        exported[method.name] = {
            "label": method.label,
            "params": params,
            "paper": method.paper,
            "needs": sorted(method.needs),
            "param_spec": [
                {
                    "name": p.name,
                    "label": p.label,
                    "default": p.default,
                    "low": p.low,
                    "high": p.high,
                    "scale": p.scale,
                    "help": p.help,
                }
                for p in method.params
            ],
            "trained_on_ood": bool(getattr(method, "trained_on_ood", False)),
        }
    for method in M.REGISTRY.values():
        if method.name not in exported and method.name not in skipped:
            skipped[method.name] = f"the cache lacks {', '.join(sorted(M.missing_needs(method, data)))}"

    side = {
        "benchmark": data.benchmark,
        "arch": data.arch,
        "protocol": data.protocol,
        "class_ids": list(data.class_ids),
        "class_names": list(data.class_names),
        "n_id": len(data.id),
        "n_ood": len(data.ood),
        "ood_sets": [{"name": s.name, "group": s.group, "rows": [s.start, s.stop]} for s in data.ood_sets],
        "tune_set": data.tune_name if data.tune is not None else None,
        "n_fit": 0 if data.fit is None else len(data.fit),
        "n_classes": data.n_classes,
        "feature_dim": None if data.id.features is None else int(data.id.features.shape[1]),
        "score_convention": "higher = more OOD; scores at each method's default parameters",
        "methods": exported,
        "not_exported": skipped,
        "fitted": _fitted_summary(data),
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()},
        "npz": npz_path.name,
    }
    write_npz(npz_path, arrays)
    write_json(json_path, side)
    return npz_path, json_path
