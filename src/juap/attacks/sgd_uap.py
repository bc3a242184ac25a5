"""SGD-UAP: stochastic gradient ascent on the universal perturbation itself, a baseline beyond the paper.

Shafahi et al., "Universal adversarial training", AAAI 2020, https://arxiv.org/abs/1812.03705 (their
Algorithm 2, as in the public ``uap_sgd`` of kenny-co/sgd-uap-torch). The cheap, strong reference
that every universal attack should be compared with: a generator attack that fools much less than it
on the same model is undertrained, not a finding.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .._registry import ATTACKS
from .._validate import Param, check_params
from ..budget import apply_perturbation, project
from ..errors import ConfigError
from ..losses import check_target
from ..runtime.loop import Checkpointing, TrainLoop
from .base import UniversalAttack, iter_batches


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
        "epochs": Param(int, 10, low=1),
        "batch_size": Param(int, 32, low=1),
        "step_size": Param(float, 0.1, low=0, low_open=True),
        "decay": Param(float, 0.8, low=0, high=1, low_open=True),
        "beta": Param(float, 12.0, low=0, low_open=True),
        "objective": Param(str, "untargeted", choices=("untargeted", "targeted")),
        "target": Param(int, None, low=0, optional=True),
        "seed": Param(int, 0, optional=True),
    }
    objectives = ("untargeted", "targeted")  # the grid crosses only these

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
        given = dict(epochs=epochs, batch_size=batch_size, step_size=step_size, decay=decay, beta=beta)
        given.update(objective=objective, target=target, seed=seed)
        check_params(self.name, self.hyperparams, given)
        if objective == "targeted":
            check_target(target, self.classifier.num_classes)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.step_size, self.decay, self.beta = float(step_size), float(decay), float(beta)
        self.objective, self.target, self.seed = objective, target, seed
        self.best_epoch: Optional[int] = None

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
        """Learn v from ``data``; with ``val_data`` keep the epoch's v with the highest fooling ratio there
        (else the last). ``checkpoint``: save after every epoch (and resume after the last finished one).
        ``callback(step, perturbation)`` is called after every step (``perturbation()`` returns v);
        ``log`` receives one history row per epoch."""
        gen = getattr(data, "generator", None)  # a seeded loader's order depends on its generator's state
        gen = gen if isinstance(gen, torch.Generator) else None
        run: Dict[str, Any] = {"v": None, "best": None, "steps": 0}
        loop = TrainLoop(
            self.name, self.epochs, checkpoint=checkpoint, log=log, progress=progress, unit="epoch"
        )

        def load(state):
            self.check_identity(state["identity"])
            run.update(v=state["v"].to(self.device), best=state["best"], steps=int(state.get("steps", 0)))
            if gen is not None and state.get("loader") is not None:
                gen.set_state(state["loader"])

        def snapshot():
            loader = gen.get_state() if gen is not None else None
            return {
                "identity": self.checkpoint_identity(),
                "v": run["v"],
                "best": run["best"],
                "steps": run["steps"],
                "loader": loader,
            }

        def epoch(e: int):
            run["v"], loss, run["steps"] = self._epoch(data, run["v"], e - 1, callback, run["steps"])
            row = {"loss": loss}
            if val_data is not None:
                row["val_fooling_ratio"] = self.fooling_ratio(val_data, run["v"])
                if run["best"] is None or row["val_fooling_ratio"] > run["best"]["fooling_ratio"]:
                    run["best"] = {"epoch": e, "fooling_ratio": row["val_fooling_ratio"], "v": run["v"]}
            loop.record(e, row, images={"perturbation": run["v"]})

        loop.run(epoch, snapshot=snapshot, load=load)
        self.history = loop.history
        v, best = run["v"], run["best"]
        if best is not None:
            v, self.best_epoch = best["v"].to(self.device), best["epoch"]
        else:
            self.best_epoch = self.epochs
        self.perturbation = v
        return v

    def _epoch(self, data, v: Optional[torch.Tensor], epoch: int, callback=None, steps: int = 0):
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
            if callback is not None:
                callback(steps, lambda v=v: v)
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
            ok = adv == self.target if self.objective == "targeted" else adv != self.classifier(x).argmax(1)
            hit, n = hit + int(ok.sum()), n + len(x)
        return hit / max(n, 1)
