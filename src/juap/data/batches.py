"""Batches for attacks and evaluation: one pass or an endless stream over a tensor or a loader.

Neutral ground between :mod:`juap.attacks` and :mod:`juap.evaluation`, so that neither imports the other.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional, Tuple

import torch

from ..errors import ConfigError


def iter_batches(
    data, *, batch_size: int, device: torch.device, shuffle_seed: Optional[int] = None
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """One pass over ``data`` as ``(x, y)`` on ``device``; ``y`` is None for a bare image tensor.

    ``data`` is a tensor of images (N, 3, H, W) or an iterable of batches ``(x, y, ...)``/``x``;
    empty batches (every image unreadable) are skipped.
    """
    if isinstance(data, torch.Tensor):
        check_images(data)
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
        check_images(x)
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
    """The first non-empty batch of ``data`` as images (N, 3, H, W) on ``device``."""
    for x, _ in iter_batches(data, batch_size=1, device=device):
        return x
    raise ConfigError("the data is empty: no images")


def check_images(x: torch.Tensor) -> None:
    """Raise a ConfigError unless ``x`` is a batch of RGB images (N, 3, H, W) in [0, 1]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ConfigError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.is_floating_point() and x.numel() and (x.min() < 0 or x.max() > 1):
        raise ConfigError(
            "images must be in [0, 1] (juap normalises inside the classifier); got values "
            f"in [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )
