"""Energy-bounded fine-tuning (Liu et al. 2020, "Energy-based Out-of-distribution Detection", §3.2).

    loss = CE(f(x_in), y) + λ · ( E[max(0, E(x_in) − m_in)²] + E[max(0, m_out − E(x_out))²] )
    E(x) = −T · logsumexp(f(x) / T)

The score of the tuned model is its energy (higher = more OOD), like the untuned Energy method,
which is the baseline it is reported against (same model before tuning, same held-out OOD rows).

What is trained, on what:

* ImageNet runs (`--input features`): the classification head, a Linear initialised from the
  cached head weights, on cached penultimate features: ID = the `fit` split with its labels,
  outlier exposure = the OOD *exposure* split only (oodcore.data.splits.ood_split).
* The demo (`--input pixels`, its default): the whole digits CNN, initialised from the cached
  model, on pixels: ID = the CNN's own fit digits, outlier exposure = the OOD exposure split's digits.

Margins. The paper's values (m_in = −25, m_out = −7, λ = 0.1) were chosen for a WideResNet on
CIFAR-10, whose energies live on another scale than a given ImageNet head or the demo CNN
(demo: untuned fit-split energies have median ≈ −8, 95th percentile ≈ −4.5). By default
(`margins="auto"`) they are therefore set from the untuned model's energies on the ID fit split:
m_in = their median (the ID hinge pulls the upper half of ID energies down) and m_out = their
95th percentile (the OOD hinge pushes exposure OOD above where 95% of ID energies already are).
`--margins paper` or explicit `--m-in/--m-out` override this; λ keeps the paper's 0.1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from oodcore.data.splits import outlier_features, outlier_source
from oodcore.training.config import TrainConfig, detector_name
from oodcore.training.files import JobError
from oodcore.training.tasks import Task, demo_pixels

PAPER = "Liu et al. 2020, Energy-based Out-of-distribution Detection (energy-bounded fine-tuning)"
PAPER_M_IN, PAPER_M_OUT, PAPER_LAMBDA = -25.0, -7.0, 0.1
AUTO_QUANTILES = (0.5, 0.95)


def energy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    return -T * torch.logsumexp(logits / T, dim=1)


def energy_loss(
    logits_in: torch.Tensor,
    labels: torch.Tensor,
    logits_out: torch.Tensor,
    *,
    m_in: float = PAPER_M_IN,
    m_out: float = PAPER_M_OUT,
    lam: float = PAPER_LAMBDA,
    T: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, CE, energy regulariser) of the paper's objective."""
    ce = nn.functional.cross_entropy(logits_in, labels)
    e_in, e_out = energy(logits_in, T), energy(logits_out, T)
    reg = torch.relu(e_in - m_in).pow(2).mean() + torch.relu(m_out - e_out).pow(2).mean()
    return ce + lam * reg, ce, reg


