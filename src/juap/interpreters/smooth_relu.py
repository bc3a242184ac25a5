"""Smoothed ReLU, eq 15, and the attack's surrogate classifier that uses it.

ReLU's second derivative is zero, so the input-gradient of a loss on a Grad-CAM map gets nothing
through the channel weights ``alpha`` (eq 11) below the CAM layer. Eq 15 keeps ReLU's value and
replaces its derivative by::

    a(s) = 1(s < 0) * (1 + s / sqrt(s^2 + tau)) + 1(s >= 0) * s / sqrt(s^2 + tau)

i.e. the derivative of ``s + sqrt(s^2 + tau)`` for s < 0 and of ``sqrt(s^2 + tau)`` for s >= 0 (the
smoothing of ADV^2, Zhang et al. 2020). a(s) -> 0 for s << 0 and -> 1 for s >> 0; it is
discontinuous at 0 (a(0^-) = 1, a(0) = 0, as written in the paper), and its derivative
``tau / (s^2 + tau)^(3/2)`` is positive everywhere, which gives the non-zero second derivatives.

The surrogate is for the attack's gradients only: every reported metric uses the unmodified classifier
(the surrogate is not the judge; docs/decisions.md).
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..classifiers.base import Classifier
from ..errors import ConfigError

DEFAULT_TAU = 1e-4
# Piecewise-linear activations that eq 15 does not cover (their second derivative is zero as well).
_UNCOVERED = (nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.RReLU)


def relu_derivative(s: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Eq 15: a(s), the smoothed derivative of ReLU; differentiable (d a / d s = tau / (s^2 + tau)^(3/2))."""
    r = s * torch.rsqrt(s * s + tau)
    return torch.where(s < 0, 1 + r, r)


class _SmoothReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(s)
        ctx.tau = tau
        return s.clamp_min(0)  # ATen's relu is clamp_min(0): bit-identical values

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (s,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, so double backward works
            return grad * relu_derivative(s, ctx.tau), None
        a = s.square().add_(ctx.tau).rsqrt_().mul_(s)  # same a(s), in place (faster): no graph to keep
        return a.add_(s.lt(0)).mul_(grad), None


def smooth_relu(s: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """ReLU's value with eq 15's derivative a(s) and a non-zero second derivative.

    Args:
        s: any tensor (the input of the ReLU).
        tau: the smoothing constant of eq 15.

    Returns:
        ``relu(s)``, same shape; its backward multiplies by ``a(s)``.
    """
    return _SmoothReLUFunction.apply(s, tau)


class SmoothReLU(nn.Module):
    """Drop-in for ``nn.ReLU`` (eq 15). Never in place: the backward needs the negative inputs.

    Args:
        tau: the smoothing constant of eq 15.
    """

    def __init__(self, *, tau: float = DEFAULT_TAU) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return smooth_relu(s, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


_RELU_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})


class SmoothReLUMode(TorchFunctionMode):
    """While active, ``F.relu``, ``torch.relu(_)`` and ``Tensor.relu(_)`` compute :func:`smooth_relu`.

    This smooths functional ReLUs inside ``forward`` methods (torchvision DenseNet, our
    ``DenseNetClassifier.features``). In-place variants return a new tensor instead (every forward in
    torchvision and timm uses the returned value). Torch function modes are thread-local, so another
    thread running the original classifier at the same time is not affected. ReLUs written another way
    (``clamp(min=0)``, ``torch.maximum``) are not seen.

    Args:
        tau: the smoothing constant of eq 15.
    """

    def __init__(self, *, tau: float = DEFAULT_TAU) -> None:
        super().__init__()
        self.tau = tau

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCTIONS:
            return smooth_relu(args[0], self.tau)
        return func(*args, **(kwargs or {}))


class _SmoothReLUFeatures:
    """Mixin of surrogate classifiers: their feature extractor runs under :class:`SmoothReLUMode`."""

    smooth_relu_tau: float = DEFAULT_TAU

    def features(self, z: torch.Tensor) -> torch.Tensor:
        with SmoothReLUMode(tau=self.smooth_relu_tau):
            return super().features(z)


@functools.cache
def _surrogate_class(cls: type) -> type:
    if issubclass(cls, _SmoothReLUFeatures):
        return cls
    return type(f"Smooth{cls.__name__}", (_SmoothReLUFeatures, cls), {"__module__": __name__})


def replace_relus(module: nn.Module, *, tau: float = DEFAULT_TAU) -> int:
    """Replace, in place, every ``nn.ReLU`` inside ``module`` by a :class:`SmoothReLU`.

    Every reference is replaced, including a ReLU module shared by several attributes.

    Returns:
        The number of references replaced.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, nn.ReLU):
                parent._modules[name] = SmoothReLU(tau=tau)
                replaced += 1
    return replaced


def count_relus(module: nn.Module) -> int:
    """Number of distinct ``nn.ReLU`` modules in ``module`` (0 in a surrogate)."""
    return sum(1 for m in module.modules() if isinstance(m, nn.ReLU))


def make_surrogate(
    classifier: Classifier, *, tau: float = DEFAULT_TAU, requires_grad: bool = False
) -> Classifier:
    """A deep copy of ``classifier`` whose ReLUs have eq 15's derivative, for the attack's gradients.

    Every ``nn.ReLU`` module (in-place or shared ones too) becomes a :class:`SmoothReLU`, and
    ``features`` runs under :class:`SmoothReLUMode` so functional ReLUs (DenseNet's ``F.relu``) are
    smoothed too (thread-locally: another thread may run the original classifier meanwhile). The logits
    are unchanged; first derivatives change slightly (a(s) instead of the step) and second derivatives
    become non-zero. The original classifier is not modified. Only ``features`` (hence ``forward`` and
    ``forward_features``) runs under the mode: calling ``surrogate.model`` directly smooths the ReLU
    modules but not functional ReLUs.

    Args:
        classifier: the classifier to copy (its train/eval mode is kept).
        tau: the smoothing constant of eq 15 (> 0).
        requires_grad: whether the copied parameters require grad; attacks only need gradients w.r.t.
            the input, so by default they do not.

    Returns:
        A :class:`~juap.classifiers.Classifier` of class ``Smooth<ClassName>`` (a subclass of the original's).

    Warns:
        UserWarning: when other piecewise-linear activations (ReLU6, LeakyReLU, ...) remain unchanged.
    """
    if not isinstance(classifier, Classifier):
        raise ConfigError(f"make_surrogate needs a juap Classifier, got {type(classifier).__name__}")
    if not tau > 0:
        raise ConfigError(f"the smoothed ReLU's tau must be > 0 (eq 15 uses 1e-4), got {tau!r}")
    surrogate = copy.deepcopy(classifier)
    replace_relus(surrogate, tau=tau)
    surrogate.__class__ = _surrogate_class(type(classifier))
    surrogate.smooth_relu_tau = float(tau)
    surrogate.requires_grad_(requires_grad)
    uncovered = sorted({type(m).__name__ for m in surrogate.modules() if isinstance(m, _UNCOVERED)})
    if uncovered:
        warnings.warn(
            f"make_surrogate smooths ReLU only (eq 15); {', '.join(uncovered)} in {classifier.arch!r} "
            "keep a zero second derivative",
            stacklevel=2,
        )
    return surrogate
