"""UAP: the DeepFool-based universal perturbation of Moosavi-Dezfooli et al., a baseline (paper §IV-B3)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._registry import ATTACKS
from .._validate import Param, check_params
from ..budget import apply_perturbation, project
from ..errors import ConfigError
from ..runtime.loop import Checkpointing, TrainLoop
from ._folding import folded_copy
from .base import UniversalAttack, iter_batches

_TOL = 1e-8  # keeps DeepFool's divisions finite


class UAP(UniversalAttack):
    r"""'Universal adversarial perturbations' (Moosavi-Dezfooli et al., CVPR 2017),
    https://arxiv.org/abs/1610.08401; the algorithm of ART's ``UniversalPerturbation(attacker="deepfool")``,
    batched.

    Distance: L_inf or L_2 (the DeepFool steps are L_2-minimal, as in the paper and ART)::

        v <- 0
        while fooling_rate(v) < target_fooling_rate and passes < max_passes:
            for x_i in the data (shuffled each pass):
                if f(x_i + v) == f(x_i):                      # not fooled yet
                    dr <- DeepFool(x_i + v)                    # minimal step across the boundary
                    if f(x_i + v + dr) != f(x_i): v <- project(v + dr, eps)

    Batched: the not-yet-fooled images of a batch run DeepFool together, all at the batch's starting v;
    their steps ``dr_i`` are then folded into v one image after another, ``v <- project(v + dr_i)``.
    ``batch_size=1`` is the sequential algorithm; small batches (the default 8) keep close to it. DeepFool
    applies the overshoot at every iteration, as the paper's code does (ART applies it after its loop).
    Every x + v is clamped to [0, 1]. Classes are the benign predictions f(x) (labels are not used).
    ``fooling_rate_`` is ART's ``fooling_rate``: the share of the data with f(clamp(x + v, 0, 1)) != f(x),
    computed after every pass (``history``).

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` to fool (images in [0, 1]).
        norm, eps: budget, eps in 0-255 pixel units (ART's ``eps`` is ``eps / 255`` on [0, 1] images).
        max_passes: passes over the data at most (ART's ``max_iter``).
        target_fooling_rate: stop once reached (ART's ``1 - delta``).
        overshoot: DeepFool's overshoot (0.02, the paper's; ART's DeepFool ``epsilon``).
        deepfool_steps: DeepFool iterations per image at most (ART's DeepFool ``max_iter``).
        nb_grads: DeepFool considers the top ``nb_grads`` classes at x_i + v (ART's default 10).
        batch_size: images per DeepFool batch.
        fast: run DeepFool on a copy of the classifier whose eval-mode BatchNorms are folded into the
            preceding convolutions (and, on a CPU, stored channels-last): the same function up to float
            rounding (checked on the first batch, else the classifier itself is used), and faster per
            DeepFool step (README, "Performance"). The fooling rates are computed with the classifier.
        seed: shuffles an image tensor with ``seed + pass`` in every pass; ``None`` keeps its order. A
            loader keeps its own order.
        device: where to compute; default: the classifier's device.

    Shape:
        - data: images (N, 3, H, W) in [0, 1], or a loader of ``(x, y, ...)``.
        - output of :meth:`fit`: the perturbation v (3, H, W), ``||v||_p <= eps / 255``.

    Example::

        >>> attack = juap.create_attack("uap", classifier=clf, norm="linf", eps=10, max_passes=5)
        >>> v = attack.fit(images)               # (3, H, W)
        >>> x_adv = attack.perturb(images)       # clamp(images + v, 0, 1)
        >>> attack.fooling_rate_, attack.history
    """

    name = "uap"
    label = "UAP"
    hyperparams = {
        "max_passes": Param(int, 10, low=1),
        "target_fooling_rate": Param(float, 0.8, low=0, high=1, low_open=True),
        "overshoot": Param(float, 0.02, low=0),
        "deepfool_steps": Param(int, 10, low=1),
        "nb_grads": Param(int, 10, low=2),
        "batch_size": Param(int, 8, low=1),
        "fast": Param(bool, True),
        "seed": Param(int, 0, optional=True),
    }

    def __init__(
        self,
        *,
        max_passes: int = 10,
        target_fooling_rate: float = 0.8,
        overshoot: float = 0.02,
        deepfool_steps: int = 10,
        nb_grads: int = 10,
        batch_size: int = 8,
        fast: bool = True,
        seed: Optional[int] = 0,
        **kw,
    ) -> None:
        super().__init__(**kw)
        given = dict(max_passes=max_passes, target_fooling_rate=target_fooling_rate, overshoot=overshoot)
        given.update(deepfool_steps=deepfool_steps, nb_grads=nb_grads, batch_size=batch_size)
        given.update(fast=fast, seed=seed)
        check_params(self.name, self.hyperparams, given)
        if self.classifier.num_classes < 2:
            raise ConfigError("uap: the classifier must have at least 2 classes")
        self.max_passes, self.target_fooling_rate = max_passes, float(target_fooling_rate)
        self.overshoot, self.deepfool_steps, self.nb_grads = float(overshoot), deepfool_steps, nb_grads
        self.batch_size, self.seed, self.fast = batch_size, seed, bool(fast)
        self._net: Optional[nn.Module] = None  # what DeepFool differentiates during fit
        self.fooling_rate_: Optional[float] = None
        self.converged_: Optional[bool] = None

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
        """Learn v from ``data``; sets ``perturbation``, ``fooling_rate_``, ``converged_`` and ``history``.

        Args:
            val_data: not used: UAP stops when its fooling rate on ``data`` reaches the target.
            checkpoint: save after every pass (v, the pass count, the history, the data order and RNG
                states); SIGINT/SIGTERM stop at the end of the current pass with a checkpoint (a second
                signal stops at once); resume continues after the last finished pass (the same v as an
                uninterrupted run's, bitwise on CPU with the same data and settings).
            callback: called after every batch as ``callback(batches, perturbation)``, with the number of
                batches so far and ``perturbation()`` returning the current v; an exception it raises
                stops the fit (benchmarks time attacks this way).
            log: receives one history row per pass.
        """
        benign = None  # f(x) of every image of a tensor, computed once
        if isinstance(data, torch.Tensor):
            if len(data) == 0:
                raise ConfigError("uap: the data is empty: no images to learn a perturbation from")
            batches = iter_batches(data, batch_size=4 * self.batch_size, device=self.device)
            benign = torch.cat([self._predict(x) for x, _ in batches])
        gen = getattr(data, "generator", None)  # a seeded loader's order depends on its generator's state
        gen = gen if isinstance(gen, torch.Generator) else None
        run: Dict[str, Any] = {"v": None, "fooling_rate": 0.0, "batches": 0}
        loop = TrainLoop(
            self.name, self.max_passes, checkpoint=checkpoint, log=log, progress=False, unit="pass"
        )

        def load(state):
            self.check_identity(state["identity"])
            run.update(v=state["v"].to(self.device), fooling_rate=float(state["fooling_rate"]))
            if gen is not None and state.get("loader") is not None:
                gen.set_state(state["loader"])
            loop.finished = run["fooling_rate"] >= self.target_fooling_rate

        def snapshot():
            loader = gen.get_state() if gen is not None else None
            return {
                "identity": self.checkpoint_identity(),
                "v": run["v"],
                "fooling_rate": run["fooling_rate"],
                "loader": loader,
            }

        def one_pass(p: int):
            run["v"], run["fooling_rate"], updates = self._pass(data, benign, run["v"], p, progress, tick)
            loop.finished = run["fooling_rate"] >= self.target_fooling_rate
            loop.record(
                p, {"fooling_rate": run["fooling_rate"], "updates": updates}, {"perturbation": run["v"]}
            )

        def tick(v: torch.Tensor) -> None:
            run["batches"] += 1
            if callback is not None:
                callback(run["batches"], lambda: v)

        start = loop.start(snapshot, load)
        if not loop.finished:
            loop.run(one_pass, snapshot=snapshot, load=load, start=start)
        self.history = loop.history
        self.perturbation, self.fooling_rate_, self._net = run["v"], run["fooling_rate"], None
        self.converged_ = run["fooling_rate"] >= self.target_fooling_rate
        return self.perturbation

    def _pass(self, data, benign, v, p: int, progress: bool, tick: Callable[[torch.Tensor], None]):
        """Pass ``p`` of Algorithm 1 of Moosavi-Dezfooli et al.: DeepFool steps folded into v.

        Returns:
            (v, the fooling rate of v on ``data``, the number of images whose step was folded in).
        """
        seen = fooled = updates = 0
        bar = tqdm(
            total=_num_images(data),
            desc=f"{self.name} pass {p}",
            unit="img",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        shuffle = None if self.seed is None else self.seed + p - 1
        for x, fx in self._batches(data, benign, self.batch_size, shuffle):
            if self._net is None:
                self._net = folded_copy(self.classifier, x) if self.fast else self.classifier
            v = torch.zeros_like(x[0]) if v is None else v  # (3, H, W)
            x_v = apply_perturbation(x, v)  # (B, 3, H, W)
            todo = self._predict(x_v) == fx if v.any() else torch.ones_like(fx, dtype=torch.bool)
            if todo.any():  # the images not fooled yet
                dr, ok = self._deepfool(x_v[todo], fx[todo])
                for d in dr[ok]:  # fold each image's step into v, in data order
                    v = project(v + d, norm=self.norm, eps=self.eps)
                updates += int(ok.sum())
            seen, fooled = seen + len(x), fooled + int((~todo).sum())
            bar.set_postfix(fooled=f"{fooled / seen:.3f}", updates=updates)
            bar.update(len(x))
            tick(v)
        if v is None:
            bar.close()
            self._net = None
            raise ConfigError("uap: the data is empty: no images to learn a perturbation from")
        fooling_rate = self.fooling_rate(data, v, benign)
        bar.set_postfix(fooling_rate=f"{fooling_rate:.3f}", updates=updates)
        bar.close()
        return v, fooling_rate, updates

    def fooling_rate(self, data, v: torch.Tensor, benign: Optional[torch.Tensor] = None) -> float:
        """ART's ``fooling_rate`` of v (3, H, W) on ``data``: the share with f(clamp(x + v, 0, 1)) != f(x).

        ``benign``: f(x) of every image of a tensor ``data``, when already known.
        """
        n = fooled = 0
        for x, fx in self._batches(data, benign, 4 * self.batch_size, None):
            n, fooled = (
                n + len(x),
                fooled + int((self._predict(apply_perturbation(x, v), exact=True) != fx).sum()),
            )
        return fooled / max(n, 1)

    def _batches(
        self, data, benign: Optional[torch.Tensor], batch_size: int, shuffle_seed: Optional[int]
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(x, f(x))`` batches; ``benign`` holds f of every image when ``data`` is a tensor."""
        if benign is None:
            batches = iter_batches(data, batch_size=batch_size, device=self.device, shuffle_seed=shuffle_seed)
            for x, _ in batches:
                yield x, self._predict(x, exact=True)
            return
        order = (
            torch.arange(len(data))
            if shuffle_seed is None
            # iter_batches' order
            else torch.randperm(len(data), generator=torch.Generator().manual_seed(shuffle_seed))
        )
        for idx in order.split(batch_size):
            yield data[idx].to(self.device), benign[idx.to(benign.device)]

    @torch.no_grad()
    def _predict(self, x: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
        """f(x) (B,): with the classifier itself if ``exact`` or outside fit, else with DeepFool's copy."""
        net = self.classifier if exact or self._net is None else self._net
        return net(x).argmax(1)

    def _deepfool(self, x0: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batched DeepFool (L_2) from x0 (B, 3, H, W), predicted as ``label`` (B,).

        Returns:
            dr (B, 3, H, W), overshoot included and x0 + dr in [0, 1]; ok (B,): f(x0 + dr) != label.
        """
        k = min(self.nb_grads, self.classifier.num_classes)
        r_tot, x_adv = torch.zeros_like(x0), x0.clone()
        active, classes = torch.arange(len(x0), device=x0.device), label[:, None]
        for step in range(self.deepfool_steps):
            xa = x_adv[active].requires_grad_(True)
            net = self._net if self._net is not None else self.classifier
            logits = net(xa)  # (b, C)
            if step == 0:  # the classes considered (B, k): the predicted one, then the top k-1 others at x0
                others = logits.detach().scatter(1, label[:, None], -math.inf).topk(k - 1, dim=1).indices
                classes = torch.cat([label[:, None], others], dim=1)
            cls = classes[active]  # (b, k)
            w = torch.stack(
                [_grad_diff(logits, xa, cls[:, 0], cls[:, j], last=j == k - 1) for j in range(1, k)], dim=1
            )  # (b, k-1, D): grad of f_l - f_label
            with torch.no_grad():
                f = logits.gather(1, cls)
                f = (f[:, 1:] - f[:, :1]).abs()  # (b, k-1)
                w_norm = w.norm(dim=2) + _TOL
                dist, l_star = (f / w_norm).min(dim=1)  # distance to the nearest linearised boundary
                w_l = w[torch.arange(len(w)), l_star] / w_norm.gather(1, l_star[:, None])  # (b, D), unit
                r_tot[active] += ((dist + 1e-4)[:, None] * w_l).view_as(xa)
                x_adv[active] = (x0[active] + (1 + self.overshoot) * r_tot[active]).clamp(0.0, 1.0)
                still = self._predict(x_adv[active]) == label[active]
            active = active[still]
            if len(active) == 0:
                break
        ok = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        ok[active] = False
        return x_adv - x0, ok


def _grad_diff(
    logits: torch.Tensor, x: torch.Tensor, label: torch.Tensor, other: torch.Tensor, *, last: bool
) -> torch.Tensor:
    """Per-sample gradient of logits[other] - logits[label] w.r.t. x, flattened (b, D)."""
    cot = torch.zeros_like(logits).scatter_(1, other[:, None], 1.0).scatter_(1, label[:, None], -1.0)
    (g,) = torch.autograd.grad(logits, x, cot, retain_graph=not last)
    return g.flatten(1)


def _num_images(data) -> Optional[int]:
    """The number of images for the progress bar, where known."""
    try:
        return len(data if isinstance(data, torch.Tensor) else data.dataset)
    except (AttributeError, TypeError):
        return None


ATTACKS.register("uap")(UAP)
