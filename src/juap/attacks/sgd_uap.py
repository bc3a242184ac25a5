"""SGD-UAP: stochastic gradient ascent on the universal perturbation itself, a baseline beyond the paper.

Shafahi et al., "Universal adversarial training", AAAI 2020, https://arxiv.org/abs/1812.03705 (their
Algorithm 2, as in the public ``uap_sgd`` of kenny-co/sgd-uap-torch). The cheap, strong reference
that every universal attack should be compared with: a generator attack that fools much less than it
on the same model is undertrained, not a finding.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._registry import ATTACKS
from ..budget import apply_perturbation, project
from ..errors import CheckpointError, ConfigError
from ..losses import check_target
from ..runtime.config import check_range
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
        check_range("epochs", epochs, low=1)
        check_range("batch_size", batch_size, low=1)
        check_range("step_size", step_size, low=0, low_open=True)
        check_range("decay", decay, low=0, high=1, low_open=True)
        check_range("beta", beta, low=0, low_open=True)
        if objective not in ("untargeted", "targeted"):
            raise ConfigError(f"sgd_uap: objective = {objective!r}; allowed values: untargeted, targeted")
        if objective == "targeted":
            check_target(target, self.classifier.num_classes)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"sgd_uap: seed must be an integer or None, got {seed!r}")
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
        checkpoint_dir=None,
        checkpoint_every: Optional[int] = None,
        resume: bool = False,
        callback: Optional[Callable[[int, Callable[[], torch.Tensor]], None]] = None,
    ) -> torch.Tensor:
        """Learn v from ``data``; with ``val_data`` keep the epoch's v with the highest fooling ratio there
        (else the last). Checkpoints after every epoch in ``checkpoint_dir`` (``checkpoint_every`` is
        accepted for a uniform interface); ``resume`` continues after the last finished epoch.
        ``callback(step, perturbation)`` is called after every step (``perturbation()`` returns v)."""
        from ..runtime.checkpoint import LoopCheckpoints, rng_states, set_rng_states

        ckpt = LoopCheckpoints(checkpoint_dir, every=1, kind=self.name, resume=resume)
        gen = getattr(data, "generator", None)  # a seeded loader's order depends on its generator's state
        gen = gen if isinstance(gen, torch.Generator) else None
        identity = {"norm": self.norm, "eps": self.eps, "seed": self.seed, "batch_size": self.batch_size}
        v, best, start, steps, self.history = None, None, 0, 0, []
        state = ckpt.resume_state()
        if state is not None:
            diff = {
                k: (state["identity"].get(k), x) for k, x in identity.items() if state["identity"].get(k) != x
            }
            if diff:
                raise CheckpointError(
                    "the sgd_uap checkpoint was written with other settings, so it cannot be resumed: "
                    + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                )
            v, start, self.history = state["v"].to(self.device), int(state["step"]), list(state["history"])
            best = state["best"]
            if gen is not None and state.get("loader") is not None:
                gen.set_state(state["loader"])
            set_rng_states(state["rng"])
        bar = tqdm(
            range(start, self.epochs), initial=start, total=self.epochs, desc=self.name, disable=not progress
        )
        with ckpt.stop_signals():
            for epoch in bar:
                v, loss, steps = self._epoch(data, v, epoch, callback, steps)
                record = {"epoch": epoch + 1, "loss": loss}
                if val_data is not None:
                    record["val_fooling_ratio"] = self.fooling_ratio(val_data, v)
                    if best is None or record["val_fooling_ratio"] > best["fooling_ratio"]:
                        best = {"epoch": epoch + 1, "fooling_ratio": record["val_fooling_ratio"], "v": v}
                    bar.set_postfix(val_fr=f"{record['val_fooling_ratio']:.3f}")
                self.history.append(record)
                ckpt.step_end(
                    epoch + 1,
                    lambda v=v, b=best, e=epoch + 1: {
                        "step": e,
                        "identity": identity,
                        "v": v,
                        "best": b,
                        "history": self.history,
                        "loader": gen.get_state() if gen is not None else None,
                        "rng": rng_states(),
                    },
                    last=epoch + 1 == self.epochs,
                )
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
