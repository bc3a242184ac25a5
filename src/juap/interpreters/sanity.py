"""Do the maps mean something? The pointing game on object boxes, and a model-randomisation check.

Used by ``benchmarks/bench_maps.py`` (and ``tests/test_maps_slow.py``) on the embedded synthetic data,
whose images carry the bounding box of the only class evidence they contain; the RTS model's training
scores its masks with the same pointing game (:func:`juap.metrics.pointing_game`).
"""

from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional

import torch

from ..classifiers.base import Classifier
from ..data.synthetic import boxes_by_test_index
from ..metrics import normalize_maps, pointing_game
from .base import Interpreter, upsample_maps


def held_out_images_with_boxes(splits, max_images: Optional[int] = None):
    """(images (N, 3, H, W), labels (N,), boxes (N, 4)) of the test split images that have a box."""
    boxes = boxes_by_test_index(splits)
    if not boxes:
        raise ValueError("this data set records no object boxes (only the embedded synthetic set does)")
    idx = sorted(boxes)
    if max_images and max_images < len(idx):  # a seeded random subset: indices are sorted by class folder
        keep = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:max_images]
        idx = [idx[i] for i in sorted(keep.tolist())]
    xs, ys = zip(*(splits.test[i] for i in idx), strict=True)
    return torch.stack(xs), torch.tensor(ys), torch.tensor([boxes[i] for i in idx])


@torch.no_grad()
def pointing_rates(
    interpreters: Mapping[str, Interpreter],
    x: torch.Tensor,
    boxes: torch.Tensor,
    *,
    batch_size: int = 100,
    top: float = 0.2,
) -> Dict[str, float]:
    """Per interpreter: the share of images whose top-``top`` map pixels mostly fall in the object box.

    Maps explain each image's predicted class, upsampled to the image size.
    """
    out = {}
    for name, interp in interpreters.items():
        maps = torch.cat(
            [upsample_maps(interp(x[i : i + batch_size]), x.shape[-2:]) for i in range(0, len(x), batch_size)]
        )
        out[name] = pointing_game(maps, boxes, top=top)
    return out


def randomized_copy(classifier: Classifier, seed: int = 0) -> Classifier:
    """A copy of ``classifier`` with every parameter re-initialised (Adebayo et al.'s model randomisation)."""
    twin = copy.deepcopy(classifier)
    torch.manual_seed(seed)
    for m in twin.modules():
        if hasattr(m, "reset_parameters") and m is not twin:
            m.reset_parameters()
    return twin.eval()


@torch.no_grad()
def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two batches of maps, per sample (N,)."""
    ra = normalize_maps(a).flatten(1).argsort(1).argsort(1).float()
    rb = normalize_maps(b).flatten(1).argsort(1).argsort(1).float()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
