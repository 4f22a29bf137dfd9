"""Training a RealNVP flow (oodcore.training.flows) as an OOD detector: score = NLL in bits per dimension.

Inputs:

* `pixels` (demo only): the digits at 32x32, bilinearly upscaled from the demo's 16x16 pixels
  (oodcore.demo.demo_splits, aligned with the cached rows), with RealNVP's 256-level
  dequantisation and logit transform. Masks: checkerboard, horizontal, cyclic.
* `features`: the cached penultimate features, standardised on the fit split and optionally
  PCA-reduced (`pca`, whitened, fitted on the fit split). Masks: halves, random.

The flow is fitted on the ID `fit` split only. With `ood_objective` it also sees the OOD
*exposure* split (never the held-out rows it is scored on):

    loss = NLL_id + λ · mean(max(0, margin − NLL_ood))          (NLLs in bits/dim)

with `margin` an absolute value in bits/dim when given, else the batch's mean ID NLL (detached)
plus `margin_gap` (default 1 bit/dim) — a margin-ranking form as in Outlier Exposure's density
models (Hendrycks et al. 2019), which stays meaningful while the ID NLL itself is falling. The
baseline is the classifier's MSP on the same held-out rows (a flow has no untuned version).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from oodcore.data.splits import outlier_features, outlier_source
from oodcore.training import flows as F
from oodcore.training.config import TrainConfig, detector_name
from oodcore.training.files import JobError
from oodcore.training.tasks import Task, demo_pixels

PAPERS = {
    "pixels": "Dinh et al. 2017, Density estimation using Real NVP; masks and bottlenecked s/t networks from "
    "Kirichenko, Izmailov & Wilson 2020, Why Normalizing Flows Fail to Detect Out-of-Distribution Data",
    "features": "Kirichenko, Izmailov & Wilson 2020, Why Normalizing Flows Fail to Detect Out-of-Distribution Data "
    "(flows on embeddings); RealNVP couplings (Dinh et al. 2017)",
}
PIXEL_SIZE = 32


def upscale(pixels: np.ndarray, size: int = PIXEL_SIZE) -> torch.Tensor:
    """(N, 1, h, w) pixels in [0, 1] -> (N, 1, size, size), bilinear."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


