"""The map detectors: statistics of the input's own map (and its prediction's confidence), logistic head.

These are the features of ``juap detect`` (:func:`juap.detection.map_features`), computed differentiably.
"""

from __future__ import annotations

import torch

from .._registry import DETECTORS
from .features import CONF_FEATURES, MAP_FEATURES, confidence_statistics, map_statistics
from .linear import LinearDetector


@DETECTORS.register("map")
class MapDetector(LinearDetector):
    """Statistics of the map of the predicted class (:data:`~juap.detectors.features.MAP_FEATURES`:
    entropy, top-10/30% mass, mean, std, spread, centre distance, total variation, log scale),
    standardised on the training features, then a logistic head.

    Args:
        classifier: the inspected classifier.
        interpreter: the interpreter whose maps are read (CAM, Grad-CAM, RTS, ...).
        weight_decay, max_iter: see :class:`~juap.detectors.linear.LinearDetector`.

    Example:
        >>> det = juap.create_detector("map", classifier=clf, interpreter=cam).fit(x, x_adv)
        >>> det.calibrate(x_clean, fpr=0.05); det.flags(x_test)   # bool (N,)
    """

    name = "map"
    label = "map"
    needs_interpreter = True
    uses_maps = True

    @property
    def num_features(self) -> int:
        return len(MAP_FEATURES)

    def statistics(self, x, logits, maps) -> torch.Tensor:
        return map_statistics(maps)  # (N, 9)


@DETECTORS.register("map_conf")
class MapConfDetector(MapDetector):
    """:class:`MapDetector`'s statistics plus the prediction's confidence
    (:data:`~juap.detectors.features.CONF_FEATURES`: top probability, logit margin, entropy)."""

    name = "map_conf"
    label = "map+conf"
    uses_logits = True

    @property
    def num_features(self) -> int:
        return len(MAP_FEATURES) + len(CONF_FEATURES)

    def statistics(self, x, logits, maps) -> torch.Tensor:
        return torch.cat([map_statistics(maps), confidence_statistics(logits)], 1)  # (N, 12)
