"""The paper's objectives: classifier fooling (eqs 7-9), interpreter fooling (eq 13), joint (eq 16)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .distributed import global_count, global_sum
from .errors import ConfigError
from .interpreters.base import normalize_maps

Objective = Literal["untargeted", "least_likely", "targeted"]
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
    if target is None or isinstance(target, bool) or not isinstance(target, int):
        raise ConfigError(f"the targeted objective needs an integer target class, got {target!r}")
    if not 0 <= target < num_classes:
        raise ConfigError(
            f"target class {target} is out of range: the classifier has classes 0..{num_classes - 1}"
        )


def fooling_loss(
    adv_logits: torch.Tensor, classes: torch.Tensor, *, objective: str, across_ranks: bool = False
) -> torch.Tensor:
    """Eqs 7-9 on the batch-mean cross-entropy (as GUAP does); a scalar to minimise.

    Args:
        adv_logits: (N, C) logits of the adversarial images.
        classes: (N,) from :func:`attack_classes`.
        objective: ``untargeted`` gives ``-log CE`` (eq 7, pushes away from C_x); ``least_likely`` and
            ``targeted`` give ``log CE`` (eqs 8, 9, pull towards C_min / C_t).
        across_ranks: under torchrun, this rank holds a slice of the global batch: the mean is taken
            over the global batch (CE sum and count all-reduced, differentiably, *before* the log: a mean
            of per-rank logs would be another loss). A no-op in one process.
    """
    ce_sum = F.cross_entropy(adv_logits.float(), classes, reduction="sum")
    ce = _batch_mean(ce_sum, len(classes), across_ranks)
    ce = ce.clamp_min(_CE_FLOOR)  # log(0) would be -inf, then NaN
    if objective == "untargeted":
        return -torch.log(ce)
    return torch.log(ce)


_CE_FLOOR = 1e-12


def _batch_mean(total: torch.Tensor, n: int, across_ranks: bool) -> torch.Tensor:
    """``total / n``, or the global sum over the global count when ``across_ranks`` (differentiable)."""
    if not across_ranks:
        return total / n
    return global_sum(total) / global_count(n, total.device).to(total.dtype)


def map_distance(
    adv_maps: torch.Tensor, benign_maps: torch.Tensor, *, across_ranks: bool = False
) -> torch.Tensor:
    """Eq 13: per-sample L2 distance of min-max normalised maps, averaged over the batch (scalar).

    Maps are compared in float32 (bf16 maps from autocast are cast up first); ``across_ranks`` averages
    over the global batch as in :func:`fooling_loss`.
    """
    a = normalize_maps(adv_maps.float()).flatten(1)
    b = normalize_maps(benign_maps.float()).flatten(1)
    return _batch_mean((a - b).norm(dim=1).sum(), len(a), across_ranks)


def feature_distance(
    adv_feats: torch.Tensor, benign_feats: torch.Tensor, *, across_ranks: bool = False
) -> torch.Tensor:
    """The extra RTS term ``||e(x_hat) - e(x)||_2`` per sample, averaged over the (global) batch (scalar)."""
    d = (adv_feats.float() - benign_feats.float()).flatten(1).norm(dim=1)
    return _batch_mean(d.sum(), len(d), across_ranks)


def joint_loss(fool: torch.Tensor, interp: torch.Tensor, *, lam: float, delta: float = -0.8) -> torch.Tensor:
    """Eq 16: ``max{L_fool, delta} + lambda * L_interp`` (the hinge on the batch-mean fooling loss).

    Under torchrun, pass global ``fool`` and ``interp`` (``across_ranks=True``): the hinge then acts on
    the global batch's loss, identically on every rank.
    """
    return torch.clamp(fool, min=delta) + lam * interp
