"""CAM (Zhou et al. 2016), eq 10: the class's linear weights applied to the last feature map.

Neither pytorch-grad-cam nor Captum implements plain CAM. For a global-average-pool + linear head
d y_c / d A_k(i, j) = w_{c,k} / (h w), so Grad-CAM without its ReLU at the CAM layer equals CAM / (h w);
the tests check CAM that way against Captum's ``LayerGradCam(relu_attributions=False)``.
"""
from __future__ import annotations

import torch

from .._registry import INTERPRETERS
from .base import Classes, Interpreter, resolve_classes


@INTERPRETERS.register("cam")
class CAM(Interpreter):
    """Class activation map, eq 10: ``M_c(i, j) = sum_k w_{c,k} A_k(i, j)``.

    ``A`` is ``classifier.forward_features(x)`` (the last conv map after its activation)
    and ``w = classifier.fc.weight``. The raw map is returned: no ReLU, no normalisation, no bias.

    Args:
        classifier: a global-average-pool + linear :class:`~juap.classifiers.Classifier`.

    Example:
        >>> cam = juap.create_interpreter("cam", clf)
        >>> logits, maps = cam.explain(x)          # (N, C), (N, h, w) for the predicted classes
    """

    name = "cam"
    label = "CAM"

    def explain(self, x: torch.Tensor, classes: Classes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward: logits (N, C) and CAM maps (N, h, w) of ``classes`` (``None``: the predicted ones)."""
        feats = self.classifier.forward_features(x)  # (N, K, h, w)
        logits = self.classifier.forward_head(feats)  # (N, C)
        classes = resolve_classes(logits, classes)  # (N,)
        weights = self.classifier.fc.weight[classes]  # (N, K)
        maps = torch.einsum("nk,nkhw->nhw", weights, feats)
        return logits, maps

