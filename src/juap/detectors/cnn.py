"""A learned detector: a small CNN on the image and its map, in the spirit of Zhang et al. 2018
("Detecting adversarial perturbations with saliency")."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import DETECTORS
from .._validate import Param
from ..classifiers.base import Classifier
from ..errors import NumericalError
from ..interpreters.base import Interpreter, upsample_maps
from ..metrics import normalize_maps
from ..runtime.loop import Trainer, TrainLoop
from .base import Detector


def detector_input(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The CNN's input: the image and its min-max normalised map upsampled to the image size.

    Args:
        x: images (N, 3, H, W) in [0, 1].
        maps: raw maps (N, h, w).

    Returns:
        (N, 4, H, W).
    """
    m = upsample_maps(normalize_maps(maps), x.shape[-2:]).to(x.dtype)  # (N, H, W) in [0, 1]
    return torch.cat([x, m.unsqueeze(1)], 1)


@DETECTORS.register("cnn")
class CNNDetector(Detector):
    """Three stride-2 3x3 convolutions (``width``, 2x, 4x channels, ReLU), global average pooling and a
    linear output, on :func:`detector_input`; any image size works (64 and 224 px alike). Trained with
    Adam on the class-balanced binary cross-entropy, seeded.

    Args:
        classifier: the inspected classifier.
        interpreter: the interpreter whose maps are read.
        width: channels of the first convolution.
        steps: Adam steps, each on a batch of the shuffled training images (a fixed count, so that a small
            training set is not left nearly untrained: 5 passes over 160 images were 15 steps).
        lr: Adam's learning rate.
    """

    name = "cnn"
    label = "CNN"
    needs_interpreter = True
    uses_maps = True
    hyperparams = {
        "width": Param(int, low=1, doc="channels of the first convolution"),
        "steps": Param(int, low=1, doc="Adam steps (batches of the shuffled training images)"),
        "lr": Param(float, low=0, low_open=True, doc="Adam's learning rate"),
    }

    def __init__(
        self,
        *,
        classifier: Classifier,
        interpreter: Optional[Interpreter] = None,
        width: int = 16,
        steps: int = 300,
        lr: float = 3e-3,
    ) -> None:
        super().__init__(classifier=classifier, interpreter=interpreter, width=width, steps=steps, lr=lr)
        with torch.random.fork_rng(devices=[]):  # no draw from the global RNG: fit() seeds the weights
            torch.manual_seed(0)
            w = width
            self.net = nn.Sequential(
                nn.Conv2d(4, w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4 * w, 1),
            )

    def _score(self, x, logits, maps) -> torch.Tensor:
        return self.net(detector_input(x, maps)).squeeze(1)  # (N,)

    @torch.no_grad()
    def _maps(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Maps (N, h, w) of the predicted classes, on the CPU, without gradients."""
        out = [self.interpreter.explain(x[i : i + batch_size].to(self.device))[1].float().cpu()
               for i in range(0, len(x), batch_size)]  # fmt: skip
        return torch.cat(out)

    def _fit(self, benign, adversarial, *, seed, progress, batch_size) -> None:
        x = torch.cat([benign, adversarial]).cpu()
        maps = torch.cat([self._maps(benign, batch_size), self._maps(adversarial, batch_size)])
        y = torch.cat([torch.zeros(len(benign)), torch.ones(len(adversarial))])
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the global RNG alone
            torch.manual_seed(seed)
            self.net.cpu()
            for m in self.net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.net.to(self.device)
        trainer = CNNTrainer(self, x, maps, y, seed=seed, batch_size=batch_size)
        TrainLoop(f"detector {self.name}", unit="step", progress=progress).train(trainer, None)


class CNNTrainer(Trainer):
    """Adam on the class-balanced BCE of a :class:`CNNDetector`, one batch per step, reshuffled after each
    pass (the loop engine gives the progress bar and the NaN roll-back).

    Args:
        detector: the detector whose ``net`` is trained.
        x, maps, y: training images (N, 3, H, W), their maps (N, h, w) and labels (N,) in {0, 1}, on the CPU.
        seed: the data order's seed.
        batch_size: images per step.
    """

    unit = "step"

    def __init__(self, detector: CNNDetector, x, maps, y, *, seed: int, batch_size: int) -> None:
        self.det, self.x, self.maps, self.y, self.batch_size = detector, x, maps, y, batch_size
        n_pos = float(y.sum())
        self.weights = torch.where(y > 0.5, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos)))
        self.data_order = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(len(y), generator=self.data_order), 0

    @property
    def num_steps(self) -> int:
        return self.det.hparams["steps"]

    def init(self, data: Any, val_data: Any = None, *, progress: bool = True) -> None:
        self.optimizer = torch.optim.Adam(self.det.net.parameters(), lr=self.det.hparams["lr"])

    def step(self, i: int) -> Dict[str, float]:
        if self.position >= len(self.order):  # a pass is over: a new order
            self.order, self.position = torch.randperm(len(self.y), generator=self.data_order), 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        device = self.det.device
        x, maps = self.x[idx].to(device), self.maps[idx].to(device)
        y, w = self.y[idx].to(device), self.weights[idx].to(device)
        loss = (
            w * F.binary_cross_entropy_with_logits(self.det._score(x, None, maps), y, reduction="none")
        ).mean()
        if not torch.isfinite(loss):
            raise NumericalError(f"the CNN detector's loss is {loss.item()} at step {i}")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def state_dict(self) -> Dict[str, Any]:
        return {"net": {k: v.clone() for k, v in self.det.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.det.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])

    def result(self) -> Dict[str, Any]:
        return {"loss": self.loop.history[-1]["loss"] if self.loop and self.loop.history else None}
