"""juap: joint universal adversarial perturbations against classifiers and their interpreters."""

from . import attacks, detectors, generators, interpreters  # noqa: F401
from ._registry import ATTACKS, CLASSIFIERS, DETECTORS, GENERATORS, INTERPRETERS
from .attacks.base import COMMON_ARGS
from .classifiers import Classifier, create_classifier, load_classifier, save_classifier
from .detectors import Detector, load_detector
from .errors import CheckpointError, ConfigError, DataError, JuapError, WeightsUnavailableError
from .evaluation import evaluate

__version__ = "0.2.0"


def list_classifiers() -> list[str]:
    """Names accepted by :func:`create_classifier`."""
    return CLASSIFIERS.names()


def list_interpreters(peers: bool = False) -> list[str]:
    """Names accepted by :func:`create_interpreter`: juap's own (differentiable, an attack can train
    against them) and, with ``peers=True``, the evaluation-only ``pgc:<method>`` / ``captum:<method>``."""
    return INTERPRETERS.names() + (interpreters.peer_names() if peers else [])


def list_attacks() -> list[str]:
    """Names accepted by :func:`create_attack`."""
    return ATTACKS.names()


def list_generators() -> list[str]:
    """Names accepted by :func:`create_generator`."""
    return GENERATORS.names()


def list_detectors() -> list[str]:
    """Names accepted by :func:`create_detector`."""
    return DETECTORS.names()


def create_interpreter(name: str, classifier: Classifier, **kwargs):
    """Build a registered interpreter (CAM, Grad-CAM, RTS, or a peer's ``"pgc:scorecam"``, ...) for
    ``classifier``; options are checked by the class's ``create`` (e.g. ``layer=`` for Grad-CAM and the
    pytorch-grad-cam methods, also written ``"gradcam@layer3"``; ``checkpoint=`` for RTS)."""
    name, options = interpreters.split_spec(name)
    return INTERPRETERS.create(name, classifier, **options, **kwargs)


def create_attack(name: str, **kwargs):
    """Build a registered attack with keyword-only hyperparameters, checked against the class's declared
    ``hyperparams`` first (an unknown name or a bad value is a ConfigError naming it)."""
    cls = ATTACKS.get(name)
    cls.check_hyperparams({k: v for k, v in kwargs.items() if k not in COMMON_ARGS})
    return cls(**kwargs)


def create_detector(name: str, *, classifier: Classifier, interpreter=None, **hyperparams) -> Detector:
    """Build a registered detector (``"map"``, ``"map_conf"``, ``"cnn"``, ``"hyperneuron"``) for
    ``classifier`` (and ``interpreter``, for those that read maps), with keyword-only hyperparameters checked
    against the class's declared ``hyperparams`` first (an unknown name or a bad value is a ConfigError)."""
    cls = DETECTORS.get(name)
    cls.check_hyperparams(hyperparams)
    return cls(classifier=classifier, interpreter=interpreter, **hyperparams)


def create_generator(name: str, **kwargs):
    """Build a registered perturbation generator."""
    return GENERATORS.create(name, **kwargs)


__all__ = [
    "CheckpointError",
    "Classifier",
    "ConfigError",
    "DataError",
    "Detector",
    "JuapError",
    "WeightsUnavailableError",
    "create_attack",
    "evaluate",
    "create_classifier",
    "create_detector",
    "create_generator",
    "create_interpreter",
    "list_attacks",
    "list_classifiers",
    "list_detectors",
    "list_generators",
    "list_interpreters",
    "load_classifier",
    "load_detector",
    "save_classifier",
]
