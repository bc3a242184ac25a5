"""Linear detectors: standardised statistics of the input, then a logistic head (:func:`fit_logistic`)."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from .._validate import Param
from ..classifiers.base import Classifier
from ..interpreters.base import Interpreter
from .base import Detector
from .logistic import fit_logistic, standardization


class LinearDetector(Detector):
    """``score = ((s(x) - mean) / std) @ w + b`` for statistics ``s`` (N, F) that a subclass computes.

    ``mean`` and ``std`` come from the training statistics (``standardize_on = "train"``) or from those of
    the clean training images alone (``"clean"``); ``w`` and ``b`` from :func:`fit_logistic` (L-BFGS in
    float64, full batch, equal class weights, L2 ``weight_decay``). Deterministic: ``seed`` is unused.

    Args:
        weight_decay: L2 penalty on the weights.
        max_iter: L-BFGS iterations.
    """

    standardize_on: ClassVar[str] = "train"
    hyperparams = {
        "weight_decay": Param(float, low=0, doc="L2 penalty on the logistic weights"),
        "max_iter": Param(int, low=1, doc="L-BFGS iterations"),
    }

    def __init__(
        self,
        *,
        classifier: Classifier,
        interpreter: Optional[Interpreter] = None,
        weight_decay: float = 1e-2,
        max_iter: int = 200,
    ) -> None:
        super().__init__(
            classifier=classifier, interpreter=interpreter, weight_decay=weight_decay, max_iter=max_iter
        )
        f = self.num_features
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("std", torch.ones(f))
        self.register_buffer("weight", torch.zeros(f))
        self.register_buffer("bias", torch.zeros(()))

    @property
    def num_features(self) -> int:
        """F, the number of statistics."""
        raise NotImplementedError

    def statistics(
        self, x: torch.Tensor, logits: Optional[torch.Tensor], maps: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The statistics (N, F) of images (N, 3, H, W) with their logits (N, C) and maps (N, h, w)."""
        raise NotImplementedError

    def _score(self, x, logits, maps) -> torch.Tensor:
        s = self.statistics(x, logits, maps)  # (N, F)
        z = (s - self.mean.to(s.dtype)) / self.std.to(s.dtype)
        return z @ self.weight.to(s.dtype) + self.bias.to(s.dtype)  # (N,)

    @torch.no_grad()
    def _features(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Statistics (N, F) in float64 on the CPU, computed in batches without gradients."""
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(self.device)
            out.append(self.statistics(xb, *self._inputs(xb, None, None)).double().cpu())
        return torch.cat(out)

    def _fit(self, benign, adversarial, *, seed, progress, batch_size) -> None:
        fb, fa = self._features(benign, batch_size), self._features(adversarial, batch_size)
        feats = torch.cat([fb, fa])  # (N0 + N1, F)
        labels = torch.cat([torch.zeros(len(fb)), torch.ones(len(fa))])
        mean, std = standardization(fb if self.standardize_on == "clean" else feats)
        w, b = fit_logistic(
            (feats - mean) / std,
            labels,
            weight_decay=self.hparams["weight_decay"],
            max_iter=self.hparams["max_iter"],
        )
        for name, value in (("mean", mean), ("std", std), ("weight", w), ("bias", b)):
            getattr(self, name).copy_(value)  # float64 -> the buffer's float32, on its device
