"""Opt-in GPU fast paths of a generator attack's training step, each with a safe fallback.

* ``amp``: bf16 autocast of the step's forward passes (the generator, the classifier, the maps and
  Grad-CAM's ``create_graph`` gradient); losses are taken in float32. On CPU it runs too (slowly on
  most CPUs); on a GPU without bf16 support it is refused.
* ``channels_last``: the generator, the training copy of the classifier and the images in NHWC layout.
* ``compile``: ``torch.compile`` of the generator and of the training classifier's feature extractor
  (the part the double backward of Grad-CAM does not go through twice). If compiling or the first
  compiled step fails (double backward through compiled graphs is not supported everywhere), a warning
  says so and training continues eagerly.

The unmodified classifier that judges (the benign maps, validation, evaluation) is never changed: the
fast paths act on a copy used only for gradients.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Any, Callable, Optional, Tuple

import torch

from ..errors import ConfigError
from .base import rebind

log = logging.getLogger(__name__)


class FastPaths:
    """The fast paths chosen for one training run (all off by default).

    Args:
        amp: bf16 autocast of the training step.
        channels_last: NHWC memory layout for the generator, the training classifier and the images.
        compile: ``torch.compile`` the generator and the training classifier's ``forward_features``.
        device: the training device (autocast's device type).
    """

    def __init__(
        self, *, amp: bool = False, channels_last: bool = False, compile: bool = False, device: torch.device
    ) -> None:
        self.amp, self.channels_last, self.compile = bool(amp), bool(channels_last), bool(compile)
        self.device = torch.device(device)
        if self.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("amp (bf16 autocast) needs a GPU with bfloat16 support; set amp: false")
        self._eager: Optional[Tuple[torch.nn.Module, Any]] = None
        self._checked = False

    @property
    def any(self) -> bool:
        return self.amp or self.channels_last or self.compile

    def prepare(self, G: torch.nn.Module, train_interp, classifier) -> Tuple[torch.nn.Module, Any]:
        """The generator to call and the interpreter to train against, with the fast paths applied.

        ``train_interp`` is rebound to a copy of its classifier when it still explains ``classifier``
        (the unmodified one), so the judge is never changed.
        """
        if not (self.channels_last or self.compile) or train_interp is None:
            return self._prepare_generator(G), train_interp
        if train_interp.classifier is classifier:
            train_interp = rebind(train_interp, copy.deepcopy(classifier))
        clf = train_interp.classifier
        self._eager = (G, clf.__dict__.get("forward_features"))
        if self.channels_last:
            clf.to(memory_format=torch.channels_last)
        if self.compile:
            try:
                clf.forward_features = torch.compile(clf.forward_features)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                self._warn(e)
        return self._prepare_generator(G), train_interp

    def _prepare_generator(self, G: torch.nn.Module) -> torch.nn.Module:
        if self.channels_last:
            G.to(memory_format=torch.channels_last)
        if self.compile:
            try:
                return torch.compile(G)
            except Exception as e:  # noqa: BLE001
                self._warn(e)
        return G

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the chosen memory layout."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the training device when ``amp`` is on, else a null context."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def first_step(
        self, step: Callable[[torch.nn.Module, Any], Any], G_fwd: torch.nn.Module, train_interp
    ) -> Tuple[Any, torch.nn.Module, Any]:
        """Run ``step(G_fwd, train_interp)``; if compiled code fails on the first step, warn, undo the
        compilation and run it eagerly. Returns ``(result, G_fwd, train_interp)`` to use from now on.

        The step must fail before changing any parameter (a compiled backward fails before the
        optimiser's step), so running it again eagerly is the same step.
        """
        if not self.compile or self._checked:
            return step(G_fwd, train_interp), G_fwd, train_interp
        self._checked = True
        try:
            return step(G_fwd, train_interp), G_fwd, train_interp
        except Exception as e:  # noqa: BLE001 - torch.compile raises many kinds; fall back on any
            if isinstance(e, ConfigError):
                raise
            self._warn(e)
            G_eager = getattr(G_fwd, "_orig_mod", G_fwd)
            if train_interp is not None and self._eager is not None:
                train_interp.classifier.__dict__.pop("forward_features", None)
                if self._eager[1] is not None:
                    train_interp.classifier.forward_features = self._eager[1]
            return step(G_eager, train_interp), G_eager, train_interp

    def _warn(self, e: BaseException) -> None:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"torch.compile is not usable for this attack's training step ({type(e).__name__}: {msg}); "
            "continuing without compile",
            RuntimeWarning,
            stacklevel=3,
        )
