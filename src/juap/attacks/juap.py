"""JUAP (Algorithm 1) and its classifier-only special case GUAP.

Paper: "Joint universal adversarial perturbations", eqs 6, 7-9, 13, 16 and Algorithm 1.
A generator G maps a fixed noise n ~ U(0, 1) (drawn once from the seed) to an image-shaped
tensor; eq 6 scales it into the budget; Adam trains G on

    L = max{L_fool(f~(x_hat)), delta} + lambda * ||I~(x_hat) - I(x)||_2          (eq 16)

where f~ / I~ are the smoothed-ReLU surrogate (eq 15, gradients only) and I(x) the benign map of the
benign prediction. GUAP is the same loop with lambda = 0 and no interpreter. The perturbation kept is
the best on held-out validation images, judged with the *unmodified* classifier and interpreter.

The class composes the parts of :mod:`juap.attacks.parts`: the interpreter wiring, the joint loss (eq 16),
the lambda controller (warm-up, constrained mode) and the selection rule; what is its own is the generator,
its Adam loop and the validations.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .._registry import ATTACKS, GENERATORS
from .._validate import Param
from ..budget import apply_perturbation, quantize_8bit, scale_to_budget
from ..errors import CheckpointError, ConfigError, NumericalError
from ..evaluation import evaluate
from ..interpreters.base import Interpreter
from ..losses import FOOL_FORMS, HINGES, MAP_LOSSES, MAP_ON, OBJECTIVES, check_target
from ..metrics import is_fooled
from ..runtime import distributed
from ..runtime.checkpoint import ResumableLoader, check_finite_parameters
from ..transforms import parse_transform, straight_through
from .base import FitResult, UniversalAttack, cycle_batches, first_images, iter_batches
from .fastpaths import FastPaths
from .parts import (
    SELECTIONS,
    Adversarial,
    Benign,
    DetectorTerm,
    InterpreterWiring,
    JointLoss,
    LambdaControl,
    Selection,
)

MU_RAMP = 1000.0  # mu_schedule="ramp": the detector term's weight grows from mu / MU_RAMP to mu


class GeneratorUAP(UniversalAttack):
    """A universal perturbation learned by a generator (Algorithm 1).

    Args:
        classifier: the classifier to fool.
        interpreter: the interpreter whose maps must stay unchanged; ``None`` gives GUAP.
        norm, eps: budget (eq 6), eps in 0-255 units (the paper's per-pixel L_inf 10 by default).
        generator: registered generator name (``"resnet"`` or ``"unet"``) or an ``nn.Module``.
        generator_options: keyword arguments of the generator (e.g. ``{"ngf": 32}``).
        objective: ``"untargeted"`` (eq 7), ``"least_likely"`` (eq 8, the paper's default) or
            ``"targeted"`` (eq 9).
        target: the target class C_t of the targeted objective.
        fool_loss: how eqs 7-9 meet a batch (:func:`juap.losses.fooling_loss`): ``"log_mean"`` (the log
            of the batch-mean CE), ``"mean_log"`` (the mean of per-image logs) or ``"mean_log1p"`` (the
            mean of per-image ``log(CE + 1)``, GUAP's public code).
        hinge: where eq 16's ``max{., delta}`` acts: ``"batch"`` (on the batch's fooling loss) or
            ``"image"`` (on each image's term, so fooled images stop pulling and unfooled ones keep on);
            ``"margin"``: an image stops pulling once it is fooled by ``kappa`` logits (C&W's margin, a
            level that does not depend on the data's cross-entropies; ``delta`` is then unused).
        kappa: the logit margin of the ``margin`` hinge.
        map_on: ``"all"`` (eq 13 over the batch) or ``"fooled"``: the map term averaged over the images
            that are fooled at this step only, so it never opposes fooling the others.
        map_loss: ``"l2"`` (eq 13, the L2 distance of normalised maps) or ``"soft_iou"`` (one minus a
            differentiable top-k IoU, :func:`juap.losses.soft_topk_iou`: the metric of eq 20 itself).
        lam: lambda of eq 16 (the paper recommends 1e-4..3e-3 at 224x224 with raw maps; juap's maps are
            min-max normalised, so larger values suit it: see docs/python-api.md).
        delta: the hinge of eq 16 (-0.8); ``None`` disables it.
        warmup: steps trained with lambda = 0 (the fooling loss alone) before the map term starts.
        fr_target: constrained mode: the fooling ratio to keep; lambda then adapts online by dual
            ascent (``log lambda += dual_lr * (FR - fr_target)`` after each step, FR an exponential
            average of the batch fooling ratio), so the map term gets as much weight as the constraint
            allows. ``lam`` is the starting value.
        fr_margin: constrained mode relative to GUAP: the target is the fooling ratio that the
            ``warmup`` steps reached (GUAP's training, lambda = 0; the same running average of the
            training batches' ratio that the dual ascent follows) minus this margin. Needs ``warmup``.
        dual_lr: the step of the dual ascent on log lambda.
        steps: Adam steps; batch_size: images per step; lr, betas: Adam's (2e-4, (0.5, 0.999)).
        lr_schedule: ``"constant"`` (the paper's) or ``"cosine"``: the learning rate of step ``i`` is
            ``lr * (1 + cos(pi * (i - 1) / steps)) / 2``, from ``lr`` at the first step towards 0.
        surrogate: use the smoothed-ReLU surrogate (eq 15) for gradients; ``"auto"``: when the interpreter
            declares ``needs_surrogate`` (Grad-CAM).
        tau: eq 15's constant.
        feature_weight: weight of ``||e(x_hat) - e(x)||_2`` when the interpreter has an encoder
            (``interpreter.encode``, e.g. RTS). The paper adds the term unweighted with a separate encoder;
            juap's RTS encodes with the classifier's own feature map, whose distances are much larger
            than the map distance, so weight 1 forbids fooling altogether; the default 0.02 puts the two
            terms on the same scale (docs/results.md, "What the embedded data shows"). Its old name
            ``rts_feature_weight`` is still accepted, with a FutureWarning.
        seed: fixes the generator's initialisation, its input noise and the data order.
        eval_every: validation period in steps (and once at the end).
        selection: ``"fooling_ratio"``, ``"joint"`` (fooling ratio x (1 + IoU)), ``"constrained"`` (the
            highest IoU among validations that keep the fooling-ratio target; the closest to it when
            none does) or ``"last"``; ``"auto"``: constrained in constrained mode, joint with an
            interpreter, else fooling ratio.
        detector: a calibrated juap detector to evade (the adaptive attacker of SPEC section 5); its score
            enters the loss through :class:`~juap.attacks.parts.DetectorTerm` with weight ``mu``, and each
            validation reports the ``evasion_rate`` (fooled and under the detector's threshold).
        mu: the detector term's weight; 0 (the default) trains exactly today's attack.
        detector_temperature: the detector term's softplus temperature, in units of the detector's
            clean-score spread.
        detector_warmup: steps trained without the detector term first (Tramer et al. 2020's two-phase
            loss: fool first, then get under the threshold).
        mu_schedule: ``"constant"``, or ``"ramp"``: after the warm-up the detector term's weight grows
            geometrically from ``mu / 1000`` to ``mu`` at the last step, so the validations (which keep the
            highest evasion rate) see a range of weights in one run: too heavy a term trades the fooling
            away, too light a one leaves the images flagged.
        round_8bit: train the perturbation as it is applied to 8-bit images: rounded to whole 0-255 steps
            in the forward pass (:func:`~juap.budget.quantize_8bit`), straight through in the backward
            pass; the validations and the perturbation kept are the rounded ones.
        eot: transformation specs (:mod:`juap.transforms`, e.g. ``("jpeg:75", "resize:0.5")``): each step
            draws one (from the global RNG, so a resumed fit draws the same), passes the benign and the
            adversarial batch through it, and trains on what the model sees then (expectation over
            transformation; JPEG, which has no gradient, straight through). Empty: none.
        amp, channels_last, compile: opt-in GPU fast paths of the training step (bf16 autocast, NHWC
            layout, ``torch.compile`` with an eager fallback); see :mod:`juap.attacks.fastpaths`.

    Under ``torchrun`` (:mod:`juap.runtime.distributed`) every rank passes the same data; each trains on its
    contiguous slice of every global batch of ``batch_size`` (divisible by the number of ranks), the
    losses are global means (all-reduced sums) and the generator is wrapped in DDP, so the run follows
    the one-process run on the same global batches.

    Example:
        >>> attack = juap.create_attack("juap", classifier=clf, interpreter=cam, norm="linf", eps=10)
        >>> n_hat = attack.fit(train_loader, val_data=val_loader)   # (3, H, W)
        >>> x_adv = attack.perturb(x)
    """

    name = "generator_uap"
    label = "GUAP"
    takes_interpreter = True
    artifacts = ("perturbation", "generator")
    hyperparams = {
        "generator": Param((str, torch.nn.Module), doc="registered generator name or a module"),
        "generator_options": Param(dict, optional=True, dry_run={"ngf": 8}),
        "objective": Param(str, choices=OBJECTIVES),
        "target": Param(int, low=0, optional=True),
        "fool_loss": Param(str, choices=FOOL_FORMS),
        "hinge": Param(str, choices=HINGES),
        "kappa": Param(float, low=0),
        "map_on": Param(str, choices=MAP_ON),
        "map_loss": Param(str, choices=MAP_LOSSES),
        "lam": Param(float, low=0),
        "delta": Param(float, optional=True),
        "warmup": Param(int, low=0),
        "fr_target": Param(float, low=0, high=1, low_open=True, optional=True),
        "fr_margin": Param(float, low=0, high=1, optional=True),
        "dual_lr": Param(float, low=0, low_open=True),
        "steps": Param(int, low=1, dry_run=1),
        "batch_size": Param(int, low=1, dry_run=6),
        "lr": Param(float, low=0, low_open=True),
        "lr_schedule": Param(str, choices=("constant", "cosine")),
        "betas": Param(tuple, length=2, items=float, low=0, high=1),
        "surrogate": Param((bool, str), choices=("auto", True, False)),
        "tau": Param(float, low=0, low_open=True),
        "feature_weight": Param(float, low=0),
        "seed": Param(int),
        "eval_every": Param(int, low=1, dry_run=1),
        "selection": Param(str, choices=SELECTIONS),
        "detector": Param(torch.nn.Module, optional=True, doc="a calibrated juap detector to evade"),
        "mu": Param(float, low=0),
        "detector_temperature": Param(float, low=0, low_open=True),
        "detector_warmup": Param(int, low=0),
        "mu_schedule": Param(str, choices=("constant", "ramp")),
        "amp": Param(bool),
        "channels_last": Param(bool),
        "compile": Param(bool),
        "round_8bit": Param(bool),
        "eot": Param(tuple, items=str, doc="juap.transforms specs to train through"),
    }
    renamed = {"rts_feature_weight": "feature_weight"}

    def __init__(
        self,
        *,
        interpreter: Optional[Interpreter] = None,
        generator: str | torch.nn.Module = "resnet",
        generator_options: Optional[Mapping[str, Any]] = None,
        # the loss (eq 16)
        objective: str = "least_likely", target: Optional[int] = None, fool_loss: str = "log_mean",
        hinge: str = "batch", kappa: float = 0.0, map_on: str = "all", map_loss: str = "l2",
        lam: float = 0.0, delta: Optional[float] = -0.8, feature_weight: float = 0.02,
        # lambda over the steps
        warmup: int = 0, fr_target: Optional[float] = None, fr_margin: Optional[float] = None,
        dual_lr: float = 0.05,
        # the training and the choice of the perturbation kept
        steps: int = 500, batch_size: int = 30, lr: float = 2e-4, lr_schedule: str = "constant",
        betas: Tuple[float, float] = (0.5, 0.999), seed: int = 0, eval_every: int = 50,
        selection: str = "auto",
        # the adaptive attacker: a detector to stay under
        detector: Optional[torch.nn.Module] = None, mu: float = 0.0, detector_temperature: float = 1.0,
        detector_warmup: int = 0, mu_schedule: str = "constant",
        # gradients through the interpreter, and the GPU fast paths
        surrogate: bool | str = "auto", tau: float = 1e-4,
        amp: bool = False, channels_last: bool = False, compile: bool = False,
        # the perturbation as it will be applied: 8-bit rounding, transformations on the way to the model
        round_8bit: bool = False, eot: Sequence[str] = (),
        **common,  # classifier, norm, eps, device: Attack's
    ) -> None:  # fmt: skip
        super().__init__(**common)
        self.check_arguments(locals(), GeneratorUAP.hyperparams)  # types, ranges, choices
        if objective == "targeted":
            check_target(target, self.classifier.num_classes)
        joint = interpreter is not None
        if mu > 0 and detector is None:
            raise ConfigError("mu > 0 weighs a detector term: pass detector= (a calibrated juap detector)")
        self.lam_control = LambdaControl(
            lam=lam, warmup=warmup, fr_target=fr_target, fr_margin=fr_margin, dual_lr=dual_lr, map_term=joint
        )
        adaptive = detector is not None and mu > 0
        self.selection = Selection.resolve(
            selection, constrained=self.lam_control.constrained, joint=joint, adaptive=adaptive
        )
        self.selector = Selection(self.selection, targeted=objective == "targeted")
        distributed.check_divisible(int(batch_size))  # under torchrun: equal slices of each global batch
        self.wiring = InterpreterWiring.check(interpreter, surrogate=surrogate, tau=tau)
        if isinstance(generator, str):
            GENERATORS.get(generator)  # unknown names fail now, listing the known ones
        self.detector, self.mu, self.detector_warmup = detector, float(mu), int(detector_warmup)
        self.mu_schedule = mu_schedule
        terms = []
        if adaptive:  # mu = 0 leaves eq 16 as it is
            target_class = target if objective == "targeted" else None
            terms.append(DetectorTerm(
                detector, classifier=self.classifier, interpreter=interpreter, target=target_class,
                temperature=detector_temperature,
            ).term(mu))  # fmt: skip
        self.loss = JointLoss(
            objective=objective, target=target, fool_loss=fool_loss, hinge=hinge, delta=delta, kappa=kappa,
            map_on=map_on, map_loss=map_loss, feature_weight=feature_weight, terms=terms,
        )  # fmt: skip
        self.interpreter, self.use_surrogate, self.tau = interpreter, self.wiring.use_surrogate, tau
        self.generator_spec, self.generator_options = generator, dict(generator_options or {})
        self.objective, self.target, self.lam, self.warmup = objective, target, float(lam), int(warmup)
        self.steps, self.batch_size, self.eval_every = int(steps), int(batch_size), int(eval_every)
        self.lr, self.betas, self.lr_schedule, self.seed = float(lr), tuple(betas), lr_schedule, int(seed)
        self.fast_options = {"amp": bool(amp), "channels_last": bool(channels_last), "compile": bool(compile)}
        self.round_8bit, self.eot = bool(round_8bit), tuple(eot)
        self._eot = [(spec, straight_through(parse_transform(spec))) for spec in self.eot]
        self.generator: Optional[torch.nn.Module] = None
        self.noise: Optional[torch.Tensor] = None

    # -- the trainer (UniversalAttack.fit runs it) ----------------------------------------------------
    # fit(data, val_data=...) trains the generator on ``data`` and keeps the best perturbation on
    # ``val_data`` (default: ``data``); checkpoints every ``eval_every`` steps by default hold the
    # generator, Adam, the data position, the lambda controller's state, the best so far (and, from the
    # engine, the RNG states and the history). ``history`` holds one row per step: the loss, its parts, the
    # batch fooling ratio, lambda, and ``val`` (fooling ratio, L1, IoU) at validations.
    # ``callback(step, perturbation)`` runs after every step.
    @property
    def num_steps(self) -> int:
        return self.steps

    @property
    def checkpoint_every(self) -> int:
        return self.eval_every

    def init(self, data, val_data, *, progress: bool = True) -> None:
        distributed.check_divisible(self.batch_size)
        distributed.check_same_across_ranks(self.classifier, "classifier under attack")
        dev = self.device
        self._data, self._val_data = data, val_data if val_data is not None else data
        x0 = first_images(data, dev)
        self.noise = self._draw_noise(x0)  # the fixed input n ~ U(0, 1), kept with the artifact
        torch.manual_seed(self.seed)
        self._G = self.make_generator().to(dev).train()
        self.optimizer = torch.optim.Adam(self._G.parameters(), lr=self.lr, betas=self.betas)
        train_interp = self.wiring.trainer(self.classifier)  # gradients through the smoothed ReLUs (eq 15)
        self._fast = FastPaths(**self.fast_options, device=dev)
        self._fwd = list(self._fast.prepare(distributed.wrap_ddp(self._G), train_interp, self.classifier))
        self.lam_control.reset()
        self._source = data if isinstance(data, torch.Tensor) else ResumableLoader(data, roll_over=True)
        self._best: Optional[Dict[str, Any]] = None
        self._batches = None  # built at the first step, where a resumed fit left off

    def state_dict(self) -> Dict[str, Any]:
        return {
            "generator": self._G.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best": self._best,
            "dual": self.lam_control.state_dict(),
            "data": self._source.position() if isinstance(self._source, ResumableLoader) else None,
        }

    def restore_state(self, state) -> None:  # a NaN/Inf roll-back: the data moves on
        try:
            self._G.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"the checkpoint does not fit this generator: {e}") from None

    def load_state_dict(self, state) -> None:
        self.restore_state(state)
        self.lam_control.load_state_dict(state.get("dual"))
        best = state["best"]
        self._best = None if best is None else {**best, "n_hat": best["n_hat"].to(self.device)}
        if isinstance(self._source, ResumableLoader):
            self._source = ResumableLoader(self._data, state["data"], roll_over=True)

    def _batches_from(self, start: int):
        """This rank's slice of every batch from step ``start + 1`` on."""
        batches = cycle_batches(self._source, batch_size=self.batch_size, device=self.device, seed=self.seed)
        batches = distributed.local_batches(batches, skip_small=True)
        if start and not isinstance(self._source, ResumableLoader):
            for _ in range(start):  # a tensor's order depends only on the seed and the position
                next(batches)
        return batches

    def step(self, i: int):
        fast = self._fast
        if self._batches is None:
            self._batches = self._batches_from(i - 1)
        x = fast.images(next(self._batches)[0])
        lam = self.lam_control.at(i)
        terms = self.term_factor(i)  # the two-phase adaptive loss: fool first, then the detector
        if self.lr_schedule != "constant" and i > 1:  # relative, so a roll-back's lowered rate stays lowered
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_at(i) / self.lr_at(i - 1)
        with fast.autocast():
            (loss, parts), *self._fwd = fast.first_step(
                lambda g, ti: self.train_step(g, self.optimizer, x, ti, lam=lam, terms=terms), *self._fwd
            )
        last = i == self.steps
        if i % self.eval_every == 0 or self.loop.checkpoint_due(i):
            check_finite_parameters(self._G, f"{self.name} generator at step {i}")
        row = {"loss": loss, **parts, **({"lam": lam} if self.interpreter is not None else {})}
        if self.lr_schedule != "constant":
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.lam_control.update(i, parts["batch_fooling_ratio"])
        if not (i % self.eval_every == 0 or last or i == self.warmup):
            return row
        n_hat = self.current_perturbation(self._G)
        row["val"] = self.validate(n_hat, self._val_data)
        self._keep_best(i, n_hat, row["val"])
        return row, {"perturbation": n_hat}

    def after_step(self, i: int) -> None:
        self.notify(i, lambda: self.current_perturbation(self._G))

    def _keep_best(self, step: int, n_hat: torch.Tensor, val: Dict[str, float]) -> None:
        """Keep this validation's perturbation when the selection rule prefers it to the best so far."""
        if step <= self.warmup and step != self.steps:  # GUAP's perturbation, not JUAP's
            return
        target = self.lam_control.state["target"]
        if self.selector.prefers(val, self._best, target):
            state = copy.deepcopy(self._G.state_dict())
            score = self.selector.score(val, target)
            self._best = {"score": score, "step": step, "n_hat": n_hat, "state": state, "val": val}

    def result(self) -> FitResult:
        best = self._best
        self._G.load_state_dict(best["state"])
        self.generator = self._G.eval()
        return FitResult(best["n_hat"], selected=best["step"], validation=best["val"])

    def _draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The generator's fixed input n ~ U(0, 1) (1, C, H, W) for images like ``x``, drawn from the seed."""
        noise = torch.rand((1,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(self.seed))
        return noise.to(x.device)

    @property
    def hinge_level(self) -> Optional[float]:
        return self.loss.hinge_level

    def checkpoint_identity(self) -> Dict[str, Any]:
        generator = {"generator": str(self.generator_spec), "generator_options": self.generator_options}
        return {**super().checkpoint_identity(), **generator, "shape": list(self.noise.shape)}

    def term_factor(self, step: int) -> float:
        """The factor of the extra terms' weights at ``step`` (1-based): 0 during ``detector_warmup``,
        then 1, or the ramp from 1/1000 to 1 (``mu_schedule="ramp"``)."""
        if step <= self.detector_warmup:
            return 0.0
        if self.mu_schedule == "constant" or self.steps <= self.detector_warmup + 1:
            return 1.0
        progress = (step - self.detector_warmup - 1) / (self.steps - self.detector_warmup - 1)
        return MU_RAMP ** (progress - 1.0)

    def lr_at(self, step: int) -> float:
        """Adam's learning rate at ``step`` (1-based) under ``lr_schedule``, before any roll-back halved
        it (a roll-back scales the whole schedule)."""
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * (step - 1) / self.steps))
        return self.lr

    def train_step(
        self, G, opt, x: torch.Tensor, train_interp, *, lam: Optional[float] = None, terms: float = 1.0
    ) -> Tuple[float, Dict[str, float]]:
        """One step of Algorithm 1: eq 16 on the batch ``x`` (N, 3, H, W), then one Adam step on ``G``.

        The public step that :meth:`fit` runs in the loop engine; benchmarks time it directly.

        Args:
            G: the generator (from :meth:`make_generator`); ``opt``: its optimiser.
            train_interp: the interpreter whose maps enter eq 13 (the smoothed-ReLU surrogate's during
                :meth:`fit`); ignored by GUAP.
            lam: lambda of eq 16 (default ``self.lam``).
            terms: the factor of the extra terms' weights (the detector's): 0 during the detector warm-up,
                the ramp's value after it (:meth:`term_factor`).

        Returns:
            (loss, parts): the loss and its parts (``fool_loss``, ``map_loss``, ``batch_fooling_ratio``,
            ``at_hinge``, ...) as floats.
        """
        if self.noise is None:  # outside fit: the fixed input, drawn from the seed as fit does
            self.noise = self._draw_noise(x)
        lam = self.lam if lam is None else lam
        transform = lambda z: z  # noqa: E731
        if self._eot:  # one transformation this step, for the benign and the adversarial batch alike
            _, t = self._eot[int(torch.randint(len(self._eot), (1,)))]
            draw = int(torch.randint(2**31 - 1, (1,)))
            transform = lambda z: t(z, seed=draw)  # noqa: E731
        benign = self.loss.benign(transform(x), self.classifier, self.interpreter)  # the unmodified models
        n_hat = self._as_applied(scale_to_budget(G(self.noise), norm=self.norm, eps=self.eps)[0])  # eq 6
        explainer = train_interp if self.interpreter is not None else None
        x_hat = transform(apply_perturbation(x, n_hat))
        adv = self.loss.adversarial(x_hat, benign, self.classifier, explainer)
        loss, fool, parts = self.loss(benign, adv, lam=lam, terms=terms)
        if not torch.isfinite(loss):
            raise NumericalError(
                f"{self.name}: the loss became {loss.item()} (parts: {parts}); lower lr or check the inputs"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        parts["fool_loss"] = fool.item()
        parts.update(self._batch_ratios(benign, adv, fool))
        return loss.item(), parts

    def _batch_ratios(self, benign: Benign, adv: Adversarial, fool: torch.Tensor) -> Dict[str, float]:
        """The global batch's fooling ratio and, with a hinge, the share of its images at the hinge."""
        changed = is_fooled(benign.logits.argmax(1), adv.logits.argmax(1)).sum()
        at_hinge = self.loss.at_hinge(benign, adv.logits.detach(), fool.detach())
        changed, hinged, n = distributed.global_count(
            torch.stack([changed, at_hinge, changed.new_tensor(len(benign.logits))])
        )
        out = {"batch_fooling_ratio": changed.item() / n.item()}  # over the global batch
        if self.loss.has_hinge:  # the images that no longer pull
            out["at_hinge"] = hinged.item() / n.item()
        return out

    def generator_artifact(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The trained generator as a run saves it (``artifacts`` has ``"generator"``): its tensors
        (``generator.*`` and the fixed ``noise``) and metadata naming how to build it again."""
        if self.generator is None:
            raise RuntimeError("call fit() first")
        tensors = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        meta = {"format": "juap.generator", "generator": str(self.generator_spec)}
        return {**tensors, "noise": self.noise}, {**meta, "generator_options": self.generator_options}

    def make_generator(self) -> torch.nn.Module:
        """A fresh, untrained generator as this attack's ``generator`` and ``generator_options`` name it."""
        if isinstance(self.generator_spec, torch.nn.Module):
            return copy.deepcopy(self.generator_spec)
        return GENERATORS.create(self.generator_spec, **self.generator_options)

    @torch.no_grad()
    def current_perturbation(self, G: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """n_hat (3, H, W) of the generator (``G`` or the trained one) on the fixed noise."""
        G = G if G is not None else self.generator
        if G is None or self.noise is None:
            raise RuntimeError("call fit() first")
        return self._as_applied(scale_to_budget(G(self.noise), norm=self.norm, eps=self.eps)[0]).detach()

    def _as_applied(self, n_hat: torch.Tensor) -> torch.Tensor:
        """``n_hat`` rounded to 8 bits with ``round_8bit`` (straight through for the gradient), else as is."""
        if not self.round_8bit:
            return n_hat
        return n_hat + (quantize_8bit(n_hat.detach(), norm=self.norm, eps=self.eps) - n_hat).detach()

    def validate(self, n_hat: torch.Tensor, data, max_batches: int = 8) -> Dict[str, float]:
        """Fooling ratio (and L1/IoU of the unmodified interpreter) of ``n_hat`` on a few batches."""
        batches = list(
            itertools.islice(iter_batches(data, batch_size=self.batch_size, device=self.device), max_batches)
        )
        interps = {"main": self.interpreter} if self.interpreter is not None else None
        out = evaluate(
            self.classifier,
            n_hat,
            batches,
            interpreters=interps,
            device=self.device,
            target=self.target if self.objective == "targeted" else None,
        )
        out = {**{k: v for k, v in out.items() if k != "interpreters"}, **out["interpreters"].get("main", {})}
        if self.detector is not None:
            out["evasion_rate"] = self._evasion_rate(n_hat, batches)
        return out

    @torch.no_grad()
    def _evasion_rate(self, n_hat: torch.Tensor, batches) -> float:
        """The fraction of the validation images that ``n_hat`` fools and the detector does not flag."""
        target = self.target if self.objective == "targeted" else None
        evaded, n = 0, 0
        for x, *_ in batches:
            x_hat = apply_perturbation(x, n_hat)
            fooled = is_fooled(self.classifier(x).argmax(1), self.classifier(x_hat).argmax(1), target=target)
            evaded += int((fooled & ~self.detector.flags(x_hat)).sum())
            n += len(x)
        return evaded / max(n, 1)


@ATTACKS.register("juap")
class JUAP(GeneratorUAP):
    """JUAP: fool the classifier and keep the interpreter's maps (eq 16). Needs an interpreter.

    The defaults are the paper's (eq 8, the hinge on the log of the batch-mean CE at -0.8). ``lam``
    defaults to 0.05: eq 13 is taken on min-max normalised maps here (an L2 distance of order
    sqrt(h*w)), not on raw maps as in the paper, whose recommended 1e-4..3e-3 therefore does not carry
    over. For few classes docs/results.md gives the recipe that keeps GUAP's fooling ratio (eq 7, GUAP's
    per-image term, ``hinge="image"``); the constrained mode (``fr_target`` / ``fr_margin``) sets lambda
    itself.
    """

    name = "juap"
    label = "JUAP"
    generator_in_label = "prefix"  # R-JUAP, U-JUAP
    hyperparams = {**GeneratorUAP.hyperparams, "lam": Param(float, low=0)}

    def __init__(self, *, interpreter: Interpreter, lam: float = 0.05, **kw) -> None:
        if interpreter is None:
            raise ConfigError("juap needs an interpreter (cam, gradcam or rts); for no interpreter use guap")
        super().__init__(interpreter=interpreter, lam=lam, **kw)


@ATTACKS.register("guap")
class GUAP(GeneratorUAP):
    """GUAP (the generator baseline), trained as its public code trains it: the classifier loss only, no
    interpreter term, no hinge, and by default the untargeted per-image ``-mean_i log(CE_i + 1)`` against
    the benign prediction (TrustAI/GUAP ``run_imagenet.py``). ``objective`` and ``fool_loss`` select
    eqs 7-9 in the paper's form instead."""

    name = "guap"
    label = "GUAP"
    takes_interpreter = False
    hyperparams = {
        **{k: p for k, p in GeneratorUAP.hyperparams.items() if k != "lam"},  # no map term
        "objective": Param(str, choices=OBJECTIVES),
        "fool_loss": Param(str, choices=FOOL_FORMS),
        "delta": Param(float, optional=True),
    }

    def __init__(
        self,
        *,
        objective: str = "untargeted",
        fool_loss: str = "mean_log1p",
        delta: Optional[float] = None,
        **kw,
    ) -> None:
        for key in ("interpreter", "lam"):
            if kw.pop(key, None) not in (None, 0, 0.0):
                raise ConfigError(f"{self.name} has no map term, so it takes no {key}; use juap for that")
        super().__init__(
            interpreter=None, lam=0.0, objective=objective, fool_loss=fool_loss, delta=delta, **kw
        )


@ATTACKS.register("guap_ct")
class GUAPTargeted(GUAP):
    """GUAP-C_t: GUAP with the targeted objective (eq 9, the log of the batch-mean CE) towards ``target``."""

    name = "guap_ct"
    label = "GUAP-Ct"
    generator_in_label = "none"
    hyperparams = {
        **{k: p for k, p in GUAP.hyperparams.items() if k != "objective"},  # always eq 9
        "target": Param(int, low=0),
        "fool_loss": Param(str, choices=FOOL_FORMS),
    }

    def __init__(self, *, target: int, fool_loss: str = "log_mean", **kw) -> None:
        if kw.pop("objective", "targeted") != "targeted":
            raise ConfigError("guap_ct is GUAP with the targeted objective (eq 9); use guap for the others")
        super().__init__(objective="targeted", target=target, fool_loss=fool_loss, **kw)
