"""The classifier face every attack and interpreter relies on.

A :class:`Classifier` takes images in [0, 1] (N, 3, H, W), owns mean/std normalisation and is a
global-average-pool + linear CNN::

    feats  = forward_features(x)   # (N, K, h, w), the last conv map *after* its activation
    logits = forward_head(feats)   # (N, C) = fc(GAP(feats))

which is exactly what CAM (eq 10) and Grad-CAM (eq 11) need. The wrapped network keeps its native
parameter names under ``.model``, so torchvision/timm state dicts load unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """Base class: subclasses implement :meth:`features` (normalised input -> activated feature map).

    Args:
        model: the wrapped network (its parameters keep their native names).
        fc: the final linear layer (a submodule of ``model``).
        arch: registered architecture name, stored in checkpoints.
        mean, std: per-channel normalisation applied inside the wrapper.
        cam_layer: dotted name (inside ``model``) of the module whose output is the CAM feature map,
            or ``None`` where that map is produced functionally (DenseNet's ``relu(features)``).

    Attributes:
        class_names: the name of each of the head's ``num_classes`` outputs where the weights say
            (a pretrained head, e.g. the 1000 ImageNet names), else ``None``; a new head has none.
    """

    class_names: Optional[List[str]] = None

    def __init__(
        self,
        model: nn.Module,
        *,
        fc: nn.Linear,
        arch: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cam_layer: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.cam_layer = cam_layer
        self._fc_name = next(name for name, m in model.named_modules() if m is fc)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    # -- the face --------------------------------------------------------------------------------
    @property
    def fc(self) -> nn.Linear:
        """The final linear layer; ``fc.weight`` (C, K) are the CAM weights."""
        return self.model.get_submodule(self._fc_name)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @property
    def num_features(self) -> int:
        return self.fc.in_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> normalised input of the wrapped network."""
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images of shape (N, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised input (N, 3, H, W) -> last feature map after its activation (N, K, h, w)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, 3, H, W) -> activated feature map (N, K, h, w)."""
        return self.features(self.normalize(x))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Feature map (N, K, h, w) -> logits (N, C): global average pooling, then the linear layer."""
        return self.fc(F.adaptive_avg_pool2d(feats, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, 3, H, W) -> logits (N, C)."""
        return self.forward_head(self.forward_features(x))

    def replace_head(self, num_classes: int) -> None:
        """Swap the final linear layer for a freshly initialised one with ``num_classes`` outputs."""
        old = self.fc
        new = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        parent_name, _, child = self._fc_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)
        self.class_names = None  # the old head's names do not name the new head's outputs

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}"


class ResNetClassifier(Classifier):
    """torchvision ResNet family: the CAM map is the output of ``layer4`` (its last block ends with ReLU)."""

    def __init__(self, model: nn.Module, **kw) -> None:
        super().__init__(model, fc=model.fc, cam_layer="layer4", **kw)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        m = self.model
        z = m.maxpool(m.relu(m.bn1(m.conv1(z))))
        return m.layer4(m.layer3(m.layer2(m.layer1(z))))


class DenseNetClassifier(Classifier):
    """torchvision DenseNet family: the CAM map is ``relu(features(x))`` (after ``norm5``, functional)."""

    def __init__(self, model: nn.Module, **kw) -> None:
        super().__init__(model, fc=model.classifier, cam_layer=None, **kw)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.model.features(z))


class ForwardFeaturesClassifier(Classifier):
    """Models with timm's face: ``model.forward_features(z)`` returns the activated last feature map.

    Used for timm CNNs and for our own demo :class:`~juap.classifiers.small_resnet.SmallResNet`.
    """

    def features(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(z)


class _StopForward(Exception):
    pass


class HookedClassifier(Classifier):
    """Any torchvision-style GAP + linear CNN: the feature map is captured by a hook, then the forward stops.

    Args:
        feature_layer: dotted module name inside ``model``.
        capture: ``"input"`` to take the input of that module (e.g. the global pool ``avgpool``), or
            ``"output"`` to take its output (e.g. ``features`` of MobileNet/EfficientNet).
    """

    def __init__(self, model: nn.Module, *, feature_layer: str, capture: str, fc: nn.Linear, **kw) -> None:
        if capture not in ("input", "output"):
            raise ValueError(f"capture must be 'input' or 'output', got {capture!r}")
        super().__init__(model, fc=fc, cam_layer=feature_layer if capture == "output" else None, **kw)
        self.feature_layer = feature_layer
        self.capture = capture

    def features(self, z: torch.Tensor) -> torch.Tensor:
        store: dict = {}
        module = self.model.get_submodule(self.feature_layer)

        if self.capture == "input":

            def pre_hook(_m, args):
                store["feats"] = args[0]
                raise _StopForward

            handle = module.register_forward_pre_hook(pre_hook)
        else:

            def hook(_m, _args, out):
                store["feats"] = out
                raise _StopForward

            handle = module.register_forward_hook(hook)
        try:
            self.model(z)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "feats" not in store:
            raise RuntimeError(f"layer {self.feature_layer!r} was not reached in the forward pass")
        return store["feats"]
