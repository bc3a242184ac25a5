"""Attack bases: hyperparameters in keyword-only constructor arguments, data per call (foolbox style).

A universal attack learns one perturbation from data: ``attack.fit(data) -> n_hat`` (3, H, W) in
[0, 1] pixel units, then ``attack.perturb(x)`` applies it. A per-image attack is called directly:
``attack(x, y) -> x_adv``. Budgets are given in the paper's 0-255 units (``eps``) and converted
once (SPEC §3); images are in [0, 1], and no attack knows about mean/std.
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..budget import apply_perturbation, check_budget, eps_to_unit
from ..classifiers.base import Classifier
from ..errors import ConfigError
from ..interpreters.base import Interpreter


class Attack:
    """Common state of every attack: the classifier under attack and the budget.

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` to fool (kept in eval mode, never modified).
        norm: ``"linf"`` or ``"l2"``.
        eps: the budget zeta in 0-255 pixel units (e.g. 10 for L_inf, 2000 for L_2 at 224x224).
        device: where to compute; default: the classifier's device.
    """

    name = "attack"
    universal = False

    def __init__(
        self,
        *,
        classifier: Classifier,
        norm: str = "linf",
        eps: float = 10.0,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if not isinstance(classifier, Classifier):
            raise ConfigError(
                f"{self.name} needs a juap Classifier (juap.create_classifier), "
                f"got {type(classifier).__name__}"
            )
        check_budget(norm, eps)
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.norm = norm
        self.eps = float(eps)
        self.device = torch.device(device) if device is not None else _module_device(classifier)

    @property
    def zeta(self) -> float:
        """The budget in [0, 1] pixel units."""
        return eps_to_unit(self.eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps:g})"


class UniversalAttack(Attack):
    """An attack that learns one image-agnostic perturbation (:meth:`fit`)."""

    universal = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.perturbation: Optional[torch.Tensor] = None
        self.history: list = []

    def fit(self, data, *, progress: bool = True) -> torch.Tensor:
        """Learn the perturbation from ``data`` (a loader of ``(x, y, ...)`` or an image tensor (N, 3, H, W)).

        Returns:
            The perturbation n_hat (3, H, W) in [0, 1] pixel units, within the budget.
        """
        raise NotImplementedError

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(x + n_hat, 0, 1)`` with the learned perturbation."""
        if self.perturbation is None:
            raise RuntimeError(f"{self.name}: call fit(data) before perturb(x)")
        return apply_perturbation(x, self.perturbation.to(x.device))


class PerImageAttack(Attack):
    """An attack that crafts one perturbation per image: ``attack(x, y) -> x_adv``."""

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


# -- data helpers ------------------------------------------------------------------------------------
def iter_batches(
    data, *, batch_size: int, device: torch.device, shuffle_seed: Optional[int] = None
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """One pass over ``data`` as ``(x, y)`` on ``device``; ``y`` is None for a bare image tensor.

    ``data`` is a tensor of images (N, 3, H, W) or an iterable of batches ``(x, y, ...)``/``x``;
    empty batches (every image unreadable) are skipped.
    """
    if isinstance(data, torch.Tensor):
        _check_images(data)
        n = len(data)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
            if shuffle_seed is not None
            else torch.arange(n)
        )
        for i in range(0, n, batch_size):
            yield data[order[i : i + batch_size]].to(device), None
        return
    for batch in data:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if x.numel() == 0:
            continue
        _check_images(x)
        nb = x.is_pinned()  # pinned batches (make_loader on a GPU machine) copy asynchronously
        yield x.to(device, non_blocking=nb), (y.to(device, non_blocking=nb) if y is not None else None)


def cycle_batches(data, *, batch_size: int, device: torch.device, seed: int = 0):
    """Endless batches for step-based training (reshuffled tensors each pass; loaders re-iterated)."""
    for epoch in itertools.count():
        seed_e = seed + epoch if isinstance(data, torch.Tensor) else None
        got = False
        for x, y in iter_batches(data, batch_size=batch_size, device=device, shuffle_seed=seed_e):
            got = True
            yield x, y
        if not got:
            raise ConfigError("the training data is empty: no images to learn a perturbation from")


def first_images(data, device: torch.device) -> torch.Tensor:
    for x, _ in iter_batches(data, batch_size=1, device=device):
        return x
    raise ConfigError("the data is empty: no images")


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ConfigError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.is_floating_point() and x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError(
            "images must be in [0, 1] (juap normalises inside the classifier); got values "
            f"in [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )


def rebind(interpreter: Interpreter, classifier: Classifier) -> Interpreter:
    """A shallow copy of ``interpreter`` that explains ``classifier`` (e.g. the smoothed surrogate)."""
    twin = copy.copy(interpreter)
    twin._modules = dict(interpreter._modules)
    twin._modules["classifier"] = classifier
    return twin


def _module_device(m: nn.Module) -> torch.device:
    p = next(iter(m.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
