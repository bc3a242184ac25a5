"""The detector face: a differentiable module that scores inputs, with a threshold calibrated on clean images.

A :class:`Detector` sees only the suspect input (and the model), never the clean image (SPEC section 5).
``score(x)`` is differentiable in ``x`` and in the logits / maps an attacker passes in, so a detector can
sit in an attack's loss. A subclass writes :meth:`Detector._score` (the score from the input, its logits
and maps) and :meth:`Detector._fit` (training on benign and adversarial images); the base does the
checks, fills in the logits and maps the detector uses, calibrates, saves and loads.

The classifier and interpreter are referenced, not owned: they are not in the detector's ``state_dict``
(a saved detector holds its own tensors only, with the classifier's fingerprint) and ``detector.to()``
does not move them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._registry import DETECTORS
from .._validate import Param, check_params
from ..classifiers.base import Classifier
from ..errors import CheckpointError, ConfigError
from ..interpreters.base import Interpreter
from ..metrics import calibrate_threshold
from ..runtime.config import signature_defaults
from ..runtime.io import load_tensors, read_metadata, save_tensors
from ..runtime.provenance import check_classifier_record, classifier_record

FORMAT = "juap-detector"
FORMAT_VERSION = 1
Inputs = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]  # (logits (N, C), maps (N, h, w))


class Detector(nn.Module):
    """Base class of the registered detectors (``juap.create_detector(name, classifier=..., ...)``).

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` whose inputs are inspected.
        interpreter: the interpreter whose maps the detector reads (it must explain ``classifier``);
            required when the class ``needs_interpreter``, ignored (kept as None) otherwise.
        **hyperparams: the class's declared ``hyperparams`` (keyword-only in each subclass).

    Attributes:
        threshold: scalar buffer, NaN until :meth:`calibrate`; saved with the detector.
        scale: scalar buffer, the standard deviation of the clean calibration scores (NaN before
            :meth:`calibrate`): the score's natural unit, which an attacker's term divides by.
        fpr: the false-positive rate the threshold was calibrated at (None before).
        image_size: ``(H, W)`` of the training images (None before :meth:`fit`); saved.
    """

    name: ClassVar[str] = "detector"
    label: ClassVar[str] = "detector"  # the name in tables, e.g. "map+conf"
    needs_interpreter: ClassVar[bool] = True
    uses_logits: ClassVar[bool] = False  # _score reads the logits: score() computes them when not given
    uses_maps: ClassVar[bool] = False  # _score reads the maps of the predicted class
    hyperparams: ClassVar[Mapping[str, Param]] = {}  # declared without defaults: the signature's are taken

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        defaults = signature_defaults(cls)
        cls.hyperparams = {
            k: dataclasses.replace(p, default=defaults[k]) if k in defaults else p
            for k, p in cls.hyperparams.items()
        }

    @classmethod
    def check_hyperparams(cls, params: Mapping[str, Any]) -> None:
        """Raise a ConfigError naming ``detector 'name'.key`` for an unknown key or a bad value."""
        check_params(f"detector {cls.name!r}", cls.hyperparams, params)

    def __init__(
        self, *, classifier: Classifier, interpreter: Optional[Interpreter] = None, **hyperparams: Any
    ) -> None:
        super().__init__()
        if not isinstance(classifier, Classifier):
            raise ConfigError(
                f"detector {self.name!r} needs a juap Classifier (juap.create_classifier), "
                f"got {type(classifier).__name__}"
            )
        if self.needs_interpreter and not isinstance(interpreter, Interpreter):
            raise ConfigError(
                f"detector {self.name!r} reads maps: pass interpreter=juap.create_interpreter(name, "
                f"classifier), got {type(interpreter).__name__}"
            )
        self.check_hyperparams(hyperparams)
        # referenced, not registered as submodules: not saved with the detector, not moved by .to()
        object.__setattr__(self, "classifier", classifier)
        object.__setattr__(self, "interpreter", interpreter if self.needs_interpreter else None)
        self.hparams: Dict[str, Any] = dict(hyperparams)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("scale", torch.tensor(float("nan")))
        self.fpr: Optional[float] = None
        self.image_size: Optional[Tuple[int, int]] = None
        self.fitted = False

    # -- the hooks a subclass writes -------------------------------------------------------------------
    def _score(
        self, x: torch.Tensor, logits: Optional[torch.Tensor], maps: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The score (N,) from images (N, 3, H, W), their logits (N, C) and maps (N, h, w) (those used)."""
        raise NotImplementedError

    def _fit(
        self, benign: torch.Tensor, adversarial: torch.Tensor, *, seed: int, progress: bool, batch_size: int
    ) -> None:
        """Train on benign (label 0) and adversarial (label 1) images, both classes weighted equally."""
        raise NotImplementedError

    # -- scoring ---------------------------------------------------------------------------------------
    def score(
        self, x: torch.Tensor, *, logits: Optional[torch.Tensor] = None, maps: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Scores (N,), higher = more adversarial; differentiable in ``x`` and in the given logits / maps.

        Args:
            x: images (N, 3, H, W) in [0, 1], of the size the detector was fitted at.
            logits: (N, C) logits of ``x``, e.g. an attacker's surrogate's (carrying second-order
                gradients); computed with ``self.classifier`` when the detector uses them and they are None.
            maps: (N, h, w) raw maps of the predicted classes; computed with ``self.interpreter`` when used
                and None.

        Raises:
            ConfigError: not fitted yet, or inputs of the wrong shape or size.
        """
        if not self.fitted:
            raise ConfigError(
                f"detector {self.name!r} is not fitted yet: call fit(benign, adversarial) or load_detector()"
            )
        self._check_images(x, "x")
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            h, w = self.image_size
            raise ConfigError(
                f"detector {self.name!r} was fitted on {h}x{w} images, got {x.shape[-2]}x{x.shape[-1]}: "
                "resize the images to its size, or fit a detector at this size"
            )
        logits, maps = self._inputs(x, logits, maps)
        return self._score(x, logits, maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``score(x)``."""
        return self.score(x)

    def _inputs(
        self, x: torch.Tensor, logits: Optional[torch.Tensor], maps: Optional[torch.Tensor]
    ) -> Inputs:
        """The logits and maps the detector uses: the given ones, the others computed from ``x``."""
        n = x.shape[0]
        if maps is not None and (maps.dim() != 3 or maps.shape[0] != n):
            raise ConfigError(f"maps must have shape ({n}, h, w) (one per image), got {tuple(maps.shape)}")
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != n):
            raise ConfigError(
                f"logits must have shape ({n}, C) (one row per image), got {tuple(logits.shape)}"
            )
        if self.uses_maps and maps is None:
            computed, maps = self.interpreter.explain(x)  # (N, C), (N, h, w) of the predicted classes
            logits = computed if logits is None else logits
        if self.uses_logits and logits is None:
            logits = self.classifier(x)
        return logits, maps

    # -- training and calibration ----------------------------------------------------------------------
    def fit(
        self,
        benign: torch.Tensor,
        adversarial: torch.Tensor,
        *,
        seed: int = 0,
        progress: bool = False,
        batch_size: int = 64,
    ) -> Detector:
        """Train the detector on benign (label 0) and adversarial (label 1) images; resets the threshold.

        Args:
            benign: images (N0, 3, H, W) in [0, 1].
            adversarial: images (N1, 3, H, W) in [0, 1], of the same size.
            seed: seeds every random choice of the fit (deterministic for a seed on the CPU).
            progress: show a progress bar where training takes steps.
            batch_size: images per forward pass.

        Returns:
            ``self``, on the classifier's device.

        Raises:
            ConfigError: one class only, or images of the wrong shape or of two sizes.
        """
        if len(benign) == 0 or len(adversarial) == 0:
            raise ConfigError(
                f"the detector needs benign and adversarial training examples, got one class only "
                f"({len(benign)} benign, {len(adversarial)} adversarial)"
            )
        self._check_images(benign, "benign")
        self._check_images(adversarial, "adversarial")
        if benign.shape[-2:] != adversarial.shape[-2:]:
            raise ConfigError(
                f"benign and adversarial images must have one size, got {tuple(benign.shape[-2:])} and "
                f"{tuple(adversarial.shape[-2:])}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size = {batch_size!r} is out of range; it must be >= 1")
        self.to(self.device)
        self.threshold.fill_(float("nan"))
        self.scale.fill_(float("nan"))
        self.fpr = None
        self.image_size = (int(benign.shape[-2]), int(benign.shape[-1]))
        self._fit(benign, adversarial, seed=seed, progress=progress, batch_size=batch_size)
        self.fitted = True
        return self

    def calibrate(self, clean: torch.Tensor, *, fpr: float, batch_size: int = 64) -> float:
        """Set the threshold at false-positive rate ``fpr`` from held-out clean images
        (:func:`~juap.metrics.calibrate_threshold`) and return it.

        Args:
            clean: clean images (N, 3, H, W) in [0, 1] not used in :meth:`fit`; N >= ceil(1 / fpr).
            fpr: the false-positive rate, in (0, 1).
        """
        scores = self.scores(clean, batch_size=batch_size)
        t = calibrate_threshold(scores, fpr)
        self.threshold.fill_(t)
        self.scale.fill_(float(scores.double().std().clamp_min(1e-6)))
        self.fpr = float(fpr)
        return t

    def flags(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        """bool (N,): ``score(x, **kw) > threshold``. ConfigError before :meth:`calibrate`."""
        if self.fpr is None or math.isnan(float(self.threshold)):
            raise ConfigError(
                f"detector {self.name!r} has no threshold yet: call calibrate(clean_images, fpr=0.05) first"
            )
        return self.score(x, **kw) > self.threshold

    @torch.no_grad()
    def scores(self, x: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        """Scores (N,) on the CPU, computed in batches without gradients (for evaluation)."""
        out = [self.score(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    @property
    def device(self) -> torch.device:
        """The classifier's device (where the detector computes)."""
        return next(self.classifier.parameters()).device

    def _check_images(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"{what} must be images (N, 3, H, W) in [0, 1], got {shape}")

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector (its tensors, threshold, hyperparameters, image size and the classifier's
        fingerprint) as safetensors, atomically; :func:`load_detector` reads it back."""
        if not self.fitted:
            raise ConfigError(f"detector {self.name!r} is not fitted: fit it before saving it")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "detector": self.name,
            "hyperparams": self.hparams,
            **classifier_record(self.classifier),
            "interpreter": None if self.interpreter is None else self.interpreter.name,
            "fpr": self.fpr,
            "image_size": list(self.image_size),
        }
        return save_tensors(path, self.state_dict(), meta)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def load_detector(
    path: str | os.PathLike,
    classifier: Classifier,
    interpreter: Optional[Interpreter] = None,
    *,
    image_size: Optional[Tuple[int, int]] = None,
) -> Detector:
    """Load a detector written by :meth:`Detector.save` for the classifier (and interpreter) it was fitted on.

    Args:
        path: the detector's ``.safetensors`` file.
        classifier: the classifier it inspects: same architecture, class count and weights as at fit.
        interpreter: an interpreter of the kind it was fitted with (for detectors that read maps).
        image_size: ``(H, W)`` of the images it will score, checked against the size it was fitted at.

    Returns:
        The detector, fitted, with its threshold and FPR, on the classifier's device.

    Raises:
        CheckpointError: not a detector file, fitted for another classifier, with another interpreter kind
            or at another image size, or tensors that do not fit.
    """
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a juap detector file (format {meta.get('format')!r}); save one with "
            "detector.save(path) after detector.fit(...)"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer juap (detector format {meta['format_version']})"
        )
    check_classifier_record(
        meta, classifier, path, what="detector", made="fitted", fix="fit a detector for this classifier"
    )
    try:
        cls = DETECTORS.get(meta.get("detector"))
    except KeyError as e:
        raise CheckpointError(f"detector {path}: {e}; it may come from another juap version") from e
    kind = meta.get("interpreter")
    if cls.needs_interpreter:
        if interpreter is None:
            raise CheckpointError(
                f"detector {path} reads {kind!r} maps: pass interpreter=juap.create_interpreter({kind!r}, "
                "classifier) (the one it was fitted with)"
            )
        if getattr(interpreter, "name", None) != kind:
            raise CheckpointError(
                f"detector {path} was fitted on {kind!r} maps, not {interpreter.name!r} maps: pass a "
                f"{kind!r} interpreter, or fit a detector on {interpreter.name!r} maps"
            )
    saved_size = tuple(meta.get("image_size") or ())
    if image_size is not None and tuple(image_size) != saved_size:
        raise CheckpointError(
            f"detector {path} was fitted on {saved_size[0]}x{saved_size[1]} images, not "
            f"{image_size[0]}x{image_size[1]}: resize the images to its size, or fit a detector at this size"
        )
    try:
        det = cls(classifier=classifier, interpreter=interpreter, **(meta.get("hyperparams") or {}))
    except ConfigError as e:
        raise CheckpointError(f"detector {path} has hyperparameters this juap refuses: {e}") from e
    tensors, _ = load_tensors(path)
    own = det.state_dict()
    if set(own) != set(tensors) or any(tuple(tensors[k].shape) != tuple(own[k].shape) for k in own):
        raise CheckpointError(
            f"detector {path} does not fit a {cls.name!r} detector for this classifier (tensors "
            f"{sorted(tensors)[:4]}...); it may be truncated or from another juap version"
        )
    det.load_state_dict(tensors)
    det.fpr = meta.get("fpr")
    det.image_size = saved_size
    det.fitted = True
    return det.to(det.device).eval()