class FlowTask(Task):
    terms = ("ID NLL (bits/dim)", "OOD hinge")
    baseline = ("msp", {})
    baseline_note = "MSP of the classifier (a flow has no untuned version)"

    def __init__(self, c: TrainConfig, data, root: Path):
        self.c = c
        split = data.tuning_split()
        if data.fit is None or len(data.fit) == 0:
            raise JobError("a flow is fitted on the ID fit split, which this run lacks; rerun `python -m oodcore run`")
        if c.input == "pixels":
            pixels = demo_pixels(data)
            if split.uses_tune_set:
                raise JobError("pixel flows have the demo's digits only; a --tune-ood set needs --input features")
            self.x_in = upscale(pixels["fit"])
            self.x_out = upscale(pixels["ood"][split.exposure])
            self.x_id_eval = upscale(pixels["id"])
            self.x_ood_all = upscale(pixels["ood"])
            self.model = F.PixelDensity(
                F.pixel_flow(c.mask, c.layers, c.width, c.bottleneck, tuple(self.x_in.shape[1:]))
            )
            gen = torch.Generator().manual_seed(c.seed)
            self.model.init_from(self.x_in, torch.rand(self.x_in.shape, generator=gen))
            what = f"pixels {PIXEL_SIZE}x{PIXEL_SIZE}, {c.mask} mask"
            self.dims = int(np.prod(self.x_in.shape[1:]))
        else:
            if data.fit.features is None or data.id.features is None or data.ood.features is None:
                raise JobError("this run has no cached features; a flow on embeddings needs them")
            f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
            self.x_in = f32(data.fit.features)
            self.x_out = f32(outlier_features(data, split))
            self.x_id_eval = f32(data.id.features)
            self.x_ood_all = f32(data.ood.features)
            try:
                mean, std, comps = F.FeatureDensity.fit_transform(self.x_in, c.pca or None)
            except ValueError as exc:
                raise JobError(str(exc)) from None
            self.dims = c.pca or self.x_in.shape[1]
            self.model = F.FeatureDensity(
                F.feature_flow(c.mask, self.dims, c.layers, c.width, c.bottleneck, c.seed), mean, std, comps
            )
            what = f"embeddings{f', PCA {c.pca}' if c.pca else ''}, {c.mask} mask"
        ood_text = f"+ {outlier_source(split).removeprefix('the ')}" if c.ood_objective else "ID fit split only"
        self.name = detector_name(c)
        self.label = f"RealNVP flow ({what}, {ood_text})"
        self.paper = PAPERS[c.input]
        margin = (
            f"margin {c.margin:g} bits/dim"
            if c.margin is not None
            else f"margin = ID batch NLL + {c.margin_gap:g} bits/dim"
        )
        self.summary = (
            f"Negative log-likelihood in bits/dim of a RealNVP flow ({c.layers} affine couplings, s/t width "
            f"{c.width}, bottleneck {c.bottleneck}) on {what}; fitted on the ID fit split"
            + (
                f", with the OOD-aware objective NLL_id + λ·max(0, margin − NLL_ood) (λ = {c.lam:g}, {margin}) "
                f"on {outlier_source(split)}"
                if c.ood_objective
                else ""
            )
            + (". Scored on every test OOD row." if split.uses_tune_set else ". Scored on the held-out OOD rows only.")
        )
        self.trained_on = {"id": f"the ID fit split ({len(self.x_in)} rows)"}
        if c.ood_objective:
            n_out = split.n_tune if split.uses_tune_set else len(split.exposure)
            self.trained_on["ood"] = f"{outlier_source(split)} ({n_out} rows)"

    def extra_meta(self) -> dict:
        return {"dims": self.dims, "score_units": "bits/dim"}

    def n_batches(self) -> int:
        return -(-len(self.x_in) // self.c.batch_size)

    def batches(self, epoch: int):
        gen = torch.Generator().manual_seed(self.c.seed * 100_003 + epoch)
        order = torch.randperm(len(self.x_in), generator=gen)
        bs = self.c.batch_size
        n_out = len(self.x_out)
        out_order = torch.randperm(n_out, generator=gen)
        pixels = self.c.input == "pixels"
        for k, rows in enumerate(order.split(bs)):
            out_rows = out_order[torch.arange(k * bs, k * bs + len(rows)) % n_out] if self.c.ood_objective else None
            noise_in = torch.rand((len(rows), *self.x_in.shape[1:]), generator=gen) if pixels else None
            noise_out = (
                torch.rand((len(out_rows), *self.x_in.shape[1:]), generator=gen)
                if pixels and out_rows is not None
                else None
            )
            yield rows, out_rows, noise_in, noise_out

    def loss(self, batch):
        rows, out_rows, noise_in, noise_out = batch
        nll_id = self.model.nll_bpd(self.x_in[rows], noise_in).mean()
        if out_rows is None:
            return nll_id, float(nll_id.detach()), 0.0
        nll_ood = self.model.nll_bpd(self.x_out[out_rows], noise_out)
        margin = self.c.margin if self.c.margin is not None else nll_id.detach() + self.c.margin_gap
        hinge = torch.relu(margin - nll_ood).mean()
        return nll_id + self.c.lam * hinge, float(nll_id.detach()), float(hinge.detach())

    def score(self) -> tuple[np.ndarray, np.ndarray]:
        def run(x):
            return torch.cat([self.model.nll_bpd(chunk) for chunk in x.split(256)]).double().numpy()

        return run(self.x_id_eval), run(self.x_ood_all)


def build_flow_task(c: TrainConfig, data, root: Path) -> FlowTask:
    return FlowTask(c, data, root)
