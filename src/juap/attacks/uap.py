"""UAP: the DeepFool-based universal perturbation of Moosavi-Dezfooli et al., a baseline (paper §IV-B3)."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._registry import ATTACKS
from .._validate import Param
from ..budget import apply_perturbation, project
from ..errors import ConfigError
from ..metrics import is_fooled
from ._folding import folded_copy
from .base import FitResult, UniversalAttack, iter_batches

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
            DeepFool step (docs/performance.md). The fooling rates are computed with the classifier.
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
    unit = "pass"
    shows_loop_bar = False  # a bar per pass, over the images
    hyperparams = {
        "max_passes": Param(int, low=1, dry_run=1),
        "target_fooling_rate": Param(float, low=0, high=1, low_open=True),
        "overshoot": Param(float, low=0),
        "deepfool_steps": Param(int, low=1),
        "nb_grads": Param(int, low=2),
        "batch_size": Param(int, low=1, dry_run=6),
        "fast": Param(bool),
        "seed": Param(int, optional=True),
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
        self.check_arguments(locals())
        if self.classifier.num_classes < 2:
            raise ConfigError("uap: the classifier must have at least 2 classes")
        self.max_passes, self.target_fooling_rate = max_passes, float(target_fooling_rate)
        self.overshoot, self.deepfool_steps, self.nb_grads = float(overshoot), deepfool_steps, nb_grads
        self.batch_size, self.seed, self.fast = batch_size, seed, bool(fast)
        self._net: Optional[nn.Module] = None  # what DeepFool differentiates during fit
        self.fooling_rate_: Optional[float] = None
        self.converged_: Optional[bool] = None

    # -- the trainer (UniversalAttack.fit runs it): one pass over the data a step, until the fooling rate
    # on the data reaches the target; ``val_data`` is not used. SIGINT/SIGTERM stop at the end of the
    # current pass with a checkpoint; ``callback(batches, perturbation)`` after every batch -------------
    @property
    def num_steps(self) -> int:
        return self.max_passes

    def init(self, data, val_data, *, progress: bool = True) -> None:
        self.data, self.progress = data, progress
        self.benign = None  # f(x) of every image of a tensor, computed once
        if isinstance(data, torch.Tensor):
            batches = iter_batches(data, batch_size=4 * self.batch_size, device=self.device)
            self.benign = torch.cat([self._predict(x) for x, _ in batches])
        self.v: Optional[torch.Tensor] = None
        self.fooling_rate_, self.batches_done = 0.0, 0

    def state_dict(self) -> Dict[str, Any]:
        return {"v": self.v, "fooling_rate": self.fooling_rate_}

    def load_state_dict(self, state) -> None:
        self.v, self.fooling_rate_ = state["v"].to(self.device), float(state["fooling_rate"])

    def converged(self) -> bool:
        return self.fooling_rate_ >= self.target_fooling_rate

    def step(self, p: int):
        self.v, self.fooling_rate_, updates = self._pass(self.data, self.benign, self.v, p, self.progress)
        return {"fooling_rate": self.fooling_rate_, "updates": updates}, {"perturbation": self.v}

    def result(self) -> FitResult:
        self._net, self.converged_ = None, self.converged()
        return FitResult(self.v, train_fooling_rate=self.fooling_rate_, converged=self.converged_)

    def _pass(self, data, benign, v, p: int, progress: bool):
        """Pass ``p`` of Algorithm 1 of Moosavi-Dezfooli et al.: DeepFool steps folded into v.

        Returns:
            (v, the fooling rate of v on ``data``, the number of images whose step was folded in).
        """
        seen = n_fooled = updates = 0
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
            seen, n_fooled = seen + len(x), n_fooled + int((~todo).sum())
            bar.set_postfix(fooled=f"{n_fooled / seen:.3f}", updates=updates)
            bar.update(len(x))
            self.batches_done += 1
            self.notify(self.batches_done, lambda v=v: v)
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
        n = changed = 0
        for x, fx in self._batches(data, benign, 4 * self.batch_size, None):
            hit = is_fooled(fx, self._predict(apply_perturbation(x, v), exact=True))
            n, changed = n + len(x), changed + int(hit.sum())
        return changed / max(n, 1)

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
