"""Attack bases: hyperparameters in keyword-only constructor arguments, data per call (foolbox style).

A universal attack learns one perturbation from data: ``attack.fit(data) -> n_hat`` (3, H, W) in
[0, 1] pixel units, then ``attack.perturb(x)`` applies it. A per-image attack is called directly:
``attack(x, y) -> x_adv``. Budgets are given in the paper's 0-255 units (``eps``) and converted
once (the paper's eq 6 works in [0, 1] units); images are in [0, 1], and no attack knows about mean/std.

Each attack class declares what orchestration needs to know about it, so that no command names a
concrete attack: ``label`` (its name in tables), ``takes_interpreter``, ``hyperparams`` (the typed,
checked :class:`~juap._validate.Param` of every keyword argument besides classifier, norm, eps,
interpreter and device) and ``artifacts`` (what a run saves of it: ``"perturbation"``, ``"generator"``).
A declaration states the type and range, and the value a dry run uses (``Param(int, low=1, dry_run=1)``:
:meth:`Attack.dry_run_params`); its default is the constructor's (read from the signature when the class is
made), so a default is written once. ``renamed`` maps a hyperparameter's old names to its new ones: the old
name is still declared and accepted (by the checks and the constructor), moved to the new one with a
FutureWarning.

A universal attack is a trainer in the loop engine (:mod:`juap.runtime.loop`). :meth:`UniversalAttack.fit`
is written once, here: it checks the data, runs the loop (resume, checkpoints, NaN/Inf roll-back, the
history) and returns a :class:`FitResult`'s perturbation. A subclass writes only what is its own::

    init(data, val_data)         set up a fit: the state before step 1
    step(i) -> row               one step (an Adam step, an epoch, a pass); a row of scalars for the history
    state_dict() / load_state_dict(state)     what a checkpoint holds (torch's names)
    result() -> FitResult        the perturbation kept, and what was selected
    num_steps                    the loop's length
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._validate import FROM_SIGNATURE, REQUIRED, Param, check_params
from ..budget import apply_perturbation, check_budget, eps_to_unit
from ..classifiers.base import Classifier
from ..data.batches import cycle_batches, first_images, iter_batches  # noqa: F401  (for the attacks)
from ..errors import ConfigError
from ..interpreters.base import Interpreter
from ..runtime.loop import Checkpointing, Trainer, TrainLoop

COMMON_ARGS = ("classifier", "norm", "eps", "interpreter", "device")
"""The arguments every attack constructor shares, outside ``hyperparams`` (``interpreter`` only where
``takes_interpreter``)."""


def _declared_with_signature_defaults(cls, *, own: bool) -> Dict[str, Param]:
    """``cls.hyperparams`` with each default taken from the constructors (the most derived one that names
    the argument); a declaration that no constructor takes is a TypeError, and so is one of the class's
    ``own`` that states a default other than the constructor's (inherited ones just follow it)."""
    renamed = getattr(cls, "renamed", {})
    signature: Dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.name not in signature:
                signature[p.name] = REQUIRED if p.default is inspect.Parameter.empty else p.default
    out = {}
    for key, p in cls.hyperparams.items():
        if key in renamed:  # an old name: declared below, from its new name's declaration
            continue
        if key not in signature:
            raise TypeError(f"{cls.__name__} declares hyperparameter {key!r} but no constructor takes it")
        default = signature[key]
        if own and p.default is not FROM_SIGNATURE and p.default != default:
            raise TypeError(
                f"{cls.__name__}.{key}: declared default {p.default!r}, constructor default {default!r}; "
                "declare it without a default"
            )
        out[key] = dataclasses.replace(p, default=default)
    for old, new in renamed.items():
        if new in out:
            doc = f"the old name of {new!r} (accepted with a FutureWarning)"
            out[old] = dataclasses.replace(out[new], default=None, optional=True, dry_run=None, doc=doc)
    return out


