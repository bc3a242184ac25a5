"""Attack bases: hyperparameters in keyword-only constructor arguments, data per call (foolbox style).

A universal attack learns one perturbation from data: ``attack.fit(data) -> n_hat`` (3, H, W) in
[0, 1] pixel units, then ``attack.perturb(x)`` applies it. A per-image attack is called directly:
``attack(x, y) -> x_adv``. Budgets are given in the paper's 0-255 units (``eps``) and converted
once (the paper's eq 6 works in [0, 1] units); images are in [0, 1], and no attack knows about mean/std.

Each attack class declares what orchestration needs to know about it, so that no command names a
concrete attack: ``label`` (its name in tables), ``takes_interpreter``, ``hyperparams`` (the typed,
checked :class:`~juap._validate.Param` of every keyword argument besides classifier, norm, eps,
interpreter and device) and ``artifacts`` (what a run saves of it: ``"perturbation"``, ``"generator"``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._validate import Param, check_params
from ..budget import apply_perturbation, check_budget, eps_to_unit
from ..classifiers.base import Classifier
from ..data.batches import check_images as _check_images  # noqa: F401  (re-exported for the attacks)
from ..data.batches import cycle_batches, first_images, iter_batches  # noqa: F401
from ..errors import CheckpointError, ConfigError
from ..interpreters.base import Interpreter

COMMON_ARGS = ("classifier", "norm", "eps", "interpreter", "device")
"""The arguments every attack constructor shares, outside ``hyperparams`` (``interpreter`` only where
``takes_interpreter``)."""


class Attack:
    """Common state of every attack: the classifier under attack and the budget.

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` to fool. Its weights are never changed, but
            it is put in eval mode and its parameters stop requiring gradients (in place: the attack only
            needs gradients w.r.t. images).
        norm: ``"linf"`` or ``"l2"``.
        eps: the budget zeta in 0-255 pixel units (e.g. 10 for L_inf, 2000 for L_2 at 224x224).
        device: where to compute; default: the classifier's device.
    """

    name: ClassVar[str] = "attack"
    label: ClassVar[str] = "attack"  # the name in tables and figures, e.g. "SGD-UAP"
    universal: ClassVar[bool] = False
    takes_interpreter: ClassVar[bool] = False  # whether an interpreter is passed (and crossed by grids)
    hyperparams: ClassVar[Mapping[str, Param]] = {}  # every keyword argument but the common ones
    artifacts: ClassVar[Tuple[str, ...]] = ()  # what a run saves: "perturbation", "generator"
    generator_in_label: ClassVar[str] = "suffix"  # several generators: "R-JUAP" (prefix), "GUAP-resnet"

    def __init__(
        self,
        *,
        classifier: Classifier,
        norm: str = "linf",
        eps: float = 10.0,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if not isinstance(classifier, Classifier):
            raise ConfigError(
                f"{self.name} needs a juap Classifier (juap.create_classifier), "
                f"got {type(classifier).__name__}"
            )
        check_budget(norm, eps)
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.norm = norm
        self.eps = float(eps)
        self.device = torch.device(device) if device is not None else _module_device(classifier)

    @classmethod
    def check_hyperparams(cls, params: Mapping[str, Any]) -> None:
        """Raise a ConfigError unless ``params`` are declared in ``hyperparams`` and fit their declarations
        (a required one, e.g. GUAP-C_t's ``target``, must be given)."""
        check_params(f"attack {cls.name!r}", cls.hyperparams, params)

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """The declared defaults (required hyperparameters left out)."""
        return {k: p.default for k, p in cls.hyperparams.items() if not p.required}

    @property
    def zeta(self) -> float:
        """The budget in [0, 1] pixel units."""
        return eps_to_unit(self.eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps:g})"


class UniversalAttack(Attack):
    """An attack that learns one image-agnostic perturbation (:meth:`fit`)."""

    universal = True
    artifacts = ("perturbation",)

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.perturbation: Optional[torch.Tensor] = None
        self.history: list = []

    def fit(
        self, data, *, val_data=None, progress: bool = True, checkpoint=None, callback=None, log=None
    ) -> torch.Tensor:
        """Learn the perturbation from ``data`` (a loader of ``(x, y, ...)`` or an image tensor (N, 3, H, W)).

        Every universal attack has this signature and runs in the loop engine (:mod:`juap.runtime.loop`).

        Args:
            val_data: held-out images to choose the best perturbation on (attacks that do not choose
                ignore it).
            progress: show a progress bar.
            checkpoint: a :class:`~juap.runtime.loop.Checkpointing` (folder, cadence, resume).
            callback: ``callback(step, perturbation)`` after every step; ``perturbation()`` returns the
                current n_hat. An exception it raises stops the fit.
            log: receives every history row, e.g. a :class:`~juap.app.history.RunLog`.

        Returns:
            The perturbation n_hat (3, H, W) in [0, 1] pixel units, within the budget.
        """
        raise NotImplementedError

    def checkpoint_identity(self) -> Dict[str, Any]:
        """The settings that must match for a checkpoint of this attack to be resumed."""
        keys = ("seed", "batch_size")
        return {
            "attack": self.name,
            "norm": self.norm,
            "eps": self.eps,
            **{k: getattr(self, k, None) for k in keys},
        }

    def check_identity(self, saved: Mapping[str, Any]) -> None:
        """Refuse a checkpoint written with other settings (:meth:`checkpoint_identity`), naming them."""
        diff = {k: (saved.get(k), v) for k, v in self.checkpoint_identity().items() if saved.get(k) != v}
        if diff:
            raise CheckpointError(
                f"the {self.name} checkpoint was written by another attack setup, so it cannot be resumed: "
                + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + ". Resume with the same config, or start a new run folder"
            )

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(x + n_hat, 0, 1)`` with the learned perturbation."""
        if self.perturbation is None:
            raise RuntimeError(f"{self.name}: call fit(data) before perturb(x)")
        return apply_perturbation(x, self.perturbation.to(x.device))


class PerImageAttack(Attack):
    """An attack that crafts one perturbation per image: ``attack(x, y) -> x_adv``."""

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


def rebind(interpreter: Interpreter, classifier: Classifier) -> Interpreter:
    """A shallow copy of ``interpreter`` that explains ``classifier`` (e.g. the smoothed surrogate)."""
    twin = copy.copy(interpreter)
    twin._modules = dict(interpreter._modules)
    twin._modules["classifier"] = classifier
    return twin


def _module_device(m: nn.Module) -> torch.device:
    p = next(iter(m.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
