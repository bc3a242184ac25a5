"""A universal-perturbation detector after the idea of HyperNeuron (Co et al. 2021), not a reproduction.

HyperNeuron flags universal perturbations from the activations they cause inside the network. Here:
the per-channel spatial mean and max of the classifier's CAM-layer feature map, standardised with the
mean and std of the *clean* training images, then a logistic head.
"""

from __future__ import annotations

import torch

from .._registry import DETECTORS
from .features import activation_statistics
from .linear import LinearDetector


@DETECTORS.register("hyperneuron")
class HyperNeuronDetector(LinearDetector):
    """After the idea of HyperNeuron: ``A = classifier.forward_features(x)`` (N, K, h, w), statistics
    ``[mean_hw A, max_hw A]`` (N, 2K) standardised on clean training images, logistic head. Needs no
    interpreter; ``logits`` and ``maps`` given to :meth:`score` are not used.

    Args:
        classifier: the inspected classifier (its CAM layer is read).
        interpreter: ignored (kept as None).
        weight_decay, max_iter: see :class:`~juap.detectors.linear.LinearDetector`.
    """

    name = "hyperneuron"
    label = "HyperNeuron-like"
    needs_interpreter = False
    standardize_on = "clean"

    @property
    def num_features(self) -> int:
        return 2 * self.classifier.num_features

    def statistics(self, x, logits, maps) -> torch.Tensor:
        return activation_statistics(self.classifier.forward_features(x))  # (N, 2K)
