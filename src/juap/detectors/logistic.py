"""Logistic regression on standardised features, fitted with L-BFGS: the one fit every linear detector uses.

:func:`fit_logistic` is shared by ``juap detect``'s :class:`LogisticDetector` (on fixed features) and by the
differentiable linear detectors (:mod:`juap.detectors.linear`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._validate import check_range
from ..errors import ConfigError


def standardization(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (clamped to 1e-6; ones for a single row) of (N, F) features, in float64: (F,), (F,)."""
    x = torch.as_tensor(features, dtype=torch.float64)
    std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=torch.float64)
    return x.mean(0), std


def fit_logistic(
    z: torch.Tensor, labels: torch.Tensor, *, weight_decay: float, max_iter: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression, full batch with L-BFGS in float64 (deterministic), the two classes weighted
    equally whatever their counts, an L2 penalty ``weight_decay * ||w||^2`` on the weights (not the bias).

    Args:
        z: (N, F) standardised features.
        labels: (N,) in {0 (benign), 1 (adversarial)}.
        weight_decay: the L2 penalty.
        max_iter: L-BFGS iterations.

    Returns:
        ``(weight (F,), bias ())`` in float64; the logit is ``z @ weight + bias``.

    Raises:
        ConfigError: shapes that do not match, or one class only.
    """
    z = torch.as_tensor(z, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64).flatten()
    if z.dim() != 2 or len(z) != len(y):
        raise ConfigError(
            f"features (N, F) and labels (N,) must match, got {tuple(z.shape)}, {tuple(y.shape)}"
        )
    n_pos, n_neg = float(y.sum()), float((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigError("the detector needs benign and adversarial training examples, got one class only")
    sample_w = torch.where(y > 0.5, 0.5 / n_pos, 0.5 / n_neg)  # each class sums to 1/2
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = z @ w + b
        loss = (sample_w * F.binary_cross_entropy_with_logits(logit, y, reduction="none")).sum()
        loss = loss + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


class LogisticDetector:
    """Logistic regression on standardised fixed features (``juap detect``'s deployable detector).

    The standardisation (mean, std) comes from the training features only; the two classes are weighted
    equally whatever their counts (:func:`fit_logistic`).

    Args:
        weight_decay: L2 penalty on the weights (not the bias).
        max_iter: L-BFGS iterations.
    """

    def __init__(self, *, weight_decay: float = 1e-2, max_iter: int = 200) -> None:
        check_range("weight_decay", weight_decay, low=0)
        check_range("max_iter", max_iter, low=1)
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> LogisticDetector:
        """Fit on (N, F) features with labels (N,) in {0 (benign), 1 (adversarial)}."""
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(labels, dtype=torch.float64).flatten()
        if x.dim() != 2 or len(x) != len(y):
            raise ConfigError(
                f"features (N, F) and labels (N,) must match, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if float(y.sum()) == 0 or float((1 - y).sum()) == 0:
            raise ConfigError(
                "the detector needs benign and adversarial training examples, got one class only"
            )
        self.mean, self.std = standardization(x)
        z = (x - self.mean) / self.std
        self.weight, self.bias = fit_logistic(z, y, weight_decay=self.weight_decay, max_iter=self.max_iter)
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N,): higher means more likely adversarial."""
        if self.weight is None:
            raise ConfigError("the detector is not fitted yet: call fit(features, labels) first")
        z = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.std
        return z @ self.weight + self.bias
