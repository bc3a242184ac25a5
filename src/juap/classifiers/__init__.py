"""Classifiers: GAP + linear CNNs on images in [0, 1] that expose what CAM and Grad-CAM need."""

from . import efficientnet  # noqa: F401  (registers efficientnet_lite0)
from .base import (
    Classifier,
    DenseNetClassifier,
    ForwardFeaturesClassifier,
    HookedClassifier,
    ResNetClassifier,
)
from .factory import create_classifier, load_classifier, save_classifier
from .small_resnet import SmallResNet

__all__ = [
    "Classifier",
    "DenseNetClassifier",
    "ForwardFeaturesClassifier",
    "HookedClassifier",
    "ResNetClassifier",
    "SmallResNet",
    "create_classifier",
    "load_classifier",
    "save_classifier",
]