def auto_margins(fit_logits: np.ndarray, T: float = 1.0) -> tuple[float, float]:
    """(m_in, m_out) = (median, 95th percentile) of the untuned energies on the ID fit split."""
    e = energy(torch.as_tensor(np.asarray(fit_logits, np.float64)), T).numpy()
    lo, hi = np.quantile(e, AUTO_QUANTILES)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class EnergyTask(Task):
    """Fine-tune `model` (a network on pixels, or a head on features) with the energy objective."""

    paper = PAPER
    terms = ("cross-entropy", "energy hinge")

    def __init__(self, c: TrainConfig, data, root: Path):
        self.c = c
        split = data.tuning_split()
        if data.fit is None or len(data.fit) == 0:
            raise JobError(
                "energy fine-tuning needs the ID fit split (labelled ID rows never evaluated); "
                "this run has none: rerun `python -m oodcore run` (it makes one by default)"
            )
        if c.m_in is not None:
            self.m_in, self.m_out, how = float(c.m_in), float(c.m_out), "given"
        elif c.margins == "paper":
            self.m_in, self.m_out, how = PAPER_M_IN, PAPER_M_OUT, "the paper's CIFAR values"
        else:
            self.m_in, self.m_out = auto_margins(data.fit.logits, c.temperature)
            how = "median / 95th percentile of the untuned fit-split energies"
        self.margin_note = f"m_in = {self.m_in:.3g}, m_out = {self.m_out:.3g} ({how})"
        n_exp = split.n_tune if split.uses_tune_set else len(split.exposure)
        labels = np.asarray(data.fit.labels, np.int64)
        keep = np.flatnonzero(labels >= 0)  # fit rows outside the protocol's classes carry no label
        if len(keep) == 0:
            raise JobError("the fit split has no labelled rows; energy fine-tuning needs class labels")
        self.y_in = torch.from_numpy(labels[keep])
        if c.input == "pixels":
            from oodcore.extraction import demo

            pixels = demo_pixels(data)
            if split.uses_tune_set:
                raise JobError("pixel training has the demo's digits only; a --tune-ood set needs --input features")
            model = demo.load_demo_model(root).requires_grad_(True)
            self.model = model
            self.x_in = model.normalise(torch.from_numpy(pixels["fit"][keep]))
            self.x_out = model.normalise(torch.from_numpy(pixels["ood"][split.exposure]))
            self.x_id_eval = model.normalise(torch.from_numpy(pixels["id"]))
            self.x_ood_all = model.normalise(torch.from_numpy(pixels["ood"]))
            self.forward = model
            what = "whole CNN"
        else:
            if data.fit.features is None or data.id.features is None or data.ood.features is None:
                raise JobError("this run has no cached features; energy fine-tuning of the head needs them")
            if data.head_weight is None:
                raise JobError("this run has no cached classification head (head-<key>.npz)")
            head = nn.Linear(data.head_weight.shape[1], data.head_weight.shape[0])
            with torch.no_grad():
                head.weight.copy_(torch.from_numpy(np.asarray(data.head_weight, np.float32)))
                head.bias.copy_(torch.from_numpy(np.asarray(data.head_bias, np.float32)))
            self.model = head
            f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
            self.x_in = f32(data.fit.features[keep])
            self.x_out = f32(outlier_features(data, split))
            self.x_id_eval = f32(data.id.features)
            self.x_ood_all = f32(data.ood.features)
            self.forward = head
            what = "head"
        self.name = detector_name(c)
        source = outlier_source(split)
        self.label = f"Energy FT ({what}, {source.removeprefix('the ')})"
        self.summary = (
            f"Energy of the {what} fine-tuned with the energy-bounded objective (CE + λ·squared "
            f"hinges on ID/OOD energies; λ = {c.lam:g}, {self.margin_note}, T = {c.temperature:g}); "
            + (
                f"outlier exposure = the separate OOD tuning set {split.name!r}, so it is scored on every test OOD row."
                if split.uses_tune_set
                else "outlier exposure = the OOD exposure split, so it is scored on the held-out OOD rows only."
            )
        )
        self.trained_on = {
            "id": f"the ID fit split ({len(self.x_in)} labelled rows)",
            "ood": f"{source} ({n_exp} rows{'' if split.uses_tune_set else f', seed {split.seed}'})",
        }
        self.baseline = ("energy", {"T": c.temperature})
        self.baseline_note = "untuned Energy of the same model before fine-tuning"

    def extra_meta(self) -> dict:
        return {"m_in": self.m_in, "m_out": self.m_out, "margins": self.margin_note}

    def n_batches(self) -> int:
        return -(-len(self.x_in) // self.c.batch_size)

    def batches(self, epoch: int):
        gen = torch.Generator().manual_seed(self.c.seed * 100_003 + epoch)
        order = torch.randperm(len(self.x_in), generator=gen)
        bs = self.c.batch_size
        n_out = len(self.x_out)
        out_order = torch.randperm(n_out, generator=gen)
        for k, rows in enumerate(order.split(bs)):
            take = torch.arange(k * bs, k * bs + bs) % n_out  # cycle through the exposure rows
            yield rows, out_order[take]

    def loss(self, batch):
        rows, out_rows = batch
        logits_in = self.forward(self.x_in[rows])
        logits_out = self.forward(self.x_out[out_rows])
        total, ce, reg = energy_loss(
            logits_in,
            self.y_in[rows],
            logits_out,
            m_in=self.m_in,
            m_out=self.m_out,
            lam=self.c.lam,
            T=self.c.temperature,
        )
        return total, float(ce.detach()), float(reg.detach())

    def score(self) -> tuple[np.ndarray, np.ndarray]:
        def run(x):
            return (
                torch.cat([energy(self.forward(chunk), self.c.temperature) for chunk in x.split(1024)]).double().numpy()
            )

        return run(self.x_id_eval), run(self.x_ood_all)


def build_energy_task(c: TrainConfig, data, root: Path) -> EnergyTask:
    return EnergyTask(c, data, root)
