"""Eq 6 scaling, projections and applying perturbations (juap.budget)."""
from __future__ import annotations

import math

import pytest
import torch

from juap.budget import (
    apply_perturbation,
    check_budget,
    eps_to_unit,
    l2_budget_for_size,
    perturbation_norm,
    project,
    scale_to_budget,
)
from juap.errors import ConfigError

BUDGETS = [("l2", 2000.0), ("l2", 50.0), ("linf", 10.0), ("linf", 2.0)]
RTOL = 1e-5


def _norm_unit(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Independent per-sample norm in [0, 1] units (float64)."""
    flat = t.detach().double().reshape(t.shape[0], -1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _mixed_batch(shape=(6, 3, 16, 16), seed=0) -> torch.Tensor:
    """Samples of very different scales: some far inside any budget, some far outside."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1e-6, 1e-3, 0.02, 0.3, 1.0, 50.0]).view(-1, 1, 1, 1)
    return torch.randn(shape, generator=gen) * scales[: shape[0]]


@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_scale_to_budget_bounds_every_sample(norm, eps):
    g = _mixed_batch()
    zeta = eps / 255
    out = scale_to_budget(g, norm=norm, eps=eps)
    before, after = _norm_unit(g, norm), _norm_unit(out, norm)
    assert out.shape == g.shape
    assert torch.all(after <= zeta * (1 + RTOL))
    inside = before <= zeta
    assert inside.any() and (~inside).any(), "the fixture must cover both cases"
    # inside the ball: unchanged (factor exactly 1); outside: on the sphere, norm == zeta
    assert torch.equal(out[inside], g[inside])
    torch.testing.assert_close(after[~inside], torch.full_like(after[~inside], zeta), rtol=RTOL, atol=0)
    # eq 6 only rescales: direction is kept
    cos = torch.nn.functional.cosine_similarity(out.flatten(1).double(), g.flatten(1).double(), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_scale_to_budget_single_perturbation_and_dtype():
    g = torch.randn(3, 8, 8, dtype=torch.float64) * 10
    out = scale_to_budget(g, norm="l2", eps=100)
    assert out.shape == (3, 8, 8) and out.dtype == torch.float64
    assert math.isclose(out.norm().item(), 100 / 255, rel_tol=1e-12)
    half = scale_to_budget(g.half(), norm="linf", eps=10)
    assert half.dtype == torch.float16
    assert half.abs().max().item() <= 10 / 255 * (1 + 1e-3)


def test_scale_to_budget_linf_is_not_a_clamp():
    """Eq 6 with p = inf rescales the whole sample (keeping its shape), unlike the PGD projection."""
    g = torch.tensor([[[[1.0, 0.5], [0.25, -2.0]]]])
    out = scale_to_budget(g, norm="linf", eps=51)  # zeta = 0.2, ||g||_inf = 2 -> factor 0.1
    torch.testing.assert_close(out, g * 0.1)
    assert not torch.allclose(out, project(g, norm="linf", eps=51))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_scale_to_budget_zero_input(norm):
    g = torch.zeros(2, 3, 4, 4, requires_grad=True)
    out = scale_to_budget(g, norm=norm, eps=10)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(g.grad).all()
    torch.testing.assert_close(g.grad, torch.ones_like(g.grad))  # factor 1 at 0: identity


def test_scale_to_budget_gradient_flows_through_the_norm():
    g = (torch.randn(2, 3, 8, 8, dtype=torch.float64) * 5).requires_grad_(True)
    w = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.autograd.gradcheck(lambda t: (scale_to_budget(t, norm="l2", eps=100) * w).sum(), (g,))
    # the gradient is not the plain constant factor: the norm contributes (eq 6 is differentiated)
    out = scale_to_budget(g, norm="l2", eps=100)
    (out * w).sum().backward()
    factor = (100 / 255) / g.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert not torch.allclose(g.grad, w * factor)
    assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0


def test_scale_to_budget_linf_gradient():
    g = (torch.randn(2, 3, 8, 8) * 5).requires_grad_(True)
    scale_to_budget(g, norm="linf", eps=10).pow(2).sum().backward()
    assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0


@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_project_holds_the_ball_and_is_idempotent(norm, eps):
    delta = _mixed_batch(seed=1)
    zeta = eps / 255
    once = project(delta, norm=norm, eps=eps)
    twice = project(once, norm=norm, eps=eps)
    assert torch.all(_norm_unit(once, norm) <= zeta * (1 + RTOL))
    torch.testing.assert_close(twice, once, rtol=RTOL, atol=1e-12)
    inside = _norm_unit(delta, norm) <= zeta
    assert torch.equal(once[inside], delta[inside])


def test_project_linf_clamps_entrywise():
    delta = torch.tensor([[[[0.5, -0.5], [0.01, -0.01]]]])
    out = project(delta, norm="linf", eps=25.5)  # zeta = 0.1
    torch.testing.assert_close(out, torch.tensor([[[[0.1, -0.1], [0.01, -0.01]]]]))


def test_project_l2_is_the_euclidean_projection():
    delta = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    zeta = 200 / 255
    out = project(delta, norm="l2", eps=200)
    expected = delta * (zeta / delta.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected)


def test_apply_perturbation_range_and_broadcast():
    x = torch.rand(5, 3, 8, 8)
    n = (torch.rand(3, 8, 8) - 0.5) * 4  # large on purpose: clamping must act
    out = apply_perturbation(x, n)
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out == 0).any() and (out == 1).any()
    torch.testing.assert_close(out, (x + n.unsqueeze(0)).clamp(0, 1))
    torch.testing.assert_close(apply_perturbation(x, n.unsqueeze(0)), out)
    per_image = torch.randn(5, 3, 8, 8) * 0.01
    torch.testing.assert_close(apply_perturbation(x, per_image), (x + per_image).clamp(0, 1))
    assert apply_perturbation(x[0], n).shape == (3, 8, 8)
    assert apply_perturbation(x.double(), n).dtype == torch.float64


def test_apply_perturbation_gradient():
    x = torch.full((2, 3, 4, 4), 0.5)
    n = torch.full((3, 4, 4), 0.01, requires_grad=True)
    apply_perturbation(x, n).sum().backward()
    torch.testing.assert_close(n.grad, torch.full_like(n.grad, 2.0))  # summed over the batch


@pytest.mark.parametrize(
    "x_shape,n_shape",
    [
        ((4, 3, 224, 224), (3, 64, 64)),
        ((4, 3, 8, 8), (2, 3, 8, 8)),
        ((4, 3, 8, 8), (1, 8, 8)),
        ((3, 8, 8), (8, 8)),
    ],
)
def test_apply_perturbation_shape_mismatch(x_shape, n_shape):
    with pytest.raises(ConfigError) as err:
        apply_perturbation(torch.rand(x_shape), torch.zeros(n_shape))
    msg = str(err.value)
    assert "x".join(map(str, n_shape)) in msg and "x".join(map(str, x_shape)) in msg


def test_apply_perturbation_mismatch_message_names_both_shapes():
    with pytest.raises(ValueError, match=r"3x64x64 does not fit images of shape 2x3x224x224"):
        apply_perturbation(torch.rand(2, 3, 224, 224), torch.zeros(3, 64, 64))


@pytest.mark.parametrize("eps", [0, -1, 0.0, float("nan"), float("inf"), -float("inf"), "ten", None, True])
def test_check_budget_rejects_bad_eps(eps):
    with pytest.raises(ConfigError, match="positive finite number in 0-255 pixel units"):
        check_budget("l2", eps)


@pytest.mark.parametrize("norm", ["l1", "Linf", "inf", "", None])
def test_check_budget_rejects_unknown_norm(norm):
    with pytest.raises(ConfigError, match="linf, l2"):
        check_budget(norm, 10)


def test_check_budget_linf_range():
    check_budget("linf", 10)
    check_budget("l2", 2000)
    with pytest.raises(ConfigError, match="at most 255"):
        check_budget("linf", 300)
    with pytest.warns(UserWarning, match="0-255 pixel units"):
        check_budget("linf", 0.03)


def test_scale_and_project_validate_the_budget():
    g = torch.randn(1, 3, 4, 4)
    with pytest.raises(ConfigError):
        scale_to_budget(g, norm="l3", eps=10)
    with pytest.raises(ConfigError):
        project(g, norm="l2", eps=float("nan"))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(C, H, W\)"):
        scale_to_budget(torch.randn(4, 4), norm="l2", eps=10)


def test_eps_to_unit():
    assert eps_to_unit(255) == 1.0
    assert eps_to_unit(10) == pytest.approx(10 / 255)


def test_l2_budget_for_size():
    assert l2_budget_for_size(2000, 224, 224) == pytest.approx(2000, rel=1e-12)
    assert l2_budget_for_size(2000, 64, 64) == pytest.approx(2000 * 64 / 224, rel=1e-12)
    assert l2_budget_for_size(2000, 224, 224, channels=1) == pytest.approx(2000 / math.sqrt(3), rel=1e-12)
    # the per-pixel RMS of a perturbation on the sphere is the same at both sizes
    rms_224 = eps_to_unit(2000) / math.sqrt(3 * 224 * 224)
    rms_32 = eps_to_unit(l2_budget_for_size(2000, 32, 32)) / math.sqrt(3 * 32 * 32)
    assert rms_32 == pytest.approx(rms_224, rel=1e-12)
    with pytest.raises(ConfigError, match="height"):
        l2_budget_for_size(2000, 0, 64)
    with pytest.raises(ConfigError):
        l2_budget_for_size(-5, 64, 64)


def test_perturbation_norm_in_pixel_units():
    n = torch.zeros(2, 3, 4, 4)
    n[0, 0, 0, 0] = 10 / 255
    n[1] = 1 / 255
    linf = perturbation_norm(n, "linf")
    l2 = perturbation_norm(n, "l2")
    assert linf.shape == (2,)
    torch.testing.assert_close(linf, torch.tensor([10.0, 1.0]))
    torch.testing.assert_close(l2, torch.tensor([10.0, math.sqrt(48)]))
    assert perturbation_norm(n[1], "l2").shape == ()
    assert perturbation_norm(torch.zeros(3, 4, 4), "l2").item() == 0.0
    with pytest.raises(ConfigError):
        perturbation_norm(n, "l1")


@pytest.mark.parametrize("norm,eps", BUDGETS)
def test_reported_norm_matches_budget_after_scaling(norm, eps):
    out = scale_to_budget(torch.randn(4, 3, 32, 32) * 3, norm=norm, eps=eps)
    torch.testing.assert_close(perturbation_norm(out, norm), torch.full((4,), float(eps)), rtol=RTOL, atol=0)
