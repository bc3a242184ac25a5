"""Differentiable statistics the detectors look at: of a map, of a prediction, of the CAM layer.

Torch only, no ``detach``: an attacker differentiates a detector's score through them. The map and
confidence statistics are those ``juap detect`` has always used (:func:`juap.detection.map_features`
calls these on detached maps); square roots are guarded so that a constant map has finite gradients.
"""

from __future__ import annotations

import math

import torch

from ..metrics import normalize_maps

MAP_FEATURES = (
    "entropy",
    "top10_mass",
    "top30_mass",
    "mean",
    "std",
    "spread",
    "center_distance",
    "total_variation",
    "log_scale",
)

CONF_FEATURES = ("max_prob", "logit_margin", "pred_entropy")


def safe_sqrt(u: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(u, 0))`` whose gradient is finite everywhere (0 where ``u <= 0``)."""
    return torch.where(u > 0, u.clamp_min(1e-30).sqrt(), torch.zeros_like(u))


def safe_std(flat: torch.Tensor) -> torch.Tensor:
    """``flat.std(1)`` (N,) of (N, P) values, exactly, with a finite gradient (0) for a constant row."""
    const = flat.amax(1) == flat.amin(1)  # (N,)
    ramp = torch.arange(flat.shape[1], dtype=flat.dtype, device=flat.device)
    s = torch.where(const[:, None], flat + ramp, flat).std(1)  # a constant row: the std of a ramp instead
    return torch.where(const, torch.zeros_like(s), s)


def map_statistics(maps: torch.Tensor) -> torch.Tensor:
    """The statistics of :data:`MAP_FEATURES` of each raw map, differentiably.

    The map is min-max normalised and read as a distribution over its pixels: its entropy (divided by
    that of a uniform map), the mass of its top 10% and 30% pixels, mean and std, spatial spread around
    its centre of mass, the distance of that centre from the image centre, total variation, and
    ``log1p`` of the raw map's range.

    Args:
        maps: raw maps (N, h, w) of the inputs' predicted classes.

    Returns:
        (N, 9) features in the order of :data:`MAP_FEATURES`.
    """
    n, h, w = maps.shape
    m = normalize_maps(maps)  # (N, h, w) in [0, 1]
    flat = m.flatten(1)  # (N, h*w)
    npix = flat.shape[1]
    total = flat.sum(1).clamp_min(1e-12)
    p = flat / total[:, None]  # the map as a distribution over pixels
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(max(npix, 2))
    desc = flat.sort(1, descending=True).values
    top = [desc[:, : max(1, round(npix * q))].sum(1) / total for q in (0.1, 0.3)]
    yy, xx = torch.meshgrid(
        (torch.arange(h, dtype=maps.dtype, device=maps.device) + 0.5) / h,
        (torch.arange(w, dtype=maps.dtype, device=maps.device) + 0.5) / w,
        indexing="ij",
    )
    yy, xx = yy.flatten(), xx.flatten()  # (h*w,) pixel centres in (0, 1)
    cy, cx = (p * yy).sum(1), (p * xx).sum(1)
    spread = safe_sqrt((p * ((yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2)).sum(1))
    center = safe_sqrt((cy - 0.5) ** 2 + (cx - 0.5) ** 2)
    tv = maps.new_zeros(n)
    if w > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).abs().flatten(1).mean(1)
    if h > 1:
        tv = tv + (m[:, 1:, :] - m[:, :-1, :]).abs().flatten(1).mean(1)
    raw = maps.flatten(1)
    scale = torch.log1p((raw.amax(1) - raw.amin(1)).clamp_min(0))
    std = safe_std(flat) if npix > 1 else maps.new_zeros(n)
    return torch.stack([entropy, *top, flat.mean(1), std, spread, center, tv, scale], 1)


def confidence_statistics(logits: torch.Tensor) -> torch.Tensor:
    """The statistics of :data:`CONF_FEATURES`: top probability, top-two logit margin, prediction entropy.

    Args:
        logits: (N, C) logits.

    Returns:
        (N, 3) features, differentiable in the logits.
    """
    prob = logits.softmax(1)
    two = logits.topk(min(2, logits.shape[1]), dim=1).values
    margin = two[:, 0] - two[:, -1]
    ent = -(prob * prob.clamp_min(1e-12).log()).sum(1)
    return torch.stack([prob.amax(1), margin, ent], 1)


def activation_statistics(feats: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial mean and max of a feature map (the statistics of the HyperNeuron-like detector).

    Args:
        feats: (N, K, h, w) activations, e.g. ``classifier.forward_features(x)``.

    Returns:
        (N, 2K): the K means, then the K maxima.
    """
    return torch.cat([feats.mean((2, 3)), feats.amax((2, 3))], 1)
