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


def _scores_at_image_size(
    fn: str, x: torch.Tensor, maps: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Check ``maps`` (N, h, w) and ``classes`` (N,) against images ``x`` (N, 3, H, W); the maps resized to
    (N, H, W) (bilinear), the order in which both metrics remove pixels."""
    if maps.dim() != 3 or len(maps) != len(x) or len(classes) != len(x):
        raise ConfigError(
            f"{fn} needs maps (N, h, w) and classes (N,) for images (N, 3, H, W); got maps "
            f"{tuple(maps.shape)}, classes {tuple(classes.shape)}, images {tuple(x.shape)}"
        )
    return F.interpolate(maps[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


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
    scores = _scores_at_image_size("deletion_insertion", x, maps, classes)
    n, _, h, w = x.shape
    base = _baseline(x, baseline)
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


# ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods"): the
# removed pixels are not replaced by a fixed baseline, whose sharp edges leak where the map pointed, but
# imputed from their neighbours. The weights are ROAD's: 1/6 for the 4 edge neighbours, 1/12 for the corners.
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
_NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def noisy_linear_impute(
    x: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float = 0.01,
    generator: Optional[torch.Generator] = None,
    tol: float = 1e-4,
    max_iter: Optional[int] = None,
) -> torch.Tensor:
    """ROAD's noisy linear imputation: every removed pixel becomes the weighted mean of its 8 neighbours
    (known or imputed themselves; weights renormalised at the border), all removed pixels solved jointly,
    plus Gaussian noise of standard deviation ``noise``.

    The system is symmetric positive definite wherever a removed region touches a kept pixel, so it is
    solved by conjugate gradients, batched over images and channels (no sparse matrix, any device).

    Args:
        x: images (N, C, H, W).
        removed: (N, H, W) bool, the pixels to impute; at least one pixel of each image must be kept.
        noise: standard deviation of the noise added to the imputed pixels (ROAD: 0.01).
        generator: the noise's random generator.
        tol: stop when every residual's norm is below ``tol`` times its right-hand side's.
        max_iter: default ``4 max(H, W) + 50``.
    """
    if removed.shape != (x.shape[0], *x.shape[-2:]):
        raise ConfigError(
            f"removed must be (N, H, W) = {(x.shape[0], *x.shape[-2:])}, got {tuple(removed.shape)}"
        )
    if bool(removed.flatten(1).all(dim=1).any()):
        raise ConfigError("noisy linear imputation needs at least one kept pixel per image")
    n, c, h, w = x.shape
    r = removed[:, None].to(x).expand(n, c, h, w).reshape(n * c, 1, h, w)  # 1 = unknown
    v = _solve(x.reshape(n * c, 1, h, w) * (1 - r), r, tol, max_iter)
    if noise:
        v = v + r * noise * torch.randn(v.shape, generator=generator).to(v)
    return v.reshape(n, c, h, w)


def _solve(known: torch.Tensor, r: torch.Tensor, tol: float, max_iter: Optional[int]) -> torch.Tensor:
    """The imputed images (M, 1, H, W): ``known`` (zero where ``r`` is 1) with the unknowns solved by
    conjugate gradients, started from the solution at half the resolution (a cascade: the coarse solve
    carries the smooth part that plain CG is slow to spread across a large hole)."""
    h, w = known.shape[-2:]
    kernel = _NEIGHBOURS.to(known)[None, None]

    def mix(t):  # sum over the neighbours, weighted, with zeros beyond the border
        return F.conv2d(t, kernel, padding=1)

    weight = mix(torch.ones_like(r))  # each pixel's sum of in-image neighbour weights

    def apply(v):  # the operator on the unknowns: weight * v - (neighbour mix of the unknowns)
        return r * (weight * v - mix(v * r))

    b = r * mix(known)
    v = torch.zeros_like(b)
    if min(h, w) >= 16:  # start from the coarse solution: a kept fraction per 2x2 block, its mean colour
        kept = F.avg_pool2d(1 - r, 2, ceil_mode=True)
        coarse_known = F.avg_pool2d(known, 2, ceil_mode=True) / kept.clamp_min(1e-12)
        coarse_r = (kept == 0).to(r)
        coarse = _solve(coarse_known * (1 - coarse_r), coarse_r, tol, max_iter)
        v = r * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    res = b - apply(v)
    p = res.clone()
    rs = (res * res).sum(dim=(1, 2, 3), keepdim=True)
    stop = (tol**2) * (b * b).sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
    for _ in range(max_iter or 4 * max(h, w) + 50):
        if bool((rs <= stop).all()):
            break
        ap = apply(p)
        alpha = rs / (p * ap).sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
        v = v + alpha * p
        res = res - alpha * ap
        rs_new = (res * res).sum(dim=(1, 2, 3), keepdim=True)
        p = res + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return known + r * v


@torch.no_grad()
def road(
    classifier: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    percentiles: Sequence[float] = ROAD_PERCENTILES,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 256,
) -> Dict[str, torch.Tensor]:
    """ROAD (Rong et al. 2022), per image: remove a share of the pixels in the map's order, impute them
    (:func:`noisy_linear_impute`) and read the softmax probability of the class the map explains.

    For each percentile ``p``, as pytorch-grad-cam's ``ROADMostRelevantFirst(p)`` /
    ``ROADLeastRelevantFirst(p)``: the map is resized to the image (bilinear) and its ``p``-th percentile
    ``q`` taken (linear interpolation); *most relevant first* (MoRF) keeps the pixels below ``q`` and
    imputes the rest, *least relevant first* (LeRF) keeps those of ``1 - map`` below that one's percentile.

    Returns:
        ``{"morf", "lerf"}``: the probability averaged over the percentiles (N,) (MoRF: lower = more
        faithful; LeRF: higher); ``"combined"``: ``(lerf - morf) / 2`` (pytorch-grad-cam's ROADCombined;
        higher = more faithful); ``{"morf_curve", "lerf_curve"}``: (N, len(percentiles)).
    """
    scores = _scores_at_image_size("road", x, maps, classes)
    if not percentiles or not all(0 < p < 100 for p in percentiles):
        raise ConfigError(f"ROAD percentiles must lie strictly between 0 and 100, got {percentiles!r}")
    n, _, h, w = x.shape
    classes = classes.to(x.device).long()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind, s in (("morf", scores), ("lerf", 1 - scores)):
        flat = s.flatten(1)
        q = torch.quantile(flat, torch.tensor([p / 100 for p in percentiles]).to(flat), dim=1)  # (P, N)
        probs = torch.empty(n, len(percentiles), device=x.device)
        rank = None  # the map's order, computed once where a flat map needs it
        for k in range(len(percentiles)):
            removed = ~(s < q[k][:, None, None])
            flat_all = removed.flatten(1).all(dim=1)
            if flat_all.any():  # a constant map keeps nothing below its percentile: keep its first pixels
                kept = round(percentiles[k] / 100 * h * w) or 1
                if rank is None:
                    rank = flat.argsort(dim=1, stable=True).argsort(dim=1).view(n, h, w)
                removed = torch.where(flat_all[:, None, None], rank >= kept, removed)
            for i in range(0, n, batch_size):
                sl = slice(i, i + batch_size)
                imputed = noisy_linear_impute(x[sl], removed[sl], noise=noise, generator=g)
                p = classifier(imputed).softmax(dim=1).gather(1, classes[sl, None]).squeeze(1)
                probs[sl, k] = p.float()
        out[kind] = probs.mean(dim=1)
        out[f"{kind}_curve"] = probs
    out["combined"] = (out["lerf"] - out["morf"]) / 2
    return out
