"""Perturbation budgets: eq 6 scaling, projections for iterative attacks, and applying a perturbation.

Images are in [0, 1]; budgets ``eps`` are given in the paper's 0-255 pixel units (L2 2000 or
L_inf 10 at 224x224x3) and divided by 255 here, so zeta = eps / 255 is in [0, 1] pixel units.
Per-sample functions take a batch (N, C, H, W) or one perturbation (C, H, W).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ._validate import check_int
from .errors import ConfigError, NumericalError

BUDGET_NORMS = ("linf", "l2")
PIXEL_SCALE = 255.0
_D_224 = 3 * 224 * 224


def eps_to_unit(eps_255: float) -> float:
    """A budget in 0-255 pixel units -> [0, 1] pixel units (zeta of eq 6)."""
    return float(eps_255) / PIXEL_SCALE


def check_budget(norm: str, eps: float) -> None:
    """Validate a budget; raise :class:`ConfigError` with the allowed values otherwise.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: the budget in 0-255 pixel units, a positive finite number.
    """
    if norm not in BUDGET_NORMS:
        raise ConfigError(f"budget norm must be one of {', '.join(BUDGET_NORMS)}; got {norm!r}")
    value = float("nan")
    if not isinstance(eps, bool):
        try:
            value = float(eps)
        except (TypeError, ValueError):
            pass
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"budget eps must be a positive finite number in 0-255 pixel units, got {eps!r}")
    if norm == "linf" and value > PIXEL_SCALE:
        raise ConfigError(f"linf budget eps is in 0-255 pixel units and must be at most 255, got {eps!r}")
    if norm == "linf" and value < 1:
        warnings.warn(
            f"linf budget eps={eps!r} is below one grey level; eps is in 0-255 pixel units "
            f"(e.g. 10 or 8), not [0, 1] units",
            stacklevel=3,
        )


def _as_batch(t: torch.Tensor, what: str) -> torch.Tensor:
    """(N, C, H, W) stays, (C, H, W) -> (1, C, H, W)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    raise ValueError(f"{what} must have shape (N, C, H, W) or (C, H, W), got {tuple(t.shape)}")


