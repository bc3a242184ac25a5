"""JAP: the image-dependent variant of JUAP (eq 17) — one generator per image, the same objective.

All generators of a batch are trained together: their parameters are stacked and run with
``torch.func.vmap`` over ``functional_call``, so a batch of N images trains N independent generators
in one vectorised pass (Adam's update is element-wise, so stacked parameters stay independent). The
interpreter wiring and the loss (eq 16 per image) are the parts JUAP is made of (:mod:`juap.attacks.parts`).
"""

from __future__ import annotations

from collections import abc
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torch.func import functional_call, stack_module_state, vmap

from .._registry import ATTACKS, GENERATORS
from .._validate import Param
from ..budget import apply_perturbation, scale_to_budget
from ..errors import ConfigError
from ..interpreters.base import Interpreter
from ..losses import OBJECTIVES, attack_classes, check_target
from ..metrics import is_fooled, l1_distance
from .base import PerImageAttack
from .parts import Benign, InterpreterWiring, JointLoss

SMALL_GENERATOR: Mapping[str, Any] = MappingProxyType({"ngf": 8, "n_blocks": 2})
"""JAP's default generator options: one generator is trained per image, so a small one (read-only)."""


@ATTACKS.register("jap")
class JAP(PerImageAttack):
    """Joint image-dependent perturbations: x_adv = clamp(x + n_hat_i, 0, 1), n_hat_i = G_i(n) (eq 17).

    Args:
        classifier, norm, eps: as for every attack (eps in 0-255 units).
        interpreter: the interpreter whose map of each image must stay unchanged (``None``: classifier only).
        generator: registered generator name; generator_options: its options (small by default:
            ``{"ngf": 8, "n_blocks": 2}``, since one generator is trained per image; ``None``: the
            generator's own defaults).
        objective, target, lam, delta: as in JUAP (eqs 7-9, 13, 16), applied per image.
        steps: Adam steps per batch; lr, betas: Adam's.
        surrogate: smoothed-ReLU surrogate for gradients (``"auto"``: for Grad-CAM).
        seed: fixes the noise and the generators' initialisation.

    Example:
        >>> jap = juap.create_attack("jap", classifier=clf, interpreter=cam, norm="linf", eps=10, steps=100)
        >>> x_adv = jap(x)   # (N, 3, H, W)
    """

    name = "jap"
    label = "JAP"
    takes_interpreter = True
    hyperparams = {
        "generator": Param(str),
        "generator_options": Param(abc.Mapping, optional=True, dry_run={"ngf": 8}),
        "objective": Param(str, choices=OBJECTIVES),
        "target": Param(int, low=0, optional=True),
        "lam": Param(float, low=0),
        "delta": Param(float, optional=True),
        "steps": Param(int, low=1, dry_run=1),
        "lr": Param(float, low=0, low_open=True),
        "betas": Param(tuple, length=2, items=float, low=0, high=1),
        "surrogate": Param((bool, str), choices=("auto", True, False)),
        "tau": Param(float, low=0, low_open=True),
        "seed": Param(int),
    }

    def __init__(
        self,
        *,
        interpreter: Optional[Interpreter] = None,
        generator: str = "resnet",
        generator_options: Optional[Mapping[str, Any]] = SMALL_GENERATOR,
        objective: str = "untargeted",
        target: Optional[int] = None,
        lam: float = 1.0,
        delta: Optional[float] = -0.8,
        steps: int = 100,
        lr: float = 1e-2,
        betas: tuple = (0.5, 0.999),
        surrogate: bool | str = "auto",
        tau: float = 1e-4,
        seed: int = 0,
        **common,  # classifier, norm, eps, device: Attack's
    ) -> None:
        super().__init__(**common)
        self.check_arguments(locals())
        if objective == "targeted":
            check_target(target, self.classifier.num_classes)
        self.wiring = InterpreterWiring.check(interpreter, surrogate=surrogate, tau=tau)
        GENERATORS.get(generator)  # unknown names fail now, listing the known ones
        # eq 16 per image: each image's log CE hinged at delta, plus lambda times its map distance
        self.loss = JointLoss(
            objective=objective, target=target, fool_loss="mean_log", hinge="image", delta=delta
        )
        self.interpreter, self.use_surrogate, self.tau = interpreter, self.wiring.use_surrogate, tau
        self.generator = generator
        self.generator_options = dict(generator_options or {})
        self.objective, self.target, self.lam, self.delta = objective, target, float(lam), delta
        self.steps, self.lr, self.betas, self.seed = int(steps), float(lr), tuple(betas), int(seed)

    @property
    def hinge_level(self) -> Optional[float]:
        return self.loss.hinge_level

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adversarial images (N, 3, H, W) for images ``x`` in [0, 1]; ``y`` is unused (C_x = f(x))."""
        x = x.to(self.device)
        n = len(x)
        if n == 0:
            raise ConfigError(f"{self.name}: no images to attack (x has shape {tuple(x.shape)})")
        run, params, buffers, noise = self._generators(x)
        opt = torch.optim.Adam(params.values(), lr=self.lr, betas=self.betas)
        clf = self.classifier
        train_interp = self.wiring.trainer(clf)
        benign = self._benign(x)
        best = x.clone()
        best_score = torch.full((n,), -float("inf"), device=self.device)
        first = len(self.history) and self.history[-1]["step"]  # steps go on from the previous batch
        for s in range(1, self.steps + 1):
            g = run(params, buffers, noise)[:, 0]  # (N, 3, H, W)
            n_hat = scale_to_budget(g, norm=self.norm, eps=self.eps)  # eq 17, per image
            adv = self.loss.adversarial(apply_perturbation(x, n_hat), benign, clf, train_interp)
            loss_i = self.loss.per_image(benign, adv, lam=self.lam)  # (N,)
            opt.zero_grad(set_to_none=True)
            loss_i.sum().backward()
            opt.step()
            with torch.no_grad():  # keep each image's best: fooled first, then closest map
                x_hat = adv.x_hat.detach()
                score = self._score(x_hat, benign.logits, benign.maps)
                better = score > best_score
                best[better] = x_hat[better]
                best_score = torch.where(better, score, best_score)
                changed = is_fooled(benign.logits.argmax(1), adv.logits.argmax(1)).float().mean().item()
                kept = (best_score > 0).float().mean().item()  # images with a fooling candidate kept
            row = {"step": first + s, "loss": loss_i.mean().item(), "batch_fooling_ratio": changed}
            self.history.append({**row, "kept_fooled": kept})
        return best

    def _generators(self, x: torch.Tensor) -> Tuple[Callable, dict, dict, torch.Tensor]:
        """One fresh generator per image, stacked: (run, params, buffers, noise (N, 1, 3, H, W)), where
        ``run(params, buffers, noise)`` maps each image's noise through its own generator."""
        n = len(x)
        torch.manual_seed(self.seed)
        gens = [GENERATORS.create(self.generator, **self.generator_options).to(self.device) for _ in range(n)]
        params, buffers = stack_module_state(gens)
        base = gens[0]
        noise = torch.rand((n, 1) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(self.seed))
        noise = noise.to(self.device)

        def one(p, b, z):  # z (1, 3, H, W) -> (1, 3, H, W)
            return functional_call(base, (p, b), (z,))

        return vmap(one, in_dims=(0, 0, 0), randomness="different"), params, buffers, noise

    @torch.no_grad()
    def _benign(self, x: torch.Tensor) -> Benign:
        """f(x), the objective's classes and the unmodified interpreter's maps of the prediction."""
        logits = self.classifier(x)
        classes = attack_classes(logits, objective=self.objective, target=self.target)
        maps = self.interpreter(x, logits.argmax(1)) if self.interpreter is not None else None
        return Benign(logits, classes, maps)

    def _score(self, x_hat, benign_logits, benign_maps) -> torch.Tensor:
        pred = self.classifier(x_hat).argmax(1)
        target = self.target if self.objective == "targeted" else None
        hit = is_fooled(benign_logits.argmax(1), pred, target=target).float()
        if self.interpreter is None:
            return hit
        return hit * 2 - l1_distance(self.interpreter(x_hat, pred), benign_maps)
