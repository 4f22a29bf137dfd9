"""RealNVP normalizing flows (Dinh et al. 2017) for OOD scoring, on pixels or on cached embeddings.

One coupling layer transforms the dimensions selected by `trans` given those selected
by `cond` (disjoint 0/1 masks), leaving every other dimension untouched:

    y = x_cond + x_rest + trans * (x * exp(s) + t),    (s, t) = net(x * cond)
    s = scale * tanh(raw)                             (bounded, RealNVP's stable form)

so the Jacobian is triangular and log|det| = sum(s over `trans`). The last layer of every
s/t network starts at zero, so an untrained flow is the identity.

Masks (Kirichenko, Izmailov & Wilson 2020, "Why Normalizing Flows Fail to Detect OOD Data"):

* pixels, `checkerboard`: RealNVP's alternating checkerboard (cond = one colour, trans = the other);
* pixels, `horizontal`: top half / bottom half, alternating (the paper's horizontal mask);
* pixels, `cyclic`: the paper's cycle-mask (its Figure 13): four quadrants; layer k transforms
  quadrant (k+1) mod 4 given quadrant k mod 4 only, so information has to travel through four
  layers before it reaches the same quadrant again (no co-adaptation of consecutive layers);
* embeddings, `halves`: first half / second half of the (standardised) vector, alternating;
* embeddings, `random`: a fixed, seeded random half per layer (a random permutation, split in two).

s/t networks are bottlenecked (the paper's remedy against learning local pixel correlations):
hidden `width`, then a narrow `bottleneck` layer, then `width` again.

Scores are negative log-likelihoods in bits per dimension (higher = more OOD). Pixels are in [0, 1]
and use RealNVP's preprocessing: quantise to 256 levels, dequantise with uniform noise (the
bin centre at evaluation, so scores are deterministic), then the logit transform
y = logit(alpha + (1 - 2 alpha) x) with its log-determinant, so the NLL is a proper discrete
bits/dim over 256 grey levels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PIXEL_MASKS = ("checkerboard", "horizontal", "cyclic")
FEATURE_MASKS = ("halves", "random")
LOG2 = math.log(2.0)


# ------------------------------------------------------------------ masks


def pixel_masks(kind: str, n_layers: int, shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cond, trans) masks of shape (C, H, W) for each coupling layer."""
    c, h, w = shape
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = []
    for k in range(n_layers):
        if kind == "checkerboard":
            cond = (ii + jj) % 2 == k % 2
            trans = ~cond
        elif kind == "horizontal":
            top = ii < h // 2
            cond = top if k % 2 == 0 else ~top
            trans = ~cond
        elif kind == "cyclic":
            quads = [
                (ii < h // 2) & (jj < w // 2),
                (ii < h // 2) & (jj >= w // 2),
                (ii >= h // 2) & (jj >= w // 2),
                (ii >= h // 2) & (jj < w // 2),
            ]  # TL, TR, BR, BL: a cycle
            cond, trans = quads[k % 4], quads[(k + 1) % 4]
        else:
            raise ValueError(f"unknown pixel mask {kind!r}; choose from {', '.join(PIXEL_MASKS)}")
        out.append((cond.float().expand(c, h, w).clone(), trans.float().expand(c, h, w).clone()))
    return out


def feature_masks(kind: str, n_layers: int, dim: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cond, trans) masks of shape (D,) for each coupling layer."""
    if dim < 2:
        raise ValueError("a coupling flow needs at least 2 dimensions")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_layers):
        if kind == "halves":
            first = torch.arange(dim) < dim // 2
            cond = first if k % 2 == 0 else ~first
        elif kind == "random":
            perm = torch.randperm(dim, generator=gen)
            cond = torch.zeros(dim, dtype=torch.bool)
            cond[perm[: dim // 2]] = True
        else:
            raise ValueError(f"unknown embedding mask {kind!r}; choose from {', '.join(FEATURE_MASKS)}")
        out.append((cond.float(), (~cond).float()))
    return out


# ------------------------------------------------------------------ s/t networks


def conv_st_net(channels: int, width: int, bottleneck: int | None) -> nn.Module:
    """Conv s/t network: input = masked image + the mask, output = raw scale and shift per channel."""
    mid = bottleneck or width
    net = nn.Sequential(
        nn.Conv2d(channels + 1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, mid, 1),
        nn.ReLU(),  # the bottleneck
        nn.Conv2d(mid, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * channels, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def mlp_st_net(dim: int, width: int, bottleneck: int | None) -> nn.Module:
    mid = bottleneck or width
    net = nn.Sequential(
        nn.Linear(dim, width),
        nn.ReLU(),
        nn.Linear(width, mid),
        nn.ReLU(),
        nn.Linear(mid, width),
        nn.ReLU(),
        nn.Linear(width, 2 * dim),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


# ------------------------------------------------------------------ coupling and flow


class AffineCoupling(nn.Module):
    """An affine coupling layer with a bounded log-scale; exact inverse and log-determinant."""

    def __init__(self, cond: torch.Tensor, trans: torch.Tensor, net: nn.Module, image: bool, scale_init: float = 2.0):
        super().__init__()
        if torch.any((cond > 0) & (trans > 0)):
            raise ValueError("cond and trans masks must be disjoint")
        self.register_buffer("cond", cond)
        self.register_buffer("trans", trans)
        self.net = net
        self.image = image
        self.scale = nn.Parameter(torch.full(tuple(cond.shape), float(scale_init)))  # bound of |s|, per dimension

    def _st(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = x * self.cond
        if self.image:
            inp = torch.cat([xc, self.cond.expand(x.shape[0], 1, *self.cond.shape[1:])], dim=1)
            raw, t = self.net(inp).chunk(2, dim=1)
        else:
            raw, t = self.net(xc).chunk(2, dim=1)
        s = self.scale * torch.tanh(raw)
        return s * self.trans, t * self.trans

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._st(x)
        y = x * (1 - self.trans) + self.trans * (x * torch.exp(s) + t)
        return y, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._st(y)  # cond dimensions are unchanged by forward, so s, t are recovered exactly
        return y * (1 - self.trans) + self.trans * ((y - t) * torch.exp(-s))


class ElementwiseAffine(nn.Module):
    """z = (y + bias) * exp(log_scale) per dimension, initialised from data (an ActNorm per pixel).

    The pixel flow starts with it: in logit space the always-background pixels of a digit sit in
    one narrow dequantisation bin, and standardising each pixel up front gives the couplings a
    well-scaled input from the first step (training converges in a few epochs instead of dozens).
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    @torch.no_grad()
    def init_from(self, y: torch.Tensor, min_std: float = 1e-3) -> None:
        self.bias.copy_(-y.mean(0))
        self.log_scale.copy_(-torch.log(y.std(0).clamp(min=min_std)))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (y + self.bias) * torch.exp(self.log_scale)
        return z, self.log_scale.sum().expand(y.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.exp(-self.log_scale) - self.bias


class CouplingFlow(nn.Module):
    """A stack of affine couplings with a standard normal base: log p(x) = log N(f(x)) + log|det df/dx|."""

    def __init__(self, layers: list[AffineCoupling]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self(x)
        d = z[0].numel()
        return -0.5 * (z.flatten(1) ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi) + logdet


def pixel_flow(
    mask: str,
    n_layers: int = 8,
    width: int = 16,
    bottleneck: int | None = 8,
    shape: tuple[int, int, int] = (1, 32, 32),
    input_norm: bool = True,
) -> CouplingFlow:
    """RealNVP on one scale (no squeeze: the masks are spatial), optionally starting with a per-pixel affine."""
    layers = [
        AffineCoupling(c, t, conv_st_net(shape[0], width, bottleneck), image=True)
        for c, t in pixel_masks(mask, n_layers, shape)
    ]
    return CouplingFlow(([ElementwiseAffine(shape)] if input_norm else []) + layers)


def feature_flow(
    mask: str, dim: int, n_layers: int = 6, width: int = 128, bottleneck: int | None = 32, seed: int = 0
) -> CouplingFlow:
    layers = [
        AffineCoupling(c, t, mlp_st_net(dim, width, bottleneck), image=False)
        for c, t in feature_masks(mask, n_layers, dim, seed)
    ]
    return CouplingFlow(layers)


# ------------------------------------------------------------------ density models with their preprocessing


def logit_transform(x: torch.Tensor, alpha: float | torch.Tensor = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """RealNVP's y = logit(alpha + (1 - 2 alpha) x) for x in (0, 1), and log|dy/dx| summed per sample."""
    alpha = torch.as_tensor(alpha, dtype=x.dtype)
    p = alpha + (1 - 2 * alpha) * x
    y = torch.log(p) - torch.log1p(-p)
    return y, (torch.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)


class PixelDensity(nn.Module):
    """RealNVP on [0, 1] pixels: 256-level dequantisation, logit transform, coupling flow."""

    def __init__(self, flow: CouplingFlow, alpha: float = 0.05):
        super().__init__()
        self.flow = flow
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> None:
        """Data-dependent init of a leading ElementwiseAffine from (dequantised, logit) fit pixels."""
        first = self.flow.layers[0] if len(self.flow.layers) else None
        if isinstance(first, ElementwiseAffine):
            first.init_from(self.preprocess(x, noise)[0])

    def preprocess(self, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> (logit-space y, log|dy/dx_deq| per sample) with x_deq = (q + u) / 256."""
        q = torch.clamp(torch.round(x * 255.0), 0, 255)
        u = torch.full_like(q, 0.5) if noise is None else noise
        return logit_transform((q + u) / 256.0, self.alpha)

    def nll_bpd(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Discrete NLL in bits/dim over 256 grey levels (noise=None: the bin centre, deterministic)."""
        y, ld = self.preprocess(x, noise)
        log_px = self.flow.log_prob(y) + ld  # density of x_deq on [0, 1]^D
        d = x[0].numel()
        return (-log_px + d * math.log(256.0)) / (d * LOG2)


class FeatureDensity(nn.Module):
    """RealNVP on penultimate features, standardised on the fit split and optionally PCA-reduced."""

    def __init__(self, flow: CouplingFlow, mean: torch.Tensor, std: torch.Tensor, components: torch.Tensor | None):
        super().__init__()
        self.flow = flow
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        # components: (N, D) rows of a PCA basis on standardised fit features, scaled to unit variance
        self.register_buffer("components", components.float() if components is not None else torch.zeros(0))

    @staticmethod
    def fit_transform(fit: torch.Tensor, pca: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Standardisation (and whitened PCA) fitted on the fit split only."""
        mean = fit.mean(0)
        std = fit.std(0)
        floor = max(float(std.median()) * 1e-3, 1e-6)
        std = torch.clamp(std, min=floor)
        if not pca:
            return mean, std, None
        z = ((fit - mean) / std).double()
        if pca >= z.shape[1]:
            raise ValueError(f"--pca {pca} must be below the feature dimension {z.shape[1]}")
        _, sv, vt = torch.linalg.svd(z - z.mean(0), full_matrices=False)
        sd = (sv[:pca] / math.sqrt(max(len(z) - 1, 1))).clamp(min=1e-6)
        return mean, std, (vt[:pca] / sd[:, None]).float()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        if self.components.numel():
            z = z @ self.components.T
        return z

    def nll_bpd(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous NLL of the transformed features in bits/dim (the fixed linear map's constant omitted)."""
        z = self.transform(x)
        return -self.flow.log_prob(z) / (z.shape[1] * LOG2)
