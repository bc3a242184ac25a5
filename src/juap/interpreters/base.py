"""The interpreter face every attack relies on, and the map helpers shared by all interpreters.

An :class:`Interpreter` is an ``nn.Module`` called as ``interp(x, classes) -> maps``: images in [0, 1]
(N, 3, H, W) and the classes to explain (N,) give maps (N, h, w) at the interpreter's native
resolution, differentiable w.r.t. the images. :meth:`Interpreter.explain` returns the logits and the
maps of one forward pass, which is what an attack needs for x_hat (its prediction and the map of that
prediction). Maps are compared after :func:`normalize_maps` (eqs 13 and 19 on min-max normalised maps).

An interpreter class declares what an attack and the commands need to know about it, so that none of
them names a concrete interpreter: ``needs_surrogate`` (its maps are built from gradients, so the attack
differentiates them through the smoothed-ReLU surrogate of eq 15), ``requires_checkpoint`` (a learned
model that means nothing untrained, e.g. RTS) and :meth:`Interpreter.encode` (the encoder features of
the paper's extra RTS term; ``None`` by default).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classifiers.base import Classifier
from ..errors import ConfigError
from ..metrics import normalize_maps  # noqa: F401  (re-exported: interpreters' maps are compared normalised)

Classes = torch.Tensor | Sequence[int] | int | None


class Interpreter(nn.Module):
    """Base class: a subclass implements :meth:`explain` (one forward pass -> logits and maps).

    The classifier is a registered submodule, so ``interp.to(device)`` moves it too (and the
    interpreter's ``state_dict`` contains it). Subclasses whose maps do not need the logits (e.g. a
    learned saliency model) may also override :meth:`forward` to skip the classifier.

    A new interpreter is one subclass registered by name (``@INTERPRETERS.register("cam")``); options
    given to :func:`juap.create_interpreter` go to :meth:`create`, which checks them against
    ``option_names``.

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` whose decisions are explained.
    """

    name: ClassVar[str] = "interpreter"
    label: ClassVar[str] = "interpreter"  # the name in tables and figures, e.g. "GradCAM"
    option_names: ClassVar[Tuple[str, ...]] = ()  # keyword options that create() accepts
    needs_surrogate: ClassVar[bool] = False  # maps from gradients: attack through the surrogate (eq 15)
    requires_checkpoint: ClassVar[bool] = False  # a learned model: create() needs checkpoint=PATH
    evaluation_only: ClassVar[bool] = False  # maps without a graph (a peer library's): no attack trains on it
    checkpoint: Optional[str] = None  # the trained weights' file, for a learned model

    @classmethod
    def create(cls, classifier: Classifier, **options) -> Interpreter:
        """The interpreter for ``classifier``; unknown options are a ConfigError naming the allowed ones."""
        check_options(cls.name, options, cls.option_names)
        return cls(classifier, **options)

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        if not isinstance(classifier, Classifier):
            raise ConfigError(
                "an interpreter needs a juap Classifier (see juap.create_classifier), "
                f"got {type(classifier).__name__}"
            )
        self.classifier = classifier

    def forward(self, x: torch.Tensor, classes: Classes = None) -> torch.Tensor:
        """Maps of ``classes`` for images ``x``.

        Args:
            x: images in [0, 1], (N, 3, H, W).
            classes: class indices to explain, (N,) integer tensor (or a sequence / one int for all);
                ``None`` explains the predicted class.

        Returns:
            Raw maps (N, h, w) at the interpreter's native resolution (not normalised).
        """
        return self.explain(x, classes)[1]

    def explain(self, x: torch.Tensor, classes: Classes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and maps from one forward pass.

        Args:
            x: images in [0, 1], (N, 3, H, W).
            classes: (N,) classes to explain; ``None`` explains ``logits.argmax(1)``.

        Returns:
            ``(logits, maps)``: (N, C) and (N, h, w).
        """
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Encoder features e(x) (N, K, h, w) for the attack's ``||e(x_hat) - e(x)||_2`` term; ``None`` when
        the interpreter has no encoder of its own (CAM, Grad-CAM)."""
        return None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trained weights of a learned interpreter (``requires_checkpoint``) for
        ``create(classifier, checkpoint=path)``; the others have nothing to save."""
        raise NotImplementedError(f"interpreter {self.name!r} is not a learned model: it has nothing to save")

    def extra_repr(self) -> str:
        return f"classifier={self.classifier.arch!r}"


def resolve_classes(logits: torch.Tensor, classes: Classes) -> torch.Tensor:
    """Check the classes to explain, or take the predicted ones.

    Args:
        logits: (N, C) logits of the images being explained.
        classes: ``None`` (explain the argmax), one int (for every image), a sequence of N ints, or an
            integer tensor of shape (N,).

    Returns:
        LongTensor (N,) on the logits' device.

    Raises:
        ConfigError: wrong shape, non-integer dtype, or an index outside [0, C).
    """
    n, num_classes = logits.shape
    if classes is None:
        return logits.argmax(dim=1)
    if isinstance(classes, int):
        classes = torch.full((n,), classes, dtype=torch.long, device=logits.device)
    classes = torch.as_tensor(classes, device=logits.device)
    if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
        raise ConfigError(f"classes must be integer class indices, got dtype {classes.dtype}")
    if classes.dim() == 0:
        classes = classes.expand(n)
    if tuple(classes.shape) != (n,):
        raise ConfigError(f"classes must have shape ({n},) (one class per image), got {tuple(classes.shape)}")
    bad = (classes < 0) | (classes >= num_classes)
    if bool(bad.any()):  # one host sync: an out-of-range gather would fail on the device, unreadably
        raise ConfigError(
            f"class indices must lie in [0, {num_classes}) for this classifier with {num_classes} classes, "
            f"got {classes[bad].tolist()[:5]}"
        )
    return classes.long()


def upsample_maps(maps: torch.Tensor, size: int | Iterable[int]) -> torch.Tensor:
    """Bilinear resize of maps to the image size, for display and overlays.

    Args:
        maps: (N, h, w).
        size: target ``(H, W)`` or one int for a square.

    Returns:
        (N, H, W) maps.
    """
    if maps.dim() != 3:
        raise ValueError(f"expected maps of shape (N, h, w), got {tuple(maps.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def check_options(name: str, options: dict, allowed: Sequence[str]) -> None:
    """Raise a :class:`ConfigError` naming the allowed options if ``options`` has others."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"interpreter {name!r} got unknown option(s) {unknown}; allowed: {known}")


def split_spec(spec: str) -> Tuple[str, dict]:
    """``"name@layer"`` -> ``("name", {"layer": "layer"})``; a plain name -> ``(name, {})``.

    The one way a config names an interpreter at another layer (e.g. ``gradcam@blocks.4``,
    ``pgc:layercam@layer3``), in ``evaluate.interpreters`` and ``juap evaluate --interpreters``.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"an interpreter is named by a string such as 'cam' or 'gradcam@layer3': {spec!r}")
    name, sep, layer = spec.partition("@")
    if sep and not layer:
        raise ConfigError(f"interpreter {spec!r}: give the layer after '@', e.g. 'gradcam@layer3'")
    return name, ({"layer": layer} if sep else {})