def _accepting_renamed(init: Callable, owner: type) -> Callable:
    """``init`` that takes the old names of ``owner.renamed`` too: each is moved to its new name with a
    FutureWarning (giving both is a ConfigError). The signature stays ``init``'s."""

    @functools.wraps(init)
    def __init__(self, **kw: Any) -> None:
        for old, new in owner.renamed.items():
            if old not in kw:
                continue
            if new in kw:
                raise ConfigError(f"attack {owner.name!r}: give {new} (the new name of {old}), not both")
            warnings.warn(
                f"attack {owner.name!r}: the hyperparameter {old!r} is now called {new!r}; the old name "
                "still works but will be removed: rename it in your config or call",
                FutureWarning,
                stacklevel=2,
            )
            kw[new] = kw.pop(old)
        init(self, **kw)

    return __init__


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
    renamed: ClassVar[Mapping[str, str]] = {}  # old hyperparameter name -> new, still accepted with a warning

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
        self.history: list = []  # rows of the attack's steps, for history.csv (fit's loop, or per batch)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.hyperparams = _declared_with_signature_defaults(cls, own="hyperparams" in cls.__dict__)
        if cls.renamed and "__init__" in cls.__dict__:
            cls.__init__ = _accepting_renamed(cls.__dict__["__init__"], cls)

    def check_arguments(
        self, values: Mapping[str, Any], declared: Optional[Mapping[str, Param]] = None
    ) -> None:
        """Check a constructor's hyperparameters (its ``locals()``) against their declarations."""
        declared = self.hyperparams if declared is None else declared
        check_params(f"attack {self.name!r}", declared, {k: v for k, v in values.items() if k in declared})

    @property
    def hinge_level(self) -> Optional[float]:
        """The level of eq 16's hinge on this attack's loss (drawn on its curves); None: no hinge."""
        return None

    @classmethod
    def check_hyperparams(cls, params: Mapping[str, Any]) -> None:
        """Raise a ConfigError unless ``params`` are declared in ``hyperparams`` and fit their declarations
        (a required one, e.g. GUAP-C_t's ``target``, must be given)."""
        check_params(f"attack {cls.name!r}", cls.hyperparams, params)

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """The declared defaults (required hyperparameters and old names left out)."""
        return {k: p.default for k, p in cls.hyperparams.items() if not p.required and k not in cls.renamed}

    @classmethod
    def dry_run_params(cls, params: Mapping[str, Any]) -> Dict[str, Any]:
        """``params`` for a dry run: every hyperparameter that declares a ``dry_run`` value takes it, whatever
        was given (a mapping is merged into the given one, else into the default: ``{"ngf": 8}`` narrows
        a generator and keeps its other options)."""
        out = dict(params)
        for key, p in cls.hyperparams.items():
            if isinstance(p.dry_run, Mapping):
                out[key] = {**(out.get(key, None if p.required else p.default) or {}), **p.dry_run}
            elif p.dry_run is not None:
                out[key] = p.dry_run
        return out

    @property
    def zeta(self) -> float:
        """The budget in [0, 1] pixel units."""
        return eps_to_unit(self.eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps:g})"


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :meth:`UniversalAttack.fit` learned and chose.

    Attributes:
        perturbation: n_hat (3, H, W) in [0, 1] pixel units, within the budget.
        selected: the step (or epoch, pass) whose perturbation was kept; None: the last one.
        validation: the held-out figures of the kept perturbation (fooling ratio, L1, IoU), when measured.
        train_fooling_rate: the fooling rate on the training data (UAP stops on it), when measured.
        converged: whether the attack reached its own stopping target (UAP), when it has one.
    """

    perturbation: torch.Tensor
    selected: Optional[int] = None
    validation: Optional[Dict[str, float]] = None
    train_fooling_rate: Optional[float] = None
    converged: Optional[bool] = None

    def summary(self) -> Dict[str, Any]:
        """The scalar fields that are set, for a run's ``metrics.json``."""
        out = {"selected": self.selected, "validation": self.validation}
        out.update(train_fooling_rate=self.train_fooling_rate, converged=self.converged)
        return {k: v for k, v in out.items() if v is not None}


