"""SGD-UAP: stochastic gradient ascent on the universal perturbation itself, a baseline beyond the paper.

Shafahi et al., "Universal adversarial training", AAAI 2020, https://arxiv.org/abs/1812.03705 (their
Algorithm 2, as in the public ``uap_sgd`` of kenny-co/sgd-uap-torch). The cheap, strong reference
that every universal attack should be compared with: a generator attack that fools much less than it
on the same model is undertrained, not a finding.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from .._registry import ATTACKS
from .._validate import Param
from ..budget import apply_perturbation, project
from ..errors import ConfigError
from ..losses import check_target
from ..metrics import is_fooled
from .base import FitResult, UniversalAttack, iter_batches


@ATTACKS.register("sgd_uap")
class SGDUAP(UniversalAttack):
    r"""Minibatch gradient ascent on a universal perturbation v, projected onto the budget::

        v <- 0
        for epoch e in 0 .. epochs-1:
            step <- step_size * zeta * decay^e
            for each batch x:
                g <- grad_v mean_i min(CE(f(clamp(x_i + v, 0, 1)), f(x_i)), beta)   # clipped CE
                v <- project(v + step * sign(g))               (L_inf)
                v <- project(v + step * g / ||g||_2)           (L_2)

    Untargeted by default against the benign prediction f(x) (eq 7's C_x); ``objective="targeted"``
    descends the clipped CE of ``target`` instead. The clip ``beta`` stops images that are already fooled
    from dominating the batch gradient. With ``step_size=0.8, decay=1.0`` and labels equal to the
    predictions this is step for step the public ``uap_sgd`` (whose step ``eps * step_decay`` does not
    change between epochs).

    Args:
        classifier, norm, eps: as for every attack (eps in 0-255 units).
        epochs: passes over the data.
        batch_size: images per step (for an image tensor; a loader keeps its own batches).
        step_size: the first epoch's step as a fraction of the budget zeta.
        decay: the step's factor per epoch.
        beta: the cross-entropy clip (12, the public code's).
        objective: ``"untargeted"`` or ``"targeted"`` (with ``target``).
        seed: shuffles an image tensor with ``seed + epoch``; ``None`` keeps its order.

    Shape:
        - data: images (N, 3, H, W) in [0, 1], or a loader of ``(x, y, ...)``.
        - output of :meth:`fit`: v (3, H, W), ``||v||_p <= eps / 255``.

    Example::

        >>> attack = juap.create_attack("sgd_uap", classifier=clf, norm="linf", eps=10, epochs=5)
        >>> v = attack.fit(train_loader, val_data=val_loader)
    """

    name = "sgd_uap"
    label = "SGD-UAP"
    hyperparams = {
        "epochs": Param(int, low=1, dry_run=1),
        "batch_size": Param(int, low=1, dry_run=6),
        "step_size": Param(float, low=0, low_open=True),
        "decay": Param(float, low=0, high=1, low_open=True),
        "beta": Param(float, low=0, low_open=True),
        "objective": Param(str, choices=("untargeted", "targeted")),
        "target": Param(int, low=0, optional=True),
        "seed": Param(int, optional=True),
    }
    objectives = ("untargeted", "targeted")  # the grid crosses only these

    unit = "epoch"

    def __init__(
        self,
        *,
        epochs: int = 10,
        batch_size: int = 32,
        step_size: float = 0.1,
        decay: float = 0.8,
        beta: float = 12.0,
        objective: str = "untargeted",
        target: Optional[int] = None,
        seed: Optional[int] = 0,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.check_arguments(locals())
        if objective == "targeted":
            check_target(target, self.classifier.num_classes)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.step_size, self.decay, self.beta = float(step_size), float(decay), float(beta)
        self.objective, self.target, self.seed = objective, target, seed

    # -- the trainer (UniversalAttack.fit runs it): one epoch a step; with val_data the epoch's v with the
    # highest fooling ratio there is kept (else the last); callback after every batch --------------------
    @property
    def num_steps(self) -> int:
        return self.epochs

    def init(self, data, val_data, *, progress: bool = True) -> None:
        self.data, self.val_data = data, val_data
        self.v: Optional[torch.Tensor] = None
        self.best: Optional[Dict[str, Any]] = None
        self.batches_done = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"v": self.v, "best": self.best, "steps": self.batches_done}

    def load_state_dict(self, state) -> None:
        self.v, self.best = state["v"].to(self.device), state["best"]
        self.batches_done = int(state.get("steps", 0))

    def step(self, e: int):
        self.v, loss, self.batches_done = self._epoch(self.data, self.v, e - 1, self.batches_done)
        row = {"loss": loss}
        if self.val_data is not None:
            row["val_fooling_ratio"] = self.fooling_ratio(self.val_data, self.v)
            if self.best is None or row["val_fooling_ratio"] > self.best["fooling_ratio"]:
                self.best = {"epoch": e, "fooling_ratio": row["val_fooling_ratio"], "v": self.v}
        return row, {"perturbation": self.v}

    def result(self) -> FitResult:
        if self.best is None:
            return FitResult(self.v, selected=self.epochs)
        val = {"fooling_ratio": self.best["fooling_ratio"]}
        return FitResult(self.best["v"].to(self.device), selected=self.best["epoch"], validation=val)

    def _epoch(self, data, v: Optional[torch.Tensor], epoch: int, steps: int = 0):
        """One pass over ``data``; returns (v, the mean loss, the number of steps so far)."""
        step = self.step_size * self.zeta * self.decay**epoch
        shuffle = None if self.seed is None else self.seed + epoch
        total, n = 0.0, 0
        for x, _ in iter_batches(data, batch_size=self.batch_size, device=self.device, shuffle_seed=shuffle):
            v = torch.zeros_like(x[0]) if v is None else v  # (3, H, W)
            with torch.no_grad():
                labels = self._labels(x)
            v_var = v.clone().requires_grad_(True)
            logits = self.classifier(apply_perturbation(x, v_var))
            ce = F.cross_entropy(logits, labels, reduction="none").clamp_max(self.beta)  # (B,)
            loss = ce.mean() if self.objective == "untargeted" else -ce.mean()  # to ascend
            (g,) = torch.autograd.grad(loss, v_var)
            with torch.no_grad():
                direction = g.sign() if self.norm == "linf" else g / g.norm().clamp_min(1e-12)
                v = project(v + step * direction, norm=self.norm, eps=self.eps)
            total, n = total + float(loss.detach()) * len(x), n + len(x)
            steps += 1
            self.notify(steps, lambda v=v: v)
        if v is None:
            raise ConfigError("sgd_uap: the data is empty: no images to learn a perturbation from")
        return v, total / n, steps

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        if self.objective == "targeted":
            return torch.full((len(x),), int(self.target), dtype=torch.long, device=x.device)
        return self.classifier(x).argmax(1)

    @torch.no_grad()
    def fooling_ratio(self, data, v: torch.Tensor) -> float:
        """The share of ``data`` whose prediction v changes (the target success rate when targeted)."""
        hit = n = 0
        for x, _ in iter_batches(data, batch_size=4 * self.batch_size, device=self.device):
            adv = self.classifier(apply_perturbation(x, v)).argmax(1)
            target = self.target if self.objective == "targeted" else None
            hit, n = hit + int(is_fooled(self.classifier(x).argmax(1), adv, target=target).sum()), n + len(x)
        return hit / max(n, 1)
