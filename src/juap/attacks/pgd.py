"""PGD: projected gradient descent, the per-image baseline (paper §IV-B3), L_inf and L_2."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._registry import ATTACKS
from .._validate import Param
from ..budget import project
from ..data.batches import check_images
from ..errors import ConfigError
from ._folding import FoldedCache
from .base import PerImageAttack


class PGD(PerImageAttack):
    r"""PGD of 'Towards Deep Learning Models Resistant to Adversarial Attacks' (Madry et al., ICLR 2018),
    https://arxiv.org/abs/1706.06083, with torchattacks' ``PGD`` / ``PGDL2`` semantics.

    Distance: L_inf (signed gradient steps) or L_2 (gradient normalised per sample), both projected
    onto the eps-ball around x and clamped to [0, 1] after every step::

        delta <- random start in the ball (optional)
        repeat steps times:
            g     <- grad_delta CE(f(x + delta), y)          (targeted: -CE(f(x + delta), C_t))
            delta <- delta + alpha * sign(g)                  (L_2: alpha * g / ||g||_2)
            delta <- clamp(x + project(delta, eps), 0, 1) - x

    The random start draws from torch's global RNG exactly as torchattacks does (L_inf: uniform in
    [-eps, eps]; L_2: a Gaussian direction with radius ``eps * U(0, 1)``), so under the same
    ``torch.manual_seed`` both produce the same start; pass ``seed`` for a private generator instead.

    Args:
        classifier: the :class:`~juap.classifiers.Classifier` to fool (images in [0, 1]).
        norm: ``"linf"`` or ``"l2"``.
        eps: budget in 0-255 pixel units (e.g. 8 for L_inf).
        steps: number of gradient steps (default 10).
        step_size: alpha in 0-255 pixel units; default ``2.5 * eps / steps``.
        random_start: start from a random point of the ball (default True).
        target: class C_t for a targeted attack (minimise its CE); ``None`` (default) is untargeted.
        use_labels: untargeted, maximise the CE of the labels ``y`` when they are passed (as torchattacks);
            ``False`` (default, the paper's C_x) uses the benign prediction f(x).
        seed: seed of a private generator for the random start; ``None`` uses torch's global RNG.
        fast: take the gradients on a copy of the classifier whose eval-mode BatchNorms are folded into
            the preceding convolutions (channels-last on a CPU; see ``juap.attacks._folding``): the same
            function up to float rounding, checked on the first batch; the copy is rebuilt when the
            classifier's weights change. The benign prediction f(x) uses the classifier itself.
        device: where to compute; default: the classifier's device.

    Shape:
        - x: (N, 3, H, W) in [0, 1]; y: (N,) true labels, or ``None`` to use the benign prediction f(x)
          (ignored by a targeted attack).
        - output: (N, 3, H, W) in [0, 1], with ``||x_adv - x||_p <= eps / 255`` per image.

    Example::

        >>> attack = juap.create_attack("pgd", classifier=clf, norm="linf", eps=8, steps=10)
        >>> x_adv = attack(images, labels)
    """

    name = "pgd"
    label = "PGD"
    hyperparams = {
        "steps": Param(int, low=1, dry_run=1),
        "step_size": Param(float, low=0, low_open=True, doc="0-255 units; default 2.5 eps / steps"),
        "random_start": Param(bool),
        "target": Param(int, low=0, optional=True),
        "use_labels": Param(bool),
        "seed": Param(int, optional=True),
        "fast": Param(bool),
    }

    def __init__(
        self,
        *,
        steps: int = 10,
        step_size: Optional[float] = None,
        random_start: bool = True,
        target: Optional[int] = None,
        use_labels: bool = False,
        seed: Optional[int] = None,
        fast: bool = True,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.check_arguments(locals())
        step_size = 2.5 * self.eps / steps if step_size is None else step_size
        n = self.classifier.num_classes
        if target is not None and target >= n:
            raise ConfigError(f"pgd: target must be a class index in [0, {n}) or None, got {target!r}")
        self.steps, self.step_size, self.random_start = steps, float(step_size), random_start
        self.target, self.use_labels, self.seed = target, use_labels, seed
        self.fast, self._folded = fast, FoldedCache()

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_images(x)
        x = x.detach().to(self.device)
        if self.target is not None:
            y, sign = torch.full((len(x),), self.target, dtype=torch.long, device=self.device), -1.0
        elif y is None or not self.use_labels:
            with torch.no_grad():
                y, sign = self.classifier(x).argmax(1), 1.0  # C_x = f(x), the benign prediction
        else:
            if y.shape != (len(x),):
                raise ConfigError(f"pgd: labels must have shape ({len(x)},), got {tuple(y.shape)}")
            y, sign = y.to(self.device), 1.0
        alpha = self.step_size / 255.0
        x_adv = self._random_start(x) if self.random_start else x.clone()
        net = self._folded.get(self.classifier, x) if self.fast else self.classifier
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = sign * F.cross_entropy(net(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)  # (N, 3, H, W)
            with torch.no_grad():
                if self.norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
                delta = project(x_adv + alpha * step - x, norm=self.norm, eps=self.eps)
                x_adv = (x + delta).clamp_(0.0, 1.0)
        return x_adv.detach()

    def _random_start(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=x.device).manual_seed(self.seed) if self.seed is not None else None
        if self.norm == "linf":
            delta = torch.empty_like(x).uniform_(-self.zeta, self.zeta, generator=gen)
        else:  # a Gaussian direction, radius eps * U(0, 1), as torchattacks' PGDL2
            delta = torch.empty_like(x).normal_(generator=gen)
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta *= torch.zeros_like(norms).uniform_(0, 1, generator=gen) / norms * self.zeta
        return (x + delta).clamp_(0.0, 1.0)


ATTACKS.register("pgd")(PGD)
