"""The paper's objectives: classifier fooling (eqs 7-9), interpreter fooling (eq 13), joint (eq 16)."""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

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


def fooling_loss(adv_logits: torch.Tensor, classes: torch.Tensor, *, objective: str) -> torch.Tensor:
    """Eqs 7-9 on the batch-mean cross-entropy (as GUAP does); a scalar to minimise.

    Args:
        adv_logits: (N, C) logits of the adversarial images.
        classes: (N,) from :func:`attack_classes`.
        objective: ``untargeted`` gives ``-log CE`` (eq 7, pushes away from C_x); ``least_likely`` and
            ``targeted`` give ``log CE`` (eqs 8, 9, pull towards C_min / C_t).
    """
    ce = F.cross_entropy(adv_logits, classes).clamp_min(_CE_FLOOR)  # log(0) would be -inf, then NaN
    if objective == "untargeted":
        return -torch.log(ce)
    return torch.log(ce)


_CE_FLOOR = 1e-12


def map_distance(adv_maps: torch.Tensor, benign_maps: torch.Tensor) -> torch.Tensor:
    """Eq 13: per-sample L2 distance of min-max normalised maps, averaged over the batch (scalar)."""
    a = normalize_maps(adv_maps).flatten(1)
    b = normalize_maps(benign_maps).flatten(1)
    return (a - b).norm(dim=1).mean()


def feature_distance(adv_feats: torch.Tensor, benign_feats: torch.Tensor) -> torch.Tensor:
    """The extra RTS term ``||e(x_hat) - e(x)||_2`` per sample, averaged over the batch (scalar)."""
    return (adv_feats - benign_feats).flatten(1).norm(dim=1).mean()


def joint_loss(fool: torch.Tensor, interp: torch.Tensor, *, lam: float, delta: float = -0.8) -> torch.Tensor:
    """Eq 16: ``max{L_fool, delta} + lambda * L_interp`` (the hinge on the batch-mean fooling loss)."""
    return torch.clamp(fool, min=delta) + lam * interp