class UniversalAttack(Attack, Trainer):
    """An attack that learns one image-agnostic perturbation (:meth:`fit`), a trainer in the loop engine.

    A subclass provides the :class:`~juap.runtime.loop.Trainer` members :meth:`init`, :meth:`step`,
    :meth:`state_dict`, :meth:`load_state_dict`, :meth:`result` (a :class:`FitResult`) and :attr:`num_steps`
    (see the module docstring); optionally :meth:`converged` (stop early), :meth:`restore_state` (what a
    NaN/Inf roll-back reloads), ``optimizer`` (whose learning rate a roll-back lowers), :meth:`after_step`
    and the class attributes below.
    """

    universal = True
    artifacts = ("perturbation",)
    unit: ClassVar[str] = "step"  # what one loop step is: "step", "epoch", "pass"
    shows_loop_bar: ClassVar[bool] = True  # False: the attack draws its own progress bar
    checkpoint_every: int = 1  # the default cadence of checkpoints, in loop steps

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.perturbation: Optional[torch.Tensor] = None
        self.fit_result: Optional[FitResult] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.loop: Optional[TrainLoop] = None
        self._callback: Optional[Callable] = None

    # -- written once: the fit ----------------------------------------------------------------------
    def fit(
        self,
        data,
        *,
        val_data=None,
        progress: bool = True,
        checkpoint: Optional[Checkpointing] = None,
        callback: Optional[Callable[[int, Callable[[], torch.Tensor]], None]] = None,
        log=None,
    ) -> torch.Tensor:
        """Learn the perturbation from ``data`` (a loader of ``(x, y, ...)`` or an image tensor (N, 3, H, W)).

        Args:
            val_data: held-out images to choose the best perturbation on (attacks that do not choose
                ignore it).
            progress: show a progress bar.
            checkpoint: a :class:`~juap.runtime.loop.Checkpointing` (folder, cadence, resume). A resumed fit
                gives the same perturbation as an uninterrupted one (bitwise on CPU, same data and
                settings); a checkpoint of another setup is refused.
            callback: ``callback(count, perturbation)`` as the attack goes (after every step or batch);
                ``perturbation()`` returns the current n_hat. An exception it raises stops the fit
                (benchmarks time attacks this way).
            log: receives every history row, e.g. a :class:`~juap.app.history.RunLog`.

        Returns:
            The perturbation n_hat (3, H, W) in [0, 1] pixel units, within the budget; ``fit_result`` holds
            it with what was selected, ``history`` the rows of the loop.
        """
        if isinstance(data, torch.Tensor) and len(data) == 0:
            raise ConfigError(f"{self.name}: the data is empty: no images to learn a perturbation from")
        self._callback = callback
        self.data_order = _order_generator(data)  # a seeded loader's order depends on its generator's state
        self.loop = TrainLoop(
            self.name,
            self.num_steps,
            checkpoint=checkpoint,
            default_every=self.checkpoint_every,
            log=log,
            progress=progress and self.shows_loop_bar,
            unit=self.unit,
        )
        self.fit_result = self.loop.train(self, data, val_data, progress=progress)
        self.history = self.loop.history
        self.perturbation = self.fit_result.perturbation
        return self.perturbation

    def notify(self, count: int, perturbation: Callable[[], torch.Tensor]) -> None:
        """Call the fit's ``callback`` (if any) with ``count`` steps or batches done so far."""
        if self._callback is not None:
            self._callback(count, perturbation)

    # -- what a subclass writes: the Trainer's members (juap.runtime.loop.Trainer) -------------------
    def checkpoint_identity(self) -> Dict[str, Any]:
        """The settings that must match for a checkpoint of this attack to be resumed."""
        keys = ("seed", "batch_size")
        return {
            "attack": self.name,
            "norm": self.norm,
            "eps": self.eps,
            **{k: getattr(self, k, None) for k in keys},
        }

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


def _order_generator(data) -> Optional[torch.Generator]:
    """The ``torch.Generator`` that draws a loader's order (juap's loaders have one), else None."""
    gen = getattr(data, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def _module_device(m: nn.Module) -> torch.device:
    p = next(iter(m.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
