"""Evaluation metrics (the paper's eqs 18-20), streamed over a loader as sums and counts.

Every figure is a ratio of sums kept in :class:`MetricSums`, so shards and ranks combine exactly
(never an average of averages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ._validate import check_range
from .errors import ConfigError
from .runtime import distributed

IOU_KS = (10, 20, 30, 40, 50)
FAITHFULNESS_KEYS = ("deletion_benign", "deletion_adversarial", "insertion_benign", "insertion_adversarial")


def normalize_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1] (the maps compared in eqs 13 and 19).

    Differentiable; a constant map becomes zeros (no NaN: the range is clamped to ``eps``).

    Args:
        maps: (N, ...) maps, e.g. (N, h, w).
        eps: smallest range divided by.

    Returns:
        Maps of the same shape with per-sample minimum 0 and maximum 1 (0 everywhere if constant).
    """
    flat = maps.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def topk_masks(maps: torch.Tensor, k_percent: float) -> torch.Tensor:
    """Binarise each map (N, h, w) by keeping its top ``k_percent`` % pixels -> bool (N, h*w)."""
    flat = maps.flatten(1)
    k = max(1, int(round(flat.shape[1] * k_percent / 100.0)))
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(1, idx, True)


def iou_topk(a: torch.Tensor, b: torch.Tensor, k_percent: float) -> torch.Tensor:
    """Eq 20: IoU of the top-k% binarised maps, per sample (N,)."""
    ma, mb = topk_masks(a, k_percent), topk_masks(b, k_percent)
    inter = (ma & mb).sum(1).float()
    union = (ma | mb).sum(1).float()
    return inter / union.clamp_min(1)


