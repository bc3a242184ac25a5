"""Interpretation-based detection: inspector scores, map features and a logistic detector."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ._validate import check_range
from .budget import apply_perturbation
from .errors import ConfigError
from .metrics import IOU_KS, iou_topk, l1_distance, normalize_maps

INSPECTORS = ("inspector L1", "inspector 1-IoU")


FEATURE_SETS = ("map", "map+conf")


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
    """Statistics of each input's own map (and, with ``logits``, of its prediction's confidence).

    Args:
        maps: raw maps (N, h, w) of the inputs' predicted classes.
        logits: the classifier's logits (N, C), or ``None`` for the map statistics alone.

    Returns:
        (N, F) features, in the order of :data:`MAP_FEATURES` (+ :data:`CONF_FEATURES` with logits).
    """
    if maps.dim() != 3:
        raise ConfigError(f"maps must have shape (N, h, w), got {tuple(maps.shape)}")
    maps = maps.detach().float()
    n, h, w = maps.shape
    m = normalize_maps(maps)  # (N, h, w) in [0, 1]
    flat = m.flatten(1)
    npix = flat.shape[1]
    total = flat.sum(1).clamp_min(1e-12)
    p = flat / total[:, None]  # the map as a distribution over pixels
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(max(npix, 2))
    desc = flat.sort(1, descending=True).values
    top = [desc[:, : max(1, round(npix * q))].sum(1) / total for q in (0.1, 0.3)]
    yy, xx = torch.meshgrid(
        (torch.arange(h, dtype=torch.float32) + 0.5) / h,
        (torch.arange(w, dtype=torch.float32) + 0.5) / w,
        indexing="ij",
    )
    yy, xx = yy.flatten().to(maps.device), xx.flatten().to(maps.device)
    cy, cx = (p * yy).sum(1), (p * xx).sum(1)
    spread = ((p * ((yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2)).sum(1)).clamp_min(0).sqrt()
    center = ((cy - 0.5) ** 2 + (cx - 0.5) ** 2).sqrt()
    tv = torch.zeros(n, device=maps.device)
    if w > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).abs().flatten(1).mean(1)
    if h > 1:
        tv = tv + (m[:, 1:, :] - m[:, :-1, :]).abs().flatten(1).mean(1)
    raw = maps.flatten(1)
    scale = torch.log1p((raw.amax(1) - raw.amin(1)).clamp_min(0))
    feats = [
        entropy,
        *top,
        flat.mean(1),
        flat.std(1) if npix > 1 else torch.zeros(n),
        spread,
        center,
        tv,
        scale,
    ]
    if logits is not None:
        logits = logits.detach().float()
        prob = logits.softmax(1)
        two = logits.topk(min(2, logits.shape[1]), dim=1).values
        margin = two[:, 0] - two[:, -1]
        ent = -(prob * prob.clamp_min(1e-12).log()).sum(1)
        feats += [prob.amax(1), margin, ent]
    return torch.stack(feats, 1)


class LogisticDetector:
    """Logistic regression on standardised features, fitted with L-BFGS (full batch, deterministic).

    The standardisation (mean, std) comes from the training features only; the two classes are weighted
    equally whatever their counts.

    Args:
        weight_decay: L2 penalty on the weights (not the bias).
        max_iter: L-BFGS iterations.
    """

    def __init__(self, *, weight_decay: float = 1e-2, max_iter: int = 200) -> None:
        check_range("weight_decay", weight_decay, low=0)
        check_range("max_iter", max_iter, low=1)
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> LogisticDetector:
        """Fit on (N, F) features with labels (N,) in {0 (benign), 1 (adversarial)}."""
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(labels, dtype=torch.float64).flatten()
        if x.dim() != 2 or len(x) != len(y):
            raise ConfigError(
                f"features (N, F) and labels (N,) must match, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        n_pos, n_neg = float(y.sum()), float((1 - y).sum())
        if n_pos == 0 or n_neg == 0:
            raise ConfigError(
                "the detector needs benign and adversarial training examples, got one class only"
            )
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=torch.float64)
        z = (x - self.mean) / self.std
        sample_w = torch.where(y > 0.5, 0.5 / n_pos, 0.5 / n_neg)  # each class sums to 1/2
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logit = z @ w + b
            loss = (
                sample_w * torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
            ).sum()
            loss = loss + self.weight_decay * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N,): higher means more likely adversarial."""
        if self.weight is None:
            raise ConfigError("the detector is not fitted yet: call fit(features, labels) first")
        z = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.std
        return z @ self.weight + self.bias


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
