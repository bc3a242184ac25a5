"""UAP: the DeepFool-based universal perturbation of Moosavi-Dezfooli et al., a baseline (paper §IV-B3)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from .._registry import ATTACKS
from ..budget import apply_perturbation, project
from ..errors import ConfigError
from .base import UniversalAttack, iter_batches

_TOL = 1e-8


class UAP(UniversalAttack):
    r"""'Universal adversarial perturbations' (Moosavi-Dezfooli et al., CVPR 2017),
    https://arxiv.org/abs/1610.08401, batched; semantics of ART's ``UniversalPerturbation(attacker="deepfool")``.

    Distance: L_inf or L_2 (the DeepFool steps are L_2-minimal, as in the paper and ART)::

        v <- 0
        while fooling_rate(v) < target_fooling_rate and passes < max_passes:
            for x_i in the data (shuffled each pass):
                if f(x_i + v) == f(x_i):                         # not fooled yet
                    dr <- DeepFool(x_i + v)                       # minimal step across the boundary
                    if f(x_i + v + dr) != f(x_i): v <- project(v + dr, eps)

    Batched: the not-yet-fooled images of a batch run DeepFool together at the batch's starting v (top
    ``nb_grads`` class gradients in one batched backward per step), then their steps are folded into v
    one image after another, ``v <- project(v + dr_i)``. With ``batch_size=1`` this is the sequential
    algorithm. Every x + v is clamped to [0, 1]. ``fooling_rate_`` is ART's: the share of the data with
    f(clamp(x + v, 0, 1)) != f(x), computed after each pass (``history``).

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` to fool (images in [0, 1]).
        norm, eps: budget, eps in 0-255 pixel units (ART's ``eps`` is ``eps / 255`` on [0, 1] images).
        max_passes: passes over the data at most (ART's ``max_iter``, 20 there).
        target_fooling_rate: stop once reached (ART's ``1 - delta``).
        overshoot: DeepFool's overshoot (0.02, as in the paper; ART's ``epsilon``).
        deepfool_steps: DeepFool iterations per image at most (ART's ``max_iter`` of DeepFool).
        nb_grads: gradients of the top ``nb_grads`` classes only (ART's default 10).
        batch_size: images per DeepFool batch.
        seed: seeds the per-pass shuffle of an image tensor (``seed + pass``); ``None``: data order.
            A loader keeps its own order.
        device: where to compute; default: the classifier's device.

    Shape:
        - data: images (N, 3, H, W) in [0, 1], or a loader of ``(x, y, ...)`` (labels are not used).
        - output of :meth:`fit`: the perturbation v (3, H, W) with ``||v||_p <= eps / 255``.

    Example::

        >>> attack = juap.create_attack("uap", classifier=clf, norm="linf", eps=10, max_passes=5)
        >>> v = attack.fit(images)
        >>> x_adv = attack.perturb(images)   # clamp(images + v, 0, 1)
        >>> attack.fooling_rate_
    """

    name = "uap"

    def __init__(self, *, max_passes: int = 10, target_fooling_rate: float = 0.8, overshoot: float = 0.02,
                 deepfool_steps: int = 10, nb_grads: int = 10, batch_size: int = 32,
                 seed: Optional[int] = 0, **kw) -> None:
        super().__init__(**kw)
        for field, value in (("max_passes", max_passes), ("deepfool_steps", deepfool_steps),
                             ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"uap: {field} must be a positive integer, got {value!r}")
        if isinstance(nb_grads, bool) or not isinstance(nb_grads, int) or nb_grads < 2:
            raise ConfigError(f"uap: nb_grads must be an integer >= 2, got {nb_grads!r}")
        if not _is_number(target_fooling_rate) or not 0 <= target_fooling_rate <= 1:
            raise ConfigError(f"uap: target_fooling_rate must be in [0, 1], got {target_fooling_rate!r}")
        if not _is_number(overshoot) or overshoot < 0:
            raise ConfigError(f"uap: overshoot must be a non-negative number, got {overshoot!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"uap: seed must be an integer or None, got {seed!r}")
        self.max_passes, self.target_fooling_rate = max_passes, float(target_fooling_rate)
        self.overshoot, self.deepfool_steps, self.nb_grads = float(overshoot), deepfool_steps, nb_grads
        self.batch_size, self.seed = batch_size, seed
        self.fooling_rate_: Optional[float] = None
        self.converged_: Optional[bool] = None

    def fit(self, data, *, progress: bool = True) -> torch.Tensor:
        """Learn v from ``data``; sets ``perturbation``, ``fooling_rate_``, ``converged_`` and ``history``."""
        v: Optional[torch.Tensor] = None
        self.history, fooling_rate, passes = [], 0.0, 0
        total = _num_images(data)
        while fooling_rate < self.target_fooling_rate and passes < self.max_passes:
            seen = fooled = updates = 0
            bar = tqdm(total=total, desc=f"{self.name} pass {passes + 1}", unit="img", disable=not progress,
                       leave=False, dynamic_ncols=True)
            shuffle = None if self.seed is None else self.seed + passes
            for x, _ in iter_batches(data, batch_size=self.batch_size, device=self.device, shuffle_seed=shuffle):
                v = torch.zeros_like(x[0]) if v is None else v  # (3, H, W)
                with torch.no_grad():
                    x_v = apply_perturbation(x, v)  # (B, 3, H, W)
                    benign, current = self.classifier(torch.cat([x, x_v])).argmax(1).chunk(2)
                todo = current == benign  # not fooled yet
                if todo.any():
                    dr, ok = self._deepfool(x_v[todo], benign[todo])
                    for d in dr[ok]:  # fold each image's step into v, in data order
                        v = project(v + d, norm=self.norm, eps=self.eps)
                    updates += int(ok.sum())
                seen, fooled = seen + len(x), fooled + int((~todo).sum())
                bar.set_postfix(fooled=f"{fooled / seen:.3f}", updates=updates)
                bar.update(len(x))
            if v is None:
                bar.close()
                raise ConfigError("uap: the data is empty: no images to learn a perturbation from")
            passes += 1
            fooling_rate = self.fooling_rate(data, v)
            bar.set_postfix(fooling_rate=f"{fooling_rate:.3f}", updates=updates)
            bar.close()
            self.history.append({"pass": passes, "fooling_rate": fooling_rate, "updates": updates})
        self.perturbation, self.fooling_rate_ = v.detach(), fooling_rate
        self.converged_ = fooling_rate >= self.target_fooling_rate
        return self.perturbation

    @torch.no_grad()
    def fooling_rate(self, data, v: torch.Tensor) -> float:
        """ART's ``fooling_rate``: the share of images with f(clamp(x + v, 0, 1)) != f(x)."""
        n = fooled = 0
        for x, _ in iter_batches(data, batch_size=2 * self.batch_size, device=self.device):
            benign, adv = self.classifier(torch.cat([x, apply_perturbation(x, v)])).argmax(1).chunk(2)
            n, fooled = n + len(x), fooled + int((benign != adv).sum())
        return fooled / max(n, 1)

    def _deepfool(self, x0: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batched DeepFool (L_2) from x0 (B, 3, H, W), predicted as ``label`` (B,).

        Returns:
            dr (B, 3, H, W) with x0 + dr in [0, 1] (overshoot included), and ok (B,) bool: f(x0 + dr) != label.
        """
        k = min(self.nb_grads, self.classifier.num_classes)
        r_tot, x_adv = torch.zeros_like(x0), x0.clone()
        active, classes = torch.arange(len(x0), device=x0.device), None  # classes: top-k at x0 (B, k)
        for _ in range(self.deepfool_steps):
            xa = x_adv[active].requires_grad_(True)
            logits = self.classifier(xa)  # (b, C)
            if classes is None:
                classes = logits.detach().topk(k, dim=1).indices
                classes[:, 0] = label  # the predicted class first (ties aside, it is the top-1)
            cls = classes[active]  # (b, k)
            onehots = torch.zeros(k, *logits.shape, device=logits.device, dtype=logits.dtype)
            onehots.scatter_(2, cls.t().unsqueeze(2), 1.0)  # (k, b, C)
            (grads,) = torch.autograd.grad(logits, xa, onehots, is_grads_batched=True)  # (k, b, 3, H, W)
            with torch.no_grad():
                w = (grads[1:] - grads[:1]).transpose(0, 1).flatten(2)  # (b, k-1, D)
                f = logits.gather(1, cls)
                f = (f[:, 1:] - f[:, :1]).abs()  # (b, k-1)
                w_norm = w.norm(dim=2) + _TOL
                dist, l_star = (f / w_norm).min(dim=1)  # distance to the nearest linearised boundary
                w_l = w[torch.arange(len(w)), l_star]  # (b, D)
                r = ((dist + 1e-4) / w_norm.gather(1, l_star[:, None]).squeeze(1))[:, None] * w_l
                r_tot[active] += r.view_as(xa)
                x_adv[active] = (x0[active] + (1 + self.overshoot) * r_tot[active]).clamp(0.0, 1.0)
                still = self.classifier(x_adv[active]).argmax(1) == label[active]
            active = active[still]
            if len(active) == 0:
                break
        ok = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        ok[active] = False
        return x_adv - x0, ok


def _num_images(data) -> Optional[int]:
    """The number of images for the progress bar, where known."""
    try:
        return len(data if isinstance(data, torch.Tensor) else data.dataset)
    except (AttributeError, TypeError):
        return None


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


ATTACKS.register("uap")(UAP)