def is_fooled(
    benign_pred: torch.Tensor, adv_pred: torch.Tensor, *, target: Optional[int] = None
) -> torch.Tensor:
    """Eq 18 per image (bool (N,)): the prediction changed, or with ``target`` it is the target class.

    ``benign_pred`` and ``adv_pred`` are predicted classes (N,); every fooling ratio in juap (evaluation,
    the attacks' own stopping and selection rules) counts with this.
    """
    return adv_pred == target if target is not None else adv_pred != benign_pred


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq 19: mean absolute difference per pixel of min-max normalised maps, per sample (N,), in [0, 1]."""
    return (normalize_maps(a) - normalize_maps(b)).abs().flatten(1).mean(1)


# The paper's headline, JUAP against GUAP on the same interpreter: the fooling ratio kept within
# HEADLINE_FR_GAP, the mean IoU raised by HEADLINE_IOU_GAIN and L1 lower; the claims benchmark also asks
# the IoU on the fooled images alone to rise by HEADLINE_IOU_FOOLED_GAIN.
HEADLINE_FR_GAP, HEADLINE_IOU_GAIN, HEADLINE_IOU_FOOLED_GAIN = 0.05, 0.10, 0.05


def headline_misses(
    juap: Mapping[str, Optional[float]], guap: Mapping[str, Optional[float]], *, fooled: bool = False
) -> List[str]:
    """The parts of the paper's headline that a JUAP result misses against GUAP's (empty: it holds).

    Args:
        juap, guap: results (or means over seeds) with ``fooling_ratio``, ``iou`` and ``l1``, and
            ``iou_fooled`` (None when nothing was fooled, counted as 0) with ``fooled=True``.
        fooled: also ask for the IoU on the fooled images alone >= GUAP's + ``HEADLINE_IOU_FOOLED_GAIN``.

    Returns:
        The missed parts, among ``"FR"``, ``"IoU"``, ``"L1"`` and ``"IoU fooled"``, in that order.
    """
    ok = {
        "FR": juap["fooling_ratio"] >= guap["fooling_ratio"] - HEADLINE_FR_GAP,
        "IoU": juap["iou"] >= guap["iou"] + HEADLINE_IOU_GAIN,
        "L1": juap["l1"] < guap["l1"],
    }
    if fooled:
        ok["IoU fooled"] = (juap["iou_fooled"] or 0) >= (guap["iou_fooled"] or 0) + HEADLINE_IOU_FOOLED_GAIN
    return [part for part, holds in ok.items() if not holds]


@dataclass
class MetricSums:
    """Sums and counts of one evaluation; :meth:`summary` turns them into ratios."""

    sums: Dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def merge(self, other: MetricSums) -> MetricSums:
        for k, v in other.sums.items():
            self.add(k, v)
        return self

    def all_reduce(self) -> MetricSums:
        """Add the sums of every torchrun rank (in place; every rank then holds the totals)."""
        self.sums = distributed.all_reduce_sums(self.sums)
        return self

    @torch.no_grad()
    def update_predictions(
        self,
        benign_logits: torch.Tensor,
        adv_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        target: Optional[int] = None,
    ) -> None:
        """Fooling (eq 18), clean/adversarial accuracy and targeted success from one batch."""
        pb, pa = benign_logits.argmax(1), adv_logits.argmax(1)
        self.add("n", len(pb))
        self.add("fooled", is_fooled(pb, pa).sum())
        if labels is not None:
            labels = labels.to(pb.device)
            self.add("clean_correct", (pb == labels).sum())
            self.add("adv_correct", (pa == labels).sum())
            self.add("n_labelled", len(labels))
        if target is not None:
            self.add("hit_target", (pa == target).sum())
            self.add("n_not_target", (pb != target).sum())
            self.add("hit_target_of_not_target", ((pa == target) & (pb != target)).sum())

    @torch.no_grad()
    def update_faithfulness(self, benign: Dict[str, torch.Tensor], adversarial: Dict[str, torch.Tensor]):
        """Sums of the deletion / insertion areas of one batch: ``benign`` for the benign maps on the benign
        images, ``adversarial`` for the adversarial maps on the perturbed images (each a result of
        :func:`juap.faithfulness.deletion_insertion`)."""
        self.add("n_faithfulness", len(benign["deletion"]))
        for which, res in (("benign", benign), ("adversarial", adversarial)):
            for kind in ("deletion", "insertion"):
                self.add(f"{kind}_{which}", res[kind].sum())

    @torch.no_grad()
    def update_classes(self, benign_logits: torch.Tensor, adv_logits: torch.Tensor) -> None:
        """Per-class counts of one batch: images per benign predicted class, and the benign -> adversarial
        transitions of the predictions (only the pairs that occur are stored, so K = 1000 stays small).

        Classes are the *benign predictions* (what the classifier says of the clean image), not the labels.
        """
        k = benign_logits.shape[1]
        pb, pa = benign_logits.argmax(1).cpu(), adv_logits.argmax(1).cpu()
        counts = torch.bincount(pb, minlength=k)
        for c in range(k):  # every class, zeros included: the number of classes survives the sums
            self.add(f"class_n/{c}", counts[c])
        pairs, n = torch.unique(pb * k + pa, return_counts=True)
        for p, m in zip(pairs.tolist(), n.tolist(), strict=True):
            self.add(f"transition/{p // k}/{p % k}", m)

    @torch.no_grad()
    def update_maps(
        self,
        benign_maps: torch.Tensor,
        adv_maps: torch.Tensor,
        *,
        seed: int = 0,
        part: Optional[Tuple[int, int]] = None,
        fooled: Optional[torch.Tensor] = None,
        classes: Optional[torch.Tensor] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        """L1 (eq 19) and top-k IoU (eq 20) of one batch of maps, and the random-map IoU floor.

        Args:
            seed: seeds the two random maps of the floor.
            part: ``(start, n_global)`` when these maps are rows ``start:start+N`` of a global batch split
                over ranks: the random maps are drawn for the global batch and the same rows kept, so the
                floor does not depend on the number of ranks.
            fooled: bool (N,), the images whose prediction the perturbation changed; their maps are also
                summed apart (``l1_fooled``, ``iou_fooled``): an image that is not fooled keeps its
                class, so its map mostly stays, and the mean over all images rises as the fooling ratio
                falls. The fooled-only figures separate keeping the maps from fooling fewer images.
            classes: long (N,), the benign predicted class of each image, with ``num_classes``: L1 and IoU
                are also summed per class (``per_class`` in the summary).
        """
        benign_maps, adv_maps = benign_maps.float(), adv_maps.float()
        self.add("n_maps", len(benign_maps))
        start, total = part if part is not None else (0, len(benign_maps))
        shape = (total,) + tuple(benign_maps.shape[1:])
        rows = slice(start, start + len(benign_maps))
        g = torch.Generator().manual_seed(seed)
        r1 = torch.rand(shape, generator=g)[rows].to(benign_maps.device)
        r2 = torch.rand(shape, generator=g)[rows].to(benign_maps.device)
        l1 = l1_distance(adv_maps, benign_maps)
        self.add("l1", l1.sum())
        iou = torch.stack([iou_topk(adv_maps, benign_maps, k) for k in IOU_KS])  # (K, N)
        for j, k in enumerate(IOU_KS):
            self.add(f"iou@{k}", iou[j].sum())
            self.add(f"random_iou@{k}", iou_topk(r1, r2, k).sum())
        if fooled is not None:
            f = fooled.to(l1.device).bool()
            self.add("n_maps_fooled", f.sum())
            self.add("l1_fooled", l1[f].sum())
            self.add("iou_fooled", iou.mean(0)[f].sum())
        if classes is not None:
            k = int(num_classes) if num_classes is not None else int(classes.max()) + 1
            c = classes.to(l1.device).long()
            n_c = torch.bincount(c, minlength=k)
            l1_c = torch.zeros(k, dtype=torch.float64, device=l1.device).index_add_(0, c, l1.double())
            iou_c = torch.zeros(k, dtype=torch.float64, device=l1.device).index_add_(
                0, c, iou.mean(0).double()
            )
            for j in range(k):
                self.add(f"class_n_maps/{j}", n_c[j])
                self.add(f"class_l1/{j}", l1_c[j])
                self.add(f"class_iou/{j}", iou_c[j])

    def summary(self) -> Dict[str, float]:
        """Ratios: fooling_ratio, clean/adv accuracy, target success, l1, iou (mean over k) and per k."""
        s = self.sums
        out: Dict[str, float] = {}
        n = s.get("n", 0)
        if n:
            out["n_images"] = int(n)
            out["fooling_ratio"] = s["fooled"] / n
        if s.get("n_labelled"):
            out["clean_accuracy"] = s["clean_correct"] / s["n_labelled"]
            out["adversarial_accuracy"] = s["adv_correct"] / s["n_labelled"]
        if "hit_target" in s and n:
            out["target_success_rate"] = s["hit_target"] / n
            if s.get("n_not_target"):
                out["target_success_rate_excluding_target"] = (
                    s["hit_target_of_not_target"] / s["n_not_target"]
                )
        m = s.get("n_maps", 0)
        if m:
            out["l1"] = s["l1"] / m
            per_k = {k: s[f"iou@{k}"] / m for k in IOU_KS}
            floor = {k: s[f"random_iou@{k}"] / m for k in IOU_KS}
            out["iou"] = sum(per_k.values()) / len(per_k)
            out["random_iou"] = sum(floor.values()) / len(floor)
            out.update({f"iou@{k}": v for k, v in per_k.items()})
            out.update({f"random_iou@{k}": v for k, v in floor.items()})
        if "n_maps_fooled" in s:  # maps of the fooled images alone (None: no image was fooled)
            nf = s["n_maps_fooled"]
            out["n_fooled"] = int(nf)
            out["l1_fooled"] = s["l1_fooled"] / nf if nf else None
            out["iou_fooled"] = s["iou_fooled"] / nf if nf else None
        if s.get("n_faithfulness"):  # deletion / insertion areas (juap.faithfulness), benign and adversarial
            for key in FAITHFULNESS_KEYS:
                out[key] = s[key] / s["n_faithfulness"]
        out.update(self._class_summary())
        return out

    def _class_summary(self) -> Dict:
        """The per-class figures, when :meth:`update_classes` or ``update_maps(classes=...)`` filled them.

        ``transitions[b][a]``: images predicted ``b`` when benign and ``a`` when perturbed (rows sum to the
        images per benign class, the whole matrix to ``n_images``); ``dominant_label``: the adversarial
        class most fooled images land in (lowest index on a tie; None when none is fooled) and
        ``dominant_label_share`` its share of the fooled images; ``per_class``: lists indexed by benign
        predicted class, None for a class no image was predicted as.
        """
        s = self.sums
        out: Dict = {}
        k = sum(1 for key in s if key.startswith("class_n/"))
        if k:
            t = [[int(s.get(f"transition/{b}/{a}", 0)) for a in range(k)] for b in range(k)]
            n_b = [int(s[f"class_n/{b}"]) for b in range(k)]
            fooled_b = [n_b[b] - t[b][b] for b in range(k)]
            into = [sum(t[b][a] for b in range(k) if b != a) for a in range(k)]  # fooled images landing in a
            total = sum(into)
            top = max(range(k), key=lambda a: (into[a], -a))
            out["num_classes"] = k
            out["transitions"] = t
            out["dominant_label"] = top if total else None
            out["dominant_label_share"] = into[top] / total if total else None
            out["per_class"] = {
                "n_images": n_b,
                "n_fooled": fooled_b,
                "fooling_ratio": [f / n if n else None for f, n in zip(fooled_b, n_b, strict=True)],
                "n_fooled_into": into,
            }
        k = sum(1 for key in s if key.startswith("class_n_maps/"))
        if k:
            n_c = [int(s[f"class_n_maps/{c}"]) for c in range(k)]
            out.setdefault("per_class", {}).update(
                {
                    "n_images": n_c,
                    "l1": [s[f"class_l1/{c}"] / n if n else None for c, n in enumerate(n_c)],
                    "iou": [s[f"class_iou/{c}"] / n if n else None for c, n in enumerate(n_c)],
                }
            )
        return out


# -- ranking metrics ---------------------------------------------------------------------------------
def _check_scores(negatives: torch.Tensor, positives: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    neg = torch.as_tensor(negatives, dtype=torch.float64).flatten()
    pos = torch.as_tensor(positives, dtype=torch.float64).flatten()
    if len(neg) == 0 or len(pos) == 0:
        raise ConfigError(
            f"a ROC needs at least one benign and one adversarial score, got {len(neg)} and {len(pos)} "
            "(an attack that fools no image leaves no adversarial examples to detect)"
        )
    if not (torch.isfinite(neg).all() and torch.isfinite(pos).all()):
        raise ConfigError("detection scores must be finite; got NaN or infinity")
    return neg, pos


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve: P(score(adversarial) > score(benign)) + P(equal) / 2.

    Computed as the Mann-Whitney U statistic from average ranks (tied scores share their mean rank), so
    identical score distributions give exactly 0.5 and perfectly separated ones 1.0.

    Args:
        negatives: scores of benign inputs (M,).
        positives: scores of adversarial inputs (P,); higher means "more adversarial".

    Returns:
        AUROC in [0, 1].
    """
    neg, pos = _check_scores(negatives, positives)
    scores = torch.cat([neg, pos])
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last element of each tied group
    avg_rank = ends - (counts.double() - 1) / 2
    rank_pos = avg_rank[inverse[len(neg) :]].sum()
    u = rank_pos - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def roc_curve(negatives: torch.Tensor, positives: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ROC points for thresholds at every distinct score ("adversarial" when score >= threshold).

    Returns:
        ``(fpr, tpr)``, each (T + 1,) from (0, 0) to (1, 1), non-decreasing; tied scores form one step.
    """
    neg, pos = _check_scores(negatives, positives)
    thresholds = torch.unique(torch.cat([neg, pos])).flip(0)  # descending
    fpr = (neg[None, :] >= thresholds[:, None]).double().mean(1)
    tpr = (pos[None, :] >= thresholds[:, None]).double().mean(1)
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, tpr])


def tpr_at_fpr(negatives: torch.Tensor, positives: torch.Tensor, fpr: float = 0.05) -> float:
    """The largest true-positive rate of a threshold whose false-positive rate is at most ``fpr``.

    Thresholds sit at observed scores (tied scores are flagged together), so the rate is achievable by
    a real threshold on these scores, never interpolated.
    """
    check_range("fpr", fpr, low=0, high=1)
    f, t = roc_curve(negatives, positives)
    return float(t[f <= fpr + 1e-12].max())


def calibrate_threshold(clean_scores: torch.Tensor | Sequence[float], fpr: float) -> float:
    """The detection threshold at a false-positive rate, from scores of held-out clean images.

    An input is flagged when its score is ``> t``. ``t`` is the smallest observed clean score such that at
    most ``fpr`` of the clean scores lie above it: with the scores sorted ascending and
    ``k = floor(fpr * n)``, ``t`` is the ``(n - k)``-th one (ties only lower the false positives).

    Args:
        clean_scores: detector scores (n,) of clean calibration images (not used to train the detector).
        fpr: the false-positive rate, in (0, 1).

    Returns:
        The threshold ``t``, one of the clean scores.

    Raises:
        ConfigError: ``fpr`` outside (0, 1); fewer than ``ceil(1 / fpr)`` scores (at a rate of 1% a
            threshold needs 100 clean images, or not one of them may lie above it); a score not finite.
    """
    check_range("fpr", fpr, low=0, high=1, low_open=True)
    if fpr >= 1:
        raise ConfigError(f"fpr = {fpr!r} is out of range; it must be > 0 and < 1")
    scores = torch.as_tensor(clean_scores, dtype=torch.float64).detach().cpu().flatten()
    needed = math.ceil(1 / fpr - 1e-9)
    if len(scores) < needed:
        raise ConfigError(
            f"a threshold at a false-positive rate of {fpr:g} needs at least {needed} clean calibration "
            f"images, got {len(scores)}: give more clean images to calibrate on, or a larger fpr"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ConfigError("detection scores must be finite; got NaN or infinity among the clean scores")
    k = math.floor(fpr * len(scores) + 1e-9)  # clean scores allowed above the threshold
    return float(scores.sort().values[len(scores) - k - 1])


def evasion_rate(fooled: torch.Tensor, scores: torch.Tensor, threshold: float) -> float:
    """The fraction of test images that the perturbation fools *and* that the detector does not flag.

    Args:
        fooled: bool (N,): whether each perturbed image fools the classifier (eq 18 per image).
        scores: detector scores (N,) of the perturbed images.
        threshold: the calibrated threshold (flag = score > threshold).

    Returns:
        ``mean(fooled & (scores <= threshold))`` over all N images, in [0, 1].

    Raises:
        ConfigError: shapes differ, no image, or the threshold is NaN (an uncalibrated detector).
    """
    fooled = torch.as_tensor(fooled).detach().cpu().flatten().bool()
    scores = torch.as_tensor(scores).detach().cpu().flatten()
    if fooled.shape != scores.shape or len(scores) == 0:
        raise ConfigError(
            f"evasion_rate needs one fooled flag and one score per image, got {len(fooled)} flags and "
            f"{len(scores)} scores"
        )
    if math.isnan(float(threshold)):
        raise ConfigError("the threshold is NaN: calibrate the detector first (detector.calibrate)")
    return float((fooled & (scores <= float(threshold))).double().mean())


# -- the pointing game (does a map point at the object?) ----------------------------------------------
def pointing_game(
    maps: torch.Tensor,
    boxes: torch.Tensor | Sequence[Sequence[int]],
    *,
    top: float = 0.2,
    inside: float = 0.5,
) -> float:
    """Fraction of images whose most salient pixels mostly lie inside the object's box.

    Image n is a hit when at least ``inside`` of the ``ceil(top * H * W)`` highest pixels of ``maps[n]``
    lie inside ``boxes[n]`` (ties broken by ``torch.topk``). With the defaults this is ``pointing_top20``.

    Args:
        maps: (N, H, W) maps at image resolution (upsample native maps first, e.g. with
            :func:`~juap.interpreters.upsample_maps`); any real values, larger = more salient.
        boxes: (N, 4) ``(x0, y0, x1, y1)`` pixel boxes, x1 and y1 exclusive.
        top: share of the pixels kept, in (0, 1].
        inside: share of the kept pixels that must lie in the box for a hit, in [0, 1].

    Returns:
        The hit rate in [0, 1] (0.0 for no images).
    """
    check_range("top", top, low=0, high=1, low_open=True)
    check_range("inside", inside, low=0, high=1)
    if maps.dim() != 3:
        raise ValueError(f"expected maps of shape (N, H, W), got {tuple(maps.shape)}")
    n, h, w = maps.shape
    boxes = torch.as_tensor(boxes, device=maps.device).reshape(-1, 4)
    if boxes.shape[0] != n:
        raise ValueError(f"got {n} maps but {boxes.shape[0]} boxes")
    if n == 0:
        return 0.0
    k = max(1, math.ceil(top * h * w))
    idx = maps.detach().flatten(1).float().topk(k, dim=1).indices  # (N, k)
    ys, xs = idx // w, idx % w
    x0, y0, x1, y1 = (boxes[:, i : i + 1] for i in range(4))
    hit_in = ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).float().mean(1)  # (N,)
    return float((hit_in >= inside).float().mean())
