"""Interpretation-based detection for ``juap detect``: inspector scores, map features and a logistic detector
on fixed (detached) features.

The features and the logistic fit are those of the differentiable detectors (:mod:`juap.detectors`):
:func:`map_features` is :func:`~juap.detectors.features.map_statistics` (and the confidence statistics) on
detached maps, and :class:`LogisticDetector` lives in :mod:`juap.detectors.logistic`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .budget import apply_perturbation
from .detectors.features import (  # noqa: F401  (MAP_FEATURES, CONF_FEATURES: public names here too)
    CONF_FEATURES,
    MAP_FEATURES,
    confidence_statistics,
    map_statistics,
)
from .detectors.logistic import LogisticDetector  # noqa: F401  (juap detect's detector, public here too)
from .errors import ConfigError
from .metrics import IOU_KS, iou_topk, l1_distance

INSPECTORS = ("inspector L1", "inspector 1-IoU")


FEATURE_SETS = ("map", "map+conf")


# -- the reference inspector -------------------------------------------------------------------------
def inspector_scores(benign_maps: torch.Tensor, other_maps: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fig. 1's inspector: the discrepancy between the map of ``x`` and the map of the input at hand.

    Args:
        benign_maps: ``I(x)`` (N, h, w).
        other_maps: the maps of the inspected inputs (N, h, w), e.g. ``I(x_hat)``.

    Returns:
        ``{"inspector L1": (N,), "inspector 1-IoU": (N,)}``: eq 19's L1 and 1 - the mean top-k IoU of
        eq 20 (k in 10..50%), both higher for more different maps.
    """
    if benign_maps.shape != other_maps.shape:
        raise ConfigError(
            f"the two sets of maps must have the same shape, got {tuple(benign_maps.shape)} and "
            f"{tuple(other_maps.shape)}"
        )
    a, b = benign_maps.float(), other_maps.float()
    iou = torch.stack([iou_topk(a, b, k) for k in IOU_KS]).mean(0)
    return {"inspector L1": l1_distance(b, a), "inspector 1-IoU": 1 - iou}


# -- the deployable detector -------------------------------------------------------------------------
def map_features(maps: torch.Tensor, logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Statistics of each input's own map (and, with ``logits``, of its prediction's confidence), detached.

    Args:
        maps: raw maps (N, h, w) of the inputs' predicted classes.
        logits: the classifier's logits (N, C), or ``None`` for the map statistics alone.

    Returns:
        (N, F) features, in the order of :data:`MAP_FEATURES` (+ :data:`CONF_FEATURES` with logits).
    """
    if maps.dim() != 3:
        raise ConfigError(f"maps must have shape (N, h, w), got {tuple(maps.shape)}")
    feats = map_statistics(maps.detach().float())
    if logits is not None:
        feats = torch.cat([feats, confidence_statistics(logits.detach().float())], 1)
    return feats


# -- collecting maps and scoring ---------------------------------------------------------------------
def split_images(n: int, train_fraction: float, *, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of image indices 0..n-1 into disjoint (train, test) sets, both sorted and non-empty."""
    if n < 2:
        raise ConfigError(f"detection needs at least 2 images (one to train, one to test), got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = min(n - 1, max(1, int(round(train_fraction * n))))
    return order[:n_train].sort().values, order[n_train:].sort().values


def shuffled_controls(n_hat: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` copies of ``n_hat`` (3, H, W), each with its values permuted at random: same norms, no structure.

    Returns:
        (n, 3, H, W).
    """
    flat = n_hat.detach().flatten()
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(flat.numel(), generator=g) for _ in range(n)])
    return flat[perms].view(n, *n_hat.shape)


@torch.no_grad()
def explain_all(
    interpreter, x: torch.Tensor, perturbation: Optional[torch.Tensor] = None, *, batch_size: int = 64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and maps of the predicted classes for ``clamp(x + perturbation)`` (or ``x``), batched.

    Args:
        interpreter: a juap interpreter (``explain(x) -> (logits, maps)``).
        x: images (N, 3, H, W) in [0, 1].
        perturbation: ``None``, one perturbation (3, H, W) or one per image (N, 3, H, W).

    Returns:
        ``(logits (N, C), maps (N, h, w))`` on the CPU.
    """
    device = next(interpreter.classifier.parameters()).device
    logits, maps = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        if perturbation is not None:
            pb = perturbation if perturbation.dim() == 3 else perturbation[i : i + batch_size]
            xb = apply_perturbation(xb, pb.to(device))
        lg, mp = interpreter.explain(xb)
        logits.append(lg.detach().cpu())
        maps.append(mp.detach().float().cpu())
    return torch.cat(logits), torch.cat(maps)
