"""ODIN's perturbation: direction, std scaling, and the fast grid equal to the textbook loop."""

import numpy as np
import torch

from oodcore.extraction.odin import (
    gradient_sign,
    odin_grid_batch,
    odin_naive_point,
    perturb,
)

STD = (0.5, 0.25, 1.0)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 5),
        )
        .eval()
        .requires_grad_(False)
        .double()
    )


def test_perturbation_raises_tempered_softmax_of_predicted_class():
    model = tiny_model()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    for t in (1.0, 1000.0):
        sign, logits = gradient_sign(model, x, t)
        pred = logits.argmax(1)
        before = torch.softmax(logits / t, 1).gather(1, pred[:, None])
        after = torch.softmax(model(perturb(x, sign, 1e-3, STD)) / t, 1).gather(1, pred[:, None])
        assert torch.all(after > before), t


def test_eps_is_divided_by_channel_std():
    model = tiny_model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sign, _ = gradient_sign(model, x, 10.0)
    step = (perturb(x, sign, 0.002, STD) - x).abs()
    for c, s in enumerate(STD):
        nonzero = step[:, c][sign[:, c] != 0]
        assert torch.allclose(nonzero, torch.full_like(nonzero, 0.002 / s))


def test_direction_against_nll_gradient():
    """x~ = x - eps * sign(-grad log S_yhat): check the sign against autograd directly."""
    model = tiny_model(1)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    log_s = torch.log_softmax(logits / 5.0, 1).gather(1, logits.argmax(1)[:, None]).sum()
    (grad_log_s,) = torch.autograd.grad(log_s, x)
    sign, _ = gradient_sign(model, x.detach(), 5.0)
    assert torch.equal(sign, (-grad_log_s).sign())


def test_grid_matches_naive_loop_at_every_point():
    model = tiny_model(2)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    temps, eps = (1.0, 10.0, 1000.0), (0.0, 0.0005, 0.002, 0.005)
    grid = odin_grid_batch(model, x, temps, eps, STD)
    assert grid.shape == (5, 3, 4)
    for i, t in enumerate(temps):
        for j, e in enumerate(eps):
            np.testing.assert_allclose(grid[:, i, j], odin_naive_point(model, x, t, e, STD), rtol=1e-9, atol=1e-12)
    # batching the eps forwards in small groups gives the same numbers
    np.testing.assert_allclose(odin_grid_batch(model, x, temps, eps, STD, max_batch=5), grid, rtol=1e-12)


def test_grid_eps0_equals_tempered_msp():
    model = tiny_model(3)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grid = odin_grid_batch(model, x, (1000.0,), (0.0,), STD)
    expected = -torch.softmax(model(x) / 1000.0, 1).max(1).values.numpy()
    np.testing.assert_allclose(grid[:, 0, 0], expected, rtol=1e-12)