def _norms(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample p-norm of (N, ...) -> (N,), in at least float32, with finite gradients at 0."""
    flat = t.reshape(t.shape[0], -1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    if norm == "linf":
        return flat.abs().amax(dim=1)
    squares = flat.pow(2).sum(dim=1)
    nonzero = squares > 0
    # the double `where` keeps d/dt finite (zero) at t == 0, where the plain 2-norm's gradient is 0/0
    return torch.where(nonzero, torch.where(nonzero, squares, 1.0).sqrt(), 0.0)


def _scale_into_ball(t: torch.Tensor, norm: str, zeta: float) -> torch.Tensor:
    """min(1, zeta / ||t||_p) * t per sample, for a batch (N, C, H, W)."""
    norms = _norms(t, norm).clamp_min(torch.finfo(torch.float32).tiny)  # (N,)
    factor = (zeta / norms).clamp(max=1.0)  # (N,)
    return t * factor.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))


def scale_to_budget(g: torch.Tensor, *, norm: str, eps: float) -> torch.Tensor:
    """Eq 6: n_hat = min(1, zeta / ||g||_p) * g per sample, zeta = eps / 255.

    Differentiable: gradients flow through the norm as in eq 6. A zero ``g`` stays zero with a finite
    gradient. dtype and device are kept. After scaling, ``||n_hat||_p <= zeta`` up to float rounding
    (relative 1e-6), with equality where ``g`` was outside the ball.

    Args:
        g: generator output, (N, C, H, W) or (C, H, W); the norm is over all of C, H, W of each sample.
        norm: ``"linf"`` (max |g|) or ``"l2"``.
        eps: budget in 0-255 pixel units (paper: L2 2000 or L_inf 10 at 224x224).

    Returns:
        The scaled perturbation, same shape as ``g``.
    """
    check_budget(norm, eps)
    return _scale_into_ball(_as_batch(g, "perturbation"), norm, eps_to_unit(eps)).reshape(g.shape)


def project(delta: torch.Tensor, *, norm: str, eps: float) -> torch.Tensor:
    """Project per sample onto the eps-ball, the step used by iterative attacks (PGD, UAP).

    ``"linf"`` clamps each entry to [-zeta, zeta]; ``"l2"`` rescales a sample outside the ball onto
    its surface (the Euclidean projection, identical to eq 6 for p = 2). Idempotent up to rounding.

    Args:
        delta: perturbation, (N, C, H, W) or (C, H, W).
        norm: ``"linf"`` or ``"l2"``.
        eps: budget in 0-255 pixel units.

    Returns:
        The projected perturbation, same shape, dtype and device as ``delta``.
    """
    check_budget(norm, eps)
    zeta = eps_to_unit(eps)
    if norm == "linf":
        return delta.clamp(-zeta, zeta)
    return _scale_into_ball(_as_batch(delta, "perturbation"), norm, zeta).reshape(delta.shape)


def apply_perturbation(x: torch.Tensor, n_hat: torch.Tensor) -> torch.Tensor:
    """x_hat = clamp(x + n_hat, 0, 1) (eq 6's x_hat, kept a valid image).

    Args:
        x: images in [0, 1], (N, C, H, W) or (C, H, W).
        n_hat: a universal perturbation (C, H, W) or (1, C, H, W), broadcast over the batch, or one
            perturbation per image with the shape of ``x``. Moved to ``x``'s device and dtype.

    Returns:
        Adversarial images, shape of ``x``, in [0, 1].

    Raises:
        ConfigError: when the perturbation does not fit the images (both shapes are named).
    """
    if not _fits(x, n_hat):
        raise ConfigError(
            f"perturbation of shape {_fmt(n_hat.shape)} does not fit images of shape {_fmt(x.shape)}; "
            "a perturbation must be (C, H, W), (1, C, H, W) or (N, C, H, W) with the images' C, H, W "
            "(generate it at the images' size or resize the images)"
        )
    return (x + n_hat.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0)


def _fits(x: torch.Tensor, n_hat: torch.Tensor) -> bool:
    if x.dim() == 3:
        return n_hat.shape == x.shape
    if x.dim() != 4:
        return False
    if n_hat.dim() == 3:
        return n_hat.shape == x.shape[1:]
    return n_hat.dim() == 4 and n_hat.shape[0] in (1, x.shape[0]) and n_hat.shape[1:] == x.shape[1:]


def _fmt(shape: torch.Size) -> str:
    return "x".join(str(s) for s in shape)


def l2_budget_for_size(eps_224: float, height: int, width: int, channels: int = 3) -> float:
    """Scale an L2 budget given for 224x224x3 to another size with the same per-pixel RMS.

    eps = eps_224 * sqrt(d / d_224), d = channels * height * width, d_224 = 3 * 224 * 224
    (e.g. 2000 at 224x224 -> 2000 * 64 / 224 = 571.4 at 64x64). Do not use it for L_inf budgets,
    which do not depend on the size.

    Args:
        eps_224: L2 budget at 224x224x3, in 0-255 pixel units.
        height, width, channels: the target size.

    Returns:
        The L2 budget for the target size, in 0-255 pixel units.
    """
    check_budget("l2", eps_224)
    for field, value in (("height", height), ("width", width), ("channels", channels)):
        check_int(field, value, low=1)
    return float(eps_224) * math.sqrt(channels * height * width / _D_224)


def perturbation_norm(n: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample size of a perturbation in 0-255 pixel units, for reports.

    Args:
        n: perturbation in [0, 1] pixel units, (N, C, H, W) or (C, H, W).
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        (N,) for a batch, a 0-dim tensor for one perturbation; float32 or wider, on ``n``'s device.
    """
    if norm not in BUDGET_NORMS:
        raise ConfigError(f"budget norm must be one of {', '.join(BUDGET_NORMS)}; got {norm!r}")
    norms = _norms(_as_batch(n, "perturbation"), norm) * PIXEL_SCALE
    return norms if n.dim() == 4 else norms[0]


BUDGET_RTOL, BUDGET_ATOL = 1e-4, 1e-3  # relative, and absolute in 0-255 units


def check_finite(n_hat: torch.Tensor, what: str = "the perturbation") -> None:
    """Refuse a perturbation holding NaN or infinite values: every figure measured with it is meaningless.

    Raises:
        NumericalError: naming how many values are NaN and how many infinite.
    """

    bad = ~torch.isfinite(n_hat)
    if bool(bad.any()):
        nan = int(torch.isnan(n_hat).sum())
        raise NumericalError(
            f"{what} holds {nan} NaN and {int(bad.sum()) - nan} infinite value(s) of {n_hat.numel()}: it "
            "cannot be evaluated (it may come from a run that diverged); make it again"
        )


def within_budget(measured: float, eps: float) -> bool:
    """Whether a measured norm (0-255 units) respects the budget ``eps``, up to float rounding."""
    return measured <= eps * (1 + BUDGET_RTOL) + BUDGET_ATOL


def quantize_8bit(n_hat: torch.Tensor, *, norm: Optional[str], eps: Optional[float]) -> torch.Tensor:
    """The perturbation as it can be applied to an 8-bit image: each value a whole number of 0-255 steps.

    Rounded to the nearest step; where that would take it over the budget (an L2 ball, a non-integer
    L_inf eps), every value is rounded toward zero instead, which never enlarges it in any norm. An image
    decoded from an 8-bit file (``k / 255``) plus this perturbation, clipped to [0, 1], is again exactly
    an 8-bit image.

    Args:
        n_hat: perturbation in [0, 1] pixel units, any shape.
        norm, eps: its budget (0-255 units); None: none known, nearest rounding throughout.

    Returns:
        The quantised perturbation, same shape, dtype and device, on the 1/255 grid.
    """
    steps = n_hat.double() * PIXEL_SCALE
    q = torch.round(steps)
    if norm is None or eps is None:
        return (q / PIXEL_SCALE).to(n_hat.dtype)
    if not within_budget(float(perturbation_norm(q / PIXEL_SCALE, norm).max()), eps):
        q = torch.trunc(steps)
    return (q / PIXEL_SCALE).to(n_hat.dtype)
