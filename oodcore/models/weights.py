"""Weights: local files (safetensors or weights-only state dicts), hub caches, and clear offline errors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import urllib.parse
from pathlib import Path

import torch
from torch import Tensor, nn

from oodcore.models.bundle import DEFAULT_MODEL, RANDOM


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
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _local_weights(model: nn.Module, weights, name: str, source: str, arch: str) -> dict:
    """Load `weights` (a file, or RANDOM for tests) into `model` with no download; return the identity."""
    if weights == RANDOM:
        return {"name": name, "source": source, "architecture": arch, "weights": RANDOM}
    path = Path(weights)
    _load_strict(model, _read_state_dict(path), path)
    return {
        "name": name,
        "source": source,
        "architecture": arch,
        "weights": f"sha256:{_sha256(path)}",
        "weights_file": path.name,
    }


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


def _timm_cached_file(cfg) -> str | None:
    """The local weight file timm just used, when it can be located (for the identity hash)."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, _, rev = hub_id.partition("@")
            names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
            names += [
                "model.safetensors",
                "open_clip_model.safetensors",
                "pytorch_model.bin",
                "open_clip_pytorch_model.bin",
            ]
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
