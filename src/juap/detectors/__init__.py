"""Differentiable detectors of adversarial inputs: a registry of :class:`Detector` modules.

Importing this package registers ``"map"``, ``"map_conf"``, ``"cnn"`` and ``"hyperneuron"`` for
:func:`juap.create_detector`. Each one scores a suspect input (higher = more adversarial), is trained with
``fit(benign, adversarial)``, calibrated on clean images with ``calibrate(clean, fpr=)`` and saved with its
threshold (``save`` / :func:`load_detector`).
"""

from .base import Detector, load_detector
from .cnn import CNNDetector
from .features import CONF_FEATURES, MAP_FEATURES, confidence_statistics, map_statistics
from .hyperneuron import HyperNeuronDetector
from .linear import LinearDetector
from .logistic import LogisticDetector, fit_logistic
from .maps import MapConfDetector, MapDetector

__all__ = [
    "CNNDetector",
    "CONF_FEATURES",
    "Detector",
    "HyperNeuronDetector",
    "LinearDetector",
    "LogisticDetector",
    "MAP_FEATURES",
    "MapConfDetector",
    "MapDetector",
    "confidence_statistics",
    "fit_logistic",
    "load_detector",
    "map_statistics",
]
