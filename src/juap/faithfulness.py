"""Does a map still explain the decision? Deletion and insertion curves (Petsiuk et al. 2018, RISE).

L1 and IoU say whether two maps agree, not whether a map explains what the classifier does. The
deletion curve removes the pixels in the map's order (most salient first) and follows the softmax
probability of the class the map explains: a faithful map makes it fall fast (a low area under the
curve). The insertion curve starts from the baseline and puts the pixels back in the same order: a
faithful map makes it rise fast (a high area). SPEC section 6: the baseline is a blurred copy of the
image (Petsiuk et al.'s choice for insertion; here for both, so one baseline serves both curves).

Definitions (one image ``x`` (3, H, W), its map ``m`` (h, w), the class ``c`` it explains):

* ``m`` is resized to (H, W) (bilinear) and its pixels ranked, most salient first (ties: lower index
  first); step ``t = 0..S`` replaces the first ``round(t H W / S)`` of them (all channels).
* deletion image ``t``: those pixels from the baseline, the rest from ``x``; insertion image ``t``: those
  pixels from ``x``, the rest from the baseline.
* the curve is ``softmax(f(image_t))[c]`` for ``t = 0..S``; its area is the trapezoid rule over the
  fraction ``t / S`` in [0, 1] (``numpy.trapezoid(curve, dx=1/S)``).

Cost: ``2 (S + 1)`` forward passes per image and map (``S = 16`` by default: 34), batched.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

BASELINES = ("blur", "black", "mean")


def blurred(x: torch.Tensor, sigma: Optional[float] = None) -> torch.Tensor:
    """The deletion / insertion baseline: ``x`` (N, 3, H, W) under a Gaussian blur of ``sigma`` pixels
    (default: 5 per 224 of the shorter side, Petsiuk et al.'s kernel, at least 1), kernel ``4 sigma + 1``."""
    side = min(x.shape[-2:])
    sigma = float(sigma) if sigma is not None else max(1.0, 5.0 * side / 224)
    k = int(4 * sigma) | 1  # odd
    k = min(k, (side - 1) | 1 if side > 1 else 1)  # torchvision needs a kernel no larger than the image
    from torchvision.transforms.functional import gaussian_blur  # here: importing torchvision costs seconds

    return gaussian_blur(x, [k, k], [sigma, sigma])


def _baseline(x: torch.Tensor, baseline) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "blur":
        return blurred(x)
    if baseline == "black":
        return torch.zeros_like(x)
    if baseline == "mean":  # each image's own mean colour
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    raise ConfigError(
        f"unknown faithfulness baseline {baseline!r}; known: {', '.join(BASELINES)} or a tensor"
    )


@torch.no_grad()
def deletion_insertion(
    classifier: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    steps: int = 16,
    baseline="blur",
    batch_size: int = 256,
    curves: Sequence[str] = ("deletion", "insertion"),
) -> Dict[str, torch.Tensor]:
    """Deletion and insertion curves and their areas, per image (see the module's text).

    Args:
        classifier: images in [0, 1] -> logits (N, C).
        x: images (N, 3, H, W) in [0, 1].
        maps: (N, h, w), any real values, larger = more salient (raw or normalised: only the order counts).
        classes: (N,) the class each map explains.
        steps: S, the number of steps between the whole image and the whole baseline (>= 1).
        baseline: ``"blur"`` (default), ``"black"``, ``"mean"`` or a tensor broadcastable to ``x``.
        batch_size: images per forward pass.
        curves: which curves to compute (both by default; each costs ``S + 1`` forward passes per image).

    Returns:
        ``{"deletion", "insertion"}``: areas (N,) in [0, 1]; ``{"deletion_curve", "insertion_curve"}``:
        (N, S + 1) probabilities (those of ``curves``).
    """
    if not curves or set(curves) - {"deletion", "insertion"}:
        raise ConfigError(f"curves must name 'deletion' and/or 'insertion', got {curves!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"faithfulness steps must be an integer >= 1, got {steps!r}")
    if maps.dim() != 3 or len(maps) != len(x) or len(classes) != len(x):
        raise ConfigError(
            f"deletion_insertion needs maps (N, h, w) and classes (N,) for images (N, 3, H, W); got maps "
            f"{tuple(maps.shape)}, classes {tuple(classes.shape)}, images {tuple(x.shape)}"
        )
    n, _, h, w = x.shape
    base = _baseline(x, baseline)
    scores = F.interpolate(maps[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    order = scores.flatten(1).argsort(dim=1, descending=True, stable=True)  # (N, H W), most salient first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1))
    counts = torch.round(torch.arange(steps + 1, device=x.device) * (h * w) / steps)  # pixels swapped at t
    classes = classes.to(x.device).long()
    made = {}
    for kind in curves:
        probs = torch.empty(n, steps + 1, device=x.device)
        flat = [(i, t) for i in range(n) for t in range(steps + 1)]  # every (image, step), batched
        for s in range(0, len(flat), batch_size):
            idx = torch.tensor(flat[s : s + batch_size], device=x.device)
            img, t = idx[:, 0], idx[:, 1]
            swapped = (rank[img] < counts[t][:, None]).view(-1, 1, h, w)  # (B, 1, H, W)
            first, second = (base, x) if kind == "deletion" else (x, base)
            batch = torch.where(swapped, first[img], second[img])
            p = classifier(batch).softmax(dim=1).gather(1, classes[img][:, None]).squeeze(1)
            probs[img, t] = p.float()
        made[kind] = probs
    out = {k: torch.trapezoid(v, dx=1.0 / steps, dim=1) for k, v in made.items()}
    out.update({f"{k}_curve": v for k, v in made.items()})
    return out
