"""The paper's objectives: classifier fooling (eqs 7-9), interpreter fooling (eq 13), joint (eq 16)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._validate import is_int
from .errors import ConfigError
from .interpreters.base import normalize_maps
from .runtime.distributed import global_count, global_sum

OBJECTIVES = ("untargeted", "least_likely", "targeted")


def attack_classes(
    benign_logits: torch.Tensor, *, objective: str, target: Optional[int] = None
) -> torch.Tensor:
    """The class each objective's cross-entropy is taken against (N,).

    ``untargeted``: the benign prediction C_x (eq 7); ``least_likely``: C_min = argmin f(x) (eq 8);
    ``targeted``: the target C_t (eq 9).
    """
    n, num_classes = benign_logits.shape
    if objective == "untargeted":
        return benign_logits.argmax(1)
    if objective == "least_likely":
        return benign_logits.argmin(1)
    if objective == "targeted":
        check_target(target, num_classes)
        return torch.full((n,), int(target), dtype=torch.long, device=benign_logits.device)
    raise ConfigError(f"objective = {objective!r} is not allowed; allowed values: {', '.join(OBJECTIVES)}")


def check_target(target: Optional[int], num_classes: int) -> None:
    if not is_int(target):
        raise ConfigError(f"the targeted objective needs an integer target class, got {target!r}")
    if not 0 <= target < num_classes:
        raise ConfigError(
            f"target class {target} is out of range: the classifier has classes 0..{num_classes - 1}"
        )


FOOL_FORMS = ("log_mean", "mean_log", "mean_log1p")
HINGES = ("batch", "image", "margin")
MAP_ON = ("all", "fooled")
MAP_LOSSES = ("l2", "soft_iou")
SOFT_IOU_KS = (10, 20, 30, 40, 50)  # the top-k percentages of eq 20 (juap.metrics.IOU_KS)
SOFT_IOU_TEMPERATURE = 0.1  # of the sigmoid around each map's top-k threshold, in normalised map units


def fooling_terms(
    adv_logits: torch.Tensor, classes: torch.Tensor, *, objective: str, form: str
) -> torch.Tensor:
    """Per-image fooling terms (N,) to minimise: ``-log(CE_i + c)`` untargeted (eq 7), ``+log(CE_i + c)``
    towards C_min / C_t (eqs 8, 9), with ``c = 1`` for ``mean_log1p`` (GUAP's public code) else 0."""
    ce = F.cross_entropy(adv_logits.float(), classes, reduction="none")  # (N,)
    ce = ce + 1.0 if form == "mean_log1p" else ce.clamp_min(_CE_FLOOR)  # log(0) would be -inf, then NaN
    return -torch.log(ce) if objective == "untargeted" else torch.log(ce)


def logit_margins(adv_logits: torch.Tensor, classes: torch.Tensor, *, objective: str) -> torch.Tensor:
    """How far past the decision each image is (N,), in logits (C&W's margin): untargeted, the best other
    class's logit minus that of C_x (positive once fooled); towards C_min / C_t, that class's logit minus
    the best other one (positive once reached)."""
    z = adv_logits.float()
    own = z.gather(1, classes[:, None])[:, 0]
    best_other = z.scatter(1, classes[:, None], float("-inf")).amax(1)
    return best_other - own if objective == "untargeted" else own - best_other


def fooling_loss(
    adv_logits: torch.Tensor,
    classes: torch.Tensor,
    *,
    objective: str,
    form: str = "log_mean",
    delta: Optional[float] = None,
    hinge: str = "batch",
    kappa: float = 0.0,
    across_ranks: bool = False,
) -> torch.Tensor:
    """Eqs 7-9 (with eq 16's hinge ``max{., delta}`` when ``delta`` is given); a scalar to minimise.

    Args:
        adv_logits: (N, C) logits of the adversarial images.
        classes: (N,) from :func:`attack_classes`.
        objective: ``untargeted`` pushes away from C_x (``-log``, eq 7); ``least_likely`` and ``targeted``
            pull towards C_min / C_t (``+log``, eqs 8, 9).
        form: ``log_mean``: the log of the batch-mean cross-entropy (the paper's eqs on a batch);
            ``mean_log``: the batch mean of per-image ``log CE_i``; ``mean_log1p``: the batch mean of
            per-image ``log(CE_i + 1)`` (GUAP's public code, ``run_imagenet.py``).
        delta: eq 16's hinge level; ``None``: no hinge.
        hinge: ``batch`` clamps the batch loss at ``delta`` (once the batch is fooled on average, the
            fooling gradient stops for every image); ``image`` clamps each image's term (an image that
            is fooled past ``delta`` stops pulling, the others keep pulling). ``log_mean`` is a batch
            quantity, so its image hinge clamps ``log CE_i``. ``margin`` stops an image's pull once it is
            fooled by ``kappa`` logits (:func:`logit_margins`, C&W's kappa), a level that does not depend
            on the data's cross-entropies; ``delta`` is not used there (the term keeps its value, only
            its gradient stops).
        kappa: the logit margin of the ``margin`` hinge (0: stop as soon as the image is fooled).
        across_ranks: under torchrun, this rank holds a slice of the global batch: means are taken over
            the global batch (sums and counts all-reduced, differentiably, *before* any log: a mean of
            per-rank logs would be another loss). A no-op in one process.
    """
    if form not in FOOL_FORMS:
        raise ConfigError(f"fool_loss = {form!r} is not allowed; allowed values: {', '.join(FOOL_FORMS)}")
    if hinge not in HINGES:
        raise ConfigError(f"hinge = {hinge!r} is not allowed; allowed values: {', '.join(HINGES)}")
    n = len(classes)
    if form == "log_mean" and (hinge == "batch" or delta is None):
        ce_sum = F.cross_entropy(adv_logits.float(), classes, reduction="sum")
        ce = _batch_mean(ce_sum, n, across_ranks).clamp_min(_CE_FLOOR)
        loss = -torch.log(ce) if objective == "untargeted" else torch.log(ce)
        return loss if delta is None else torch.clamp(loss, min=delta)
    if hinge == "margin":
        terms = fooling_terms(adv_logits, classes, objective=objective, form=form)  # (N,)
        past = logit_margins(adv_logits.detach(), classes, objective=objective) >= kappa
        return _batch_mean(torch.where(past, terms.detach(), terms).sum(), n, across_ranks)
    image_delta = delta if hinge == "image" else None
    terms = hinged_fooling_terms(adv_logits, classes, objective=objective, form=form, delta=image_delta)
    loss = _batch_mean(terms.sum(), n, across_ranks)
    return loss if delta is None or hinge == "image" else torch.clamp(loss, min=delta)


def hinged_fooling_terms(
    adv_logits: torch.Tensor, classes: torch.Tensor, *, objective: str, form: str, delta: Optional[float]
) -> torch.Tensor:
    """Eq 16's image hinge: each image's fooling term (:func:`fooling_terms`) clamped at ``delta``,
    ``max{term_i, delta}`` (N,); ``delta=None``: the terms themselves. ``log_mean`` acts as ``mean_log``
    here (a batch quantity has no per-image form), so its image hinge clamps ``log CE_i``. The per-image
    loss of JAP and the ``image`` hinge of :func:`fooling_loss` are this one function."""
    terms = fooling_terms(adv_logits, classes, objective=objective, form=form)  # (N,)
    return terms if delta is None else torch.clamp(terms, min=delta)


_CE_FLOOR = 1e-12


def _batch_mean(total: torch.Tensor, n: int, across_ranks: bool) -> torch.Tensor:
    """``total / n``, or the global sum over the global count when ``across_ranks`` (differentiable)."""
    if not across_ranks:
        return total / n
    return global_sum(total) / global_count(n, total.device).to(total.dtype)


def _masked_mean(values: torch.Tensor, only: Optional[torch.Tensor], across_ranks: bool) -> torch.Tensor:
    """The mean of per-image ``values`` (N,) over the batch, or over ``only`` (bool (N,); 0 when none),
    global under torchrun when ``across_ranks``."""
    if only is None:
        return _batch_mean(values.sum(), len(values), across_ranks)
    only = only.detach().to(values.dtype)
    total, count = (values * only).sum(), only.sum()
    if across_ranks:
        total, count = global_sum(total), global_sum(count.detach())
    return total / count.clamp_min(1.0)


def map_distance(
    adv_maps: torch.Tensor,
    benign_maps: torch.Tensor,
    *,
    only: Optional[torch.Tensor] = None,
    form: str = "l2",
    across_ranks: bool = False,
) -> torch.Tensor:
    """Eq 13: per-sample L2 distance of min-max normalised maps, averaged over the batch (scalar).

    Maps are compared in float32 (bf16 maps from autocast are cast up first); ``across_ranks`` averages
    over the global batch as in :func:`fooling_loss`. ``only`` (bool (N,)): average over those images
    alone (e.g. the ones fooled at this step); 0 when there are none. ``form="soft_iou"``: instead of
    the L2 distance, ``1 - `` :func:`soft_topk_iou` (a differentiable stand-in for eq 20's metric).
    """
    if form not in MAP_LOSSES:
        raise ConfigError(f"map_loss = {form!r} is not allowed; allowed values: {', '.join(MAP_LOSSES)}")
    d = map_distances(adv_maps, benign_maps) if form == "l2" else 1.0 - soft_topk_iou(adv_maps, benign_maps)
    return _masked_mean(d, only, across_ranks)


def map_distances(adv_maps: torch.Tensor, benign_maps: torch.Tensor) -> torch.Tensor:
    """Eq 13 per sample (N,): the L2 distance of min-max normalised maps, compared in float32."""
    a = normalize_maps(adv_maps.float()).flatten(1)
    b = normalize_maps(benign_maps.float()).flatten(1)
    return (a - b).norm(dim=1)


def soft_topk_iou(
    adv_maps: torch.Tensor, benign_maps: torch.Tensor, *, temperature: float = SOFT_IOU_TEMPERATURE
) -> torch.Tensor:
    """Eq 20 made differentiable, per sample (N,): the mean over k in :data:`SOFT_IOU_KS` of the IoU
    between the benign map's top-k% mask (fixed) and a soft top-k% mask of the adversarial map,
    ``sigmoid((a - t) / temperature)`` with ``t`` halfway between its k-th and (k+1)-th largest values
    (so its top k% lie above one half). At ``temperature -> 0`` it is the metric's top-k IoU."""
    a = normalize_maps(adv_maps.float()).flatten(1)
    b = normalize_maps(benign_maps.float()).flatten(1)
    hw = a.shape[1]
    ious = []
    for k_percent in SOFT_IOU_KS:
        k = max(1, int(round(hw * k_percent / 100.0)))
        mask_b = torch.zeros_like(b).scatter_(1, b.topk(k, dim=1).indices, 1.0)
        top = a.detach().topk(min(k + 1, hw), dim=1).values
        t = top[:, k - 1 : k] if k == hw else 0.5 * (top[:, k - 1 : k] + top[:, k : k + 1])
        soft_a = torch.sigmoid((a - t) / temperature)
        inter = torch.minimum(soft_a, mask_b).sum(1)
        union = torch.maximum(soft_a, mask_b).sum(1)
        ious.append(inter / union.clamp_min(1e-6))
    return torch.stack(ious).mean(0)


def feature_distance(
    adv_feats: torch.Tensor, benign_feats: torch.Tensor, *, across_ranks: bool = False
) -> torch.Tensor:
    """The encoder-feature term ``||e(x_hat) - e(x)||_2`` of an interpreter with an encoder (RTS), per
    sample, averaged over the (global) batch (scalar)."""
    d = (adv_feats.float() - benign_feats.float()).flatten(1).norm(dim=1)
    return _batch_mean(d.sum(), len(d), across_ranks)


def joint_loss(fool: torch.Tensor, interp: torch.Tensor, *, lam: float | torch.Tensor) -> torch.Tensor:
    """Eq 16: ``max{L_fool, delta} + lambda * L_interp``, where ``fool`` is already hinged by
    :func:`fooling_loss` (on the batch or per image). Under torchrun pass global terms (``across_ranks``),
    so the sum is the same on every rank."""
    return fool + lam * interp


def evasion_loss(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    scale: float | torch.Tensor = 1.0,
    temperature: float = 1.0,
    only: Optional[torch.Tensor] = None,
    across_ranks: bool = False,
) -> torch.Tensor:
    """The adaptive attacker's detector term: ``softplus((score - threshold) / (temperature * scale))``, a
    smooth ``max{score - threshold, 0}`` in units of the detector's clean-score spread ``scale`` (so that
    its weight means the same for every detector), which keeps pulling a little below the threshold;
    averaged over the batch or over ``only`` (bool (N,), e.g. the images already fooled; 0 when none).

    Args:
        scores: detector scores (N,), higher = more adversarial; differentiable in the perturbation.
        threshold: the detector's calibrated threshold (an image is flagged when its score is above it).
        scale: the score's unit, e.g. the standard deviation of clean calibration scores (``Detector.scale``).
        temperature: how far below the threshold the term still pulls, in units of ``scale``.
        only: average over these images alone (the two-phase loss of Tramer et al. 2020: fool first,
            then get under the threshold).
        across_ranks: under torchrun, the mean over the global batch.

    Returns:
        A scalar.
    """
    if temperature <= 0:
        raise ConfigError(f"the detector term's temperature must be > 0, got {temperature}")
    pen = F.softplus((scores.float() - threshold) / (temperature * scale))  # (N,)
    return _masked_mean(pen, only, across_ranks)
