"""The parts a generator attack is made of; GeneratorUAP (JUAP, GUAP), JAP and any new attack compose them.

* :class:`InterpreterWiring`: the one check of an attack's interpreter (a juap Interpreter; a learned one
  must be trained) and the interpreter its gradients go through (the smoothed-ReLU surrogate, eq 15).
* :class:`JointLoss`: eq 16, ``max{L_fool, delta} + lambda * (L_map + w * L_feat)`` (eqs 7-9, 13), on the
  batch or per image (JAP, eq 17), plus any extra weighted :class:`Term` (e.g. an adaptive attacker's
  detector score) without touching the rest.
* :class:`LambdaControl`: lambda over the steps: 0 during a warm-up, then fixed, or adapted by dual ascent
  to keep a fooling-ratio target (the constrained mode); its state goes into checkpoints.
* :class:`Selection`: the score of a validation, and whether it replaces the best perturbation so far.

An attack with a new loss term composes them as GeneratorUAP does::

    wiring = InterpreterWiring.check(interpreter, surrogate="auto")
    loss = JointLoss(objective="untargeted", terms=[Term("detector", 0.5, detector_score)])
    benign = loss.benign(x, classifier, wiring.interpreter)         # no gradients
    adv = loss.adversarial(x_hat, benign, classifier, wiring.trainer(classifier))
    value, fool, parts = loss(benign, adv, lam=control.at(step))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .._validate import check_range
from ..errors import ConfigError
from ..interpreters.base import Interpreter
from ..interpreters.smooth_relu import make_surrogate
from ..losses import (
    attack_classes,
    evasion_loss,
    feature_distance,
    fooling_loss,
    fooling_terms,
    hinged_fooling_terms,
    joint_loss,
    logit_margins,
    map_distance,
    map_distances,
)
from ..metrics import is_fooled
from .base import rebind


# -- the interpreter ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InterpreterWiring:
    """How an attack uses its interpreter: the unmodified one judges (the benign maps, validation); the
    gradients go through :meth:`trainer`. Made by :meth:`check`, which every attack that takes an
    interpreter calls, so that they all refuse the same things with the same messages.

    Attributes:
        interpreter: the interpreter (``None``: the attack fools the classifier alone).
        use_surrogate: train through the smoothed-ReLU surrogate of the classifier (eq 15).
        tau: eq 15's constant.
    """

    interpreter: Optional[Interpreter] = None
    use_surrogate: bool = False
    tau: float = 1e-4

    @classmethod
    def check(
        cls, interpreter: Optional[Interpreter], *, surrogate: bool | str = "auto", tau: float = 1e-4
    ) -> InterpreterWiring:
        """Check ``interpreter`` and choose the surrogate (``"auto"``: when the interpreter declares
        ``needs_surrogate``, e.g. Grad-CAM, whose maps are built from gradients).

        Raises:
            ConfigError: not a juap Interpreter, a learned one (``requires_checkpoint``) without its
                trained file (its maps would mean nothing), or an evaluation-only one (a peer's).
        """
        if interpreter is not None and not isinstance(interpreter, Interpreter):
            raise ConfigError(f"interpreter must be a juap Interpreter, got {type(interpreter).__name__}")
        if interpreter is not None and interpreter.requires_checkpoint and interpreter.checkpoint is None:
            raise ConfigError(
                f"the {interpreter.label} interpreter is untrained: train it (`juap train-rts` for RTS) "
                f"and pass create_interpreter(..., checkpoint=PATH)"
            )
        if interpreter is not None and interpreter.evaluation_only:
            raise ConfigError(
                f"interpreter {interpreter.name!r} is evaluation-only (its maps carry no gradient): train "
                "against cam, gradcam or rts, and measure under it with evaluate.interpreters"
            )
        auto = interpreter is not None and interpreter.needs_surrogate
        return cls(interpreter, auto if surrogate == "auto" else bool(surrogate), tau)

    def trainer(self, classifier) -> Optional[Interpreter]:
        """The interpreter whose maps train the attack: a copy explaining the smoothed-ReLU surrogate of
        ``classifier`` (eq 15) when ``use_surrogate``, else the interpreter itself (``None`` without one)."""
        if self.interpreter is not None and self.use_surrogate:
            return rebind(self.interpreter, make_surrogate(classifier, tau=self.tau))
        return self.interpreter


# -- the loss -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Benign:
    """What the unmodified models say about the clean batch x (computed without gradients).

    Attributes:
        logits: f(x) (N, K).
        classes: the class each image's fooling term is taken against (N,)
            (:func:`juap.losses.attack_classes`).
        maps: the interpreter's maps of the benign prediction (N, h, w); ``None`` without an interpreter.
        features: its encoder's features e(x), for an interpreter with an encoder (RTS); else ``None``.
    """

    logits: torch.Tensor
    classes: torch.Tensor
    maps: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Adversarial:
    """The adversarial batch as the loss sees it.

    Attributes:
        x_hat: the adversarial images (N, 3, H, W).
        logits: their logits (N, K), from the classifier or the interpreter's (surrogate) pass.
        maps: their maps (N, h, w) by ``explainer``; ``None`` without an interpreter.
        explainer: the interpreter the gradients go through (``None``: no map term).
    """

    x_hat: torch.Tensor
    logits: torch.Tensor
    maps: Optional[torch.Tensor] = None
    explainer: Optional[Interpreter] = None


@dataclasses.dataclass(frozen=True)
class Term:
    """An extra term of the joint loss: ``weight * fn(benign, adv)`` is added to eq 16, and its value is
    logged under ``name``. ``fn`` returns a scalar for the batch loss, (N,) for :meth:`JointLoss.per_image`
    (under torchrun, a global mean, as :func:`juap.losses.fooling_loss` takes with ``across_ranks``)."""

    name: str
    weight: float
    fn: Callable[[Benign, Adversarial], torch.Tensor]


class DetectorTerm:
    """The adaptive attacker's term (SPEC section 5): stay under a calibrated detector's threshold on the
    images the perturbation already fools, :func:`juap.losses.evasion_loss` of the detector's scores of
    the adversarial batch. ``term(mu)`` makes the :class:`Term` that :class:`JointLoss` adds to eq 16.

    The detector's maps come from the attack's own pass when it explains with the same interpreter (the
    smoothed-ReLU surrogate's maps of eq 15, so second derivatives exist); otherwise the detector's
    interpreter is wired as an attack's is (:class:`InterpreterWiring`) and explains the batch again.

    Args:
        detector: a calibrated juap detector (``score(x, logits=, maps=)``, ``threshold``); frozen here.
        classifier: the classifier under attack (the detector must watch this one).
        interpreter: the attack's interpreter (``None`` for GUAP).
        target: the target class of a targeted attack (fooled = the target reached), else ``None``.
        temperature: the term's temperature, in units of the detector's clean-score spread (``scale``).
    """

    def __init__(
        self,
        detector,
        *,
        classifier,
        interpreter: Optional[Interpreter] = None,
        target: Optional[int] = None,
        temperature: float = 1.0,
    ) -> None:
        check_range("detector_temperature", temperature, low=0, low_open=True)
        threshold = getattr(detector, "threshold", None)
        if threshold is None or not torch.isfinite(torch.as_tensor(threshold)).all():
            raise ConfigError(
                "the detector has no calibrated threshold: call detector.calibrate(clean_images, fpr=0.05) "
                "on held-out clean images before attacking it"
            )
        if detector.classifier is not classifier:
            raise ConfigError("the detector watches another classifier object than the one under attack")
        self.detector = detector.eval().requires_grad_(False)
        self.target, self.temperature = target, float(temperature)
        own = detector.interpreter
        self.reuse_maps = own is not None and own is interpreter and target is None
        self.explainer = None
        if own is not None and not self.reuse_maps:
            self.explainer = InterpreterWiring.check(own).trainer(classifier)

    def __call__(self, benign: Benign, adv: Adversarial) -> torch.Tensor:
        maps = adv.maps if self.reuse_maps else None
        if self.explainer is not None:
            maps = self.explainer.explain(adv.x_hat)[1]  # maps of the predicted class, as the detector's
        scores = self.detector.score(adv.x_hat, logits=adv.logits, maps=maps)  # (N,)
        fooled = is_fooled(benign.logits.argmax(1), adv.logits.detach().argmax(1), target=self.target)
        threshold = self.detector.threshold.to(scores.device, scores.dtype)
        scale = self.detector.scale.to(scores.device, scores.dtype)
        return evasion_loss(
            scores, threshold, scale=scale, temperature=self.temperature, only=fooled, across_ranks=True
        )

    def term(self, mu: float) -> Term:
        """The weighted term ``mu * evasion_loss``, logged as ``detector_loss``."""
        return Term("detector_loss", float(mu), self)


class JointLoss:
    """Eq 16: ``max{L_fool, delta} + lambda * (L_map + feature_weight * L_feat) + sum_k weight_k * term_k``.

    Args:
        objective: ``"untargeted"`` (eq 7), ``"least_likely"`` (eq 8) or ``"targeted"`` (eq 9, towards
            ``target``).
        fool_loss, hinge, kappa, delta: how eqs 7-9 and eq 16's hinge meet a batch
            (:func:`juap.losses.fooling_loss`).
        map_on: ``"all"`` (eq 13 over the batch) or ``"fooled"`` (over the images fooled at this step).
        map_loss: ``"l2"`` (eq 13) or ``"soft_iou"`` (:func:`juap.losses.map_distance`).
        feature_weight: the weight of the encoder-feature term, for an interpreter with an encoder.
        terms: extra weighted :class:`Term` s, added after eq 16 (weighted by their own weight, not lambda).

    Batch losses are means over the global batch under torchrun (all-reduced sums, ``across_ranks``).
    """

    def __init__(
        self,
        *,
        objective: str = "least_likely",
        target: Optional[int] = None,
        fool_loss: str = "log_mean",
        hinge: str = "batch",
        delta: Optional[float] = -0.8,
        kappa: float = 0.0,
        map_on: str = "all",
        map_loss: str = "l2",
        feature_weight: float = 0.0,
        terms: Sequence[Term] = (),
    ) -> None:
        self.objective, self.target = objective, target
        self.fool_loss, self.hinge, self.delta, self.kappa = fool_loss, hinge, delta, float(kappa)
        self.map_on, self.map_loss, self.feature_weight = map_on, map_loss, float(feature_weight)
        self.terms = tuple(terms)

    @property
    def target_class(self) -> Optional[int]:
        """The target class when targeted (fooled means reaching it), else ``None``."""
        return self.target if self.objective == "targeted" else None

    @property
    def hinge_level(self) -> Optional[float]:
        """The level of eq 16's hinge on the loss (None: no hinge; the margin hinge has no loss level)."""
        return None if self.hinge == "margin" else self.delta

    @property
    def has_hinge(self) -> bool:
        """Whether some images can stop pulling (a ``delta``, or the margin hinge)."""
        return self.delta is not None or self.hinge == "margin"

    @torch.no_grad()
    def benign(self, x: torch.Tensor, classifier, interpreter: Optional[Interpreter] = None) -> Benign:
        """The benign side of a batch x (N, 3, H, W) with the unmodified models, in one forward pass."""
        if interpreter is None:
            logits = classifier(x)
            return Benign(logits, attack_classes(logits, objective=self.objective, target=self.target))
        logits, maps = interpreter.explain(x)  # maps of f(x)
        features = interpreter.encode(x)  # None unless the interpreter has an encoder
        classes = attack_classes(logits, objective=self.objective, target=self.target)
        return Benign(logits, classes, maps, features)

    def adversarial(
        self, x_hat: torch.Tensor, benign: Benign, classifier, explainer: Optional[Interpreter] = None
    ) -> Adversarial:
        """The logits of x_hat and, with an ``explainer``, its maps: of the target class when targeted,
        else of the predicted class."""
        if explainer is None:
            return Adversarial(x_hat, classifier(x_hat))
        map_classes = benign.classes if self.objective == "targeted" else None  # None: the predicted class
        logits, maps = explainer.explain(x_hat, map_classes)
        return Adversarial(x_hat, logits, maps, explainer)

    def __call__(
        self, benign: Benign, adv: Adversarial, *, lam: float | torch.Tensor, terms: float = 1.0
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """Eq 16 on the batch, plus the extra terms with their weights times ``terms`` (0: left out, e.g.
        during a warm-up; a schedule's factor otherwise).

        Returns:
            (loss, fool, parts): the scalar loss, its hinged fooling term ``max{L_fool, delta}`` and the
            other terms' values as floats (``map_loss``, ``feature_loss``, each extra term's name).
        """
        fool = fooling_loss(  # max{L_fool, delta} of eq 16, on the batch or per image
            adv.logits,
            benign.classes,
            objective=self.objective,
            form=self.fool_loss,
            delta=self.delta,
            hinge=self.hinge,
            kappa=self.kappa,
            across_ranks=True,
        )
        parts: Dict[str, float] = {}
        if adv.maps is None:
            loss = fool
        else:
            loss = joint_loss(fool, self.interpreter_term(benign, adv, parts), lam=lam)
        return (self._add_terms(loss, benign, adv, parts, terms) if terms else loss), fool, parts

    def interpreter_term(self, benign: Benign, adv: Adversarial, parts: Dict[str, float]) -> torch.Tensor:
        """The term lambda weighs: eq 13 (over the fooled images with ``map_on="fooled"``), plus the
        weighted encoder-feature term when the interpreter has an encoder; logs them into ``parts``."""
        only = None
        if self.map_on == "fooled":  # the images fooled at this step (the target reached, if targeted)
            only = is_fooled(benign.logits.argmax(1), adv.logits.detach().argmax(1), target=self.target_class)
        interp = map_distance(adv.maps, benign.maps, only=only, form=self.map_loss, across_ranks=True)
        parts["map_loss"] = interp.item()
        if benign.features is not None and self.feature_weight > 0:
            feat = feature_distance(adv.explainer.encode(adv.x_hat), benign.features, across_ranks=True)
            parts["feature_loss"] = feat.item()
            interp = interp + self.feature_weight * feat
        return interp

    def per_image(self, benign: Benign, adv: Adversarial, *, lam: float) -> torch.Tensor:
        """Eq 16 per image (N,) (JAP, eq 17): ``max{L_fool_i, delta} + lambda * ||I(x_hat_i) - I(x_i)||_2``.

        Needs the image hinge and the L2 map distance over every image, without the feature term."""
        if self.hinge != "image" or self.map_loss != "l2" or self.map_on != "all" or self.feature_weight:
            raise ConfigError(
                "a per-image loss takes hinge='image', map_loss='l2', map_on='all', no features"
            )
        loss = hinged_fooling_terms(
            adv.logits, benign.classes, objective=self.objective, form=self.fool_loss, delta=self.delta
        )
        if adv.maps is not None:
            loss = loss + lam * map_distances(adv.maps, benign.maps)
        return self._add_terms(loss, benign, adv, None)

    def _add_terms(
        self, loss: torch.Tensor, benign: Benign, adv: Adversarial, parts, factor: float = 1.0
    ) -> torch.Tensor:
        for term in self.terms:
            value = term.fn(benign, adv)
            if parts is not None:
                parts[term.name] = value.item()
            loss = loss + (term.weight * factor) * value
        return loss

    def at_hinge(self, benign: Benign, adv_logits: torch.Tensor, fool: torch.Tensor) -> torch.Tensor:
        """How many of this rank's images are at eq 16's hinge (all or none with the batch hinge)."""
        classes = benign.classes
        if self.hinge == "margin":
            return (logit_margins(adv_logits, classes, objective=self.objective) >= self.kappa).sum()
        if self.delta is None:
            return torch.zeros((), dtype=torch.long, device=adv_logits.device)
        if self.hinge == "batch":
            return (fool <= self.delta).long() * len(classes)
        form = "mean_log" if self.fool_loss == "log_mean" else self.fool_loss  # the image hinge: log CE_i
        terms = fooling_terms(adv_logits, classes, objective=self.objective, form=form)
        return (terms <= self.delta).sum()


# -- lambda over the steps ----------------------------------------------------------------------------
_FR_SCALE = 0.1  # dual ascent: a fooling ratio 0.1 off target moves log(lambda) by dual_lr per step
_LAM_RANGE = (1e-4, 1e3)


class LambdaControl:
    """lambda of eq 16 at each step: 0 for ``warmup`` steps (the fooling loss alone), then ``lam``.

    In the constrained mode (``fr_target`` or ``fr_margin``) lambda adapts after every step by dual ascent,
    ``log lambda += dual_lr * clip((FR - target) / 0.1, -1, 1)``, FR an exponential average of the batch
    fooling ratio, so the map term gets as much weight as the fooling-ratio target allows. ``fr_margin``
    sets the target at the end of the warm-up: the ratio reached then (GUAP's) minus the margin.

    Args:
        lam: lambda (the starting value in the constrained mode, > 0 there).
        warmup: steps with lambda = 0.
        fr_target, fr_margin: the constrained mode's target, absolute or relative to the warm-up's ratio.
        dual_lr: the step of the dual ascent on log lambda.
        map_term: whether the attack has a map term (the constrained mode needs one).

    ``state`` (``lam``, ``fr_ema``, ``target``, ``guap_fooling_ratio``) is what a checkpoint holds.
    """

    def __init__(
        self,
        *,
        lam: float = 0.0,
        warmup: int = 0,
        fr_target: Optional[float] = None,
        fr_margin: Optional[float] = None,
        dual_lr: float = 0.05,
        map_term: bool = True,
    ) -> None:
        self.constrained = fr_target is not None or fr_margin is not None
        if self.constrained:
            _check_constrained(lam, warmup, fr_target, fr_margin, map_term)
        self.lam, self.warmup, self.dual_lr = float(lam), int(warmup), float(dual_lr)
        self.fr_target = None if fr_target is None else float(fr_target)
        self.fr_margin = None if fr_margin is None else float(fr_margin)
        self.reset()

    def reset(self) -> None:
        """The state before the first step."""
        self.state: Dict[str, Any] = {
            "lam": self.lam,
            "fr_ema": None,
            "target": self.fr_target,
            "guap_fooling_ratio": None,
        }

    def at(self, step: int) -> float:
        """lambda at ``step`` (1-based): 0 during the warm-up, then the fixed or the adapted value."""
        return 0.0 if step <= self.warmup else float(self.state["lam"])

    def update(self, step: int, batch_fooling_ratio: float) -> None:
        """After ``step``: follow the batch fooling ratio; in the constrained mode, move lambda (after the
        warm-up) and, at the warm-up's end with ``fr_margin``, set the target from the ratio reached."""
        d = self.state
        fr = batch_fooling_ratio
        d["fr_ema"] = fr if d["fr_ema"] is None else 0.9 * d["fr_ema"] + 0.1 * fr
        if self.constrained and step > self.warmup and d["target"] is not None:
            # the error in units of _FR_SCALE, clipped to [-1, 1]: lambda moves by at most a factor
            # e^dual_lr per step, so a stretch of low fooling ratio (the map term starting) cannot collapse
            # it to the floor, from where it would climb back only slowly
            err = max(-1.0, min(1.0, (d["fr_ema"] - d["target"]) / _FR_SCALE))
            log_lam = math.log(d["lam"]) + self.dual_lr * err
            d["lam"] = math.exp(min(max(log_lam, math.log(_LAM_RANGE[0])), math.log(_LAM_RANGE[1])))
        if step == self.warmup and self.fr_margin is not None:  # GUAP's ratio, as the dual sees it
            d["guap_fooling_ratio"] = d["fr_ema"]
            d["target"] = max(d["fr_ema"] - self.fr_margin, 0.0)

    def state_dict(self) -> Dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        self.state = dict(state or self.state)


def _check_constrained(lam, warmup, fr_target, fr_margin, map_term: bool) -> None:
    """The checks that tie the constrained mode's hyperparameters together (each alone is declared)."""
    if not map_term:
        raise ConfigError("fr_target / fr_margin constrain JUAP's lambda; GUAP has no map term")
    if fr_target is not None and fr_margin is not None:
        raise ConfigError("give fr_target (an absolute fooling ratio) or fr_margin, not both")
    if fr_margin is not None and warmup < 1:
        raise ConfigError(
            "fr_margin measures GUAP's fooling ratio during the warm-up: set warmup >= 1 "
            "(e.g. a third of the steps), or give an absolute fr_target"
        )
    check_range("lam", lam, low=0, low_open=True)  # the dual ascent works on log(lambda)


# -- which perturbation a fit keeps -------------------------------------------------------------------
SELECTIONS = ("auto", "fooling_ratio", "joint", "constrained", "evasion", "last")


class Selection:
    """The rule that picks the perturbation a fit keeps among its validations.

    Rules: ``"fooling_ratio"`` (the target success rate when targeted); ``"joint"``: the fooling ratio
    times ``1 + IoU``, so an unperturbed-looking map never outranks fooling the classifier;
    ``"constrained"``: every validation that keeps the fooling-ratio target ranks above every one that
    does not (1 + IoU above, the shortfall, negative, below); ``"evasion"`` (an adaptive attacker): the
    evasion rate (fooled and under the detector's threshold) times ``1 + IoU``, ties broken by the
    fooling ratio; ``"last"``: the latest one.

    Args:
        rule: one of the rules (:meth:`resolve` turns ``"auto"`` into one).
        targeted: judge by the target success rate instead of the fooling ratio.
    """

    def __init__(self, rule: str, *, targeted: bool = False) -> None:
        self.rule = rule
        self.key = "target_success_rate" if targeted else "fooling_ratio"

    @staticmethod
    def resolve(rule: str, *, constrained: bool, joint: bool, adaptive: bool = False) -> str:
        """``rule`` with ``"auto"`` resolved: constrained in the constrained mode, evasion against a
        detector (``adaptive``), joint with an interpreter (``joint``), else the fooling ratio;
        ``"constrained"`` needs the constrained mode and ``"evasion"`` a detector."""
        if rule == "constrained" and not constrained:
            raise ConfigError("selection = 'constrained' needs fr_target or fr_margin")
        if rule == "evasion" and not adaptive:
            raise ConfigError("selection = 'evasion' needs a detector and mu > 0")
        if rule != "auto":
            return rule
        if constrained:
            return "constrained"
        return "evasion" if adaptive else "joint" if joint else "fooling_ratio"

    def score(self, val: Mapping[str, float], fr_target: Optional[float] = None) -> float:
        """The score of a validation's figures (``fooling_ratio`` or ``target_success_rate``, ``iou``);
        ``fr_target``: the constrained mode's target."""
        if self.rule == "constrained":
            shortfall = val.get(self.key, 0.0) - (fr_target or 0.0)
            return 1.0 + val.get("iou", 0.0) if shortfall >= 0 else shortfall
        if self.rule == "joint":
            return val.get(self.key, 0.0) * (1.0 + val.get("iou", 0.0))
        if self.rule == "evasion":  # ties (e.g. no evasion at all) go to the higher fooling ratio
            return val.get("evasion_rate", 0.0) * (1.0 + val.get("iou", 0.0)) + 1e-3 * val.get(self.key, 0.0)
        if self.rule == "fooling_ratio":
            return val.get(self.key, 0.0)
        return 0.0

    def prefers(
        self, val: Mapping[str, float], best: Optional[Mapping[str, Any]], fr_target: Optional[float] = None
    ) -> bool:
        """Whether ``val`` replaces ``best`` (a dict with its ``"score"``; None: nothing kept yet): it
        scores at least as well, or the rule keeps the last."""
        return best is None or self.score(val, fr_target) >= best["score"] or self.rule == "last"
