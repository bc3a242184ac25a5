"""``juap.evaluate``: metrics of a perturbation or attack, with the unmodified classifier and interpreters.

SPEC §3: the benign map explains f(x); the adversarial map explains the class predicted for x_hat
(what an inspector sees). Figures are streamed as sums and counts (:class:`~juap.metrics.MetricSums`).
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
from tqdm.auto import tqdm

from . import distributed
from .attacks.base import Attack, PerImageAttack, UniversalAttack, iter_batches
from .budget import apply_perturbation, perturbation_norm
from .classifiers.base import Classifier
from .interpreters.base import Interpreter
from .metrics import MetricSums


def evaluate(
    classifier: Classifier,
    attack: torch.Tensor | Attack | Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
    data,
    *,
    interpreters: Optional[Mapping[str, Interpreter] | Interpreter] = None,
    target: Optional[int] = None,
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    progress: bool = False,
    return_sums: bool = False,
) -> Dict:
    """Fooling ratio, accuracies and, per interpreter, L1 and top-k IoU of the maps (eqs 18-20).

    Args:
        classifier: the *unmodified* classifier (never the attack's surrogate).
        attack: a universal perturbation (3, H, W) in [0, 1] units, a fitted universal attack, a per-image
            attack, or any ``f(x, y) -> x_adv``.
        data: a loader of ``(x, y, ...)`` or an image tensor (N, 3, H, W).
        interpreters: ``{name: interpreter}`` (or one interpreter) whose maps are compared: a transfer
            table comes from passing every interpreter, not only the one the attack was trained with.
        target: the target class of a targeted attack (for the target success rate).

    Under torchrun every rank passes the same ``data``; each computes its contiguous slice of every batch
    and the sums and counts are all-reduced, so every rank returns the metrics of the whole data (each
    image counted once, the random-map floor drawn as in one process).

    Returns:
        ``{"fooling_ratio", "clean_accuracy", "adversarial_accuracy", ..., "interpreters": {name: {...}}}``.
    """
    classifier.eval()
    distributed.check_same_across_ranks(classifier, "classifier")
    device = device or next(classifier.parameters()).device
    if isinstance(interpreters, Interpreter):
        interpreters = {getattr(interpreters, "name", type(interpreters).__name__.lower()): interpreters}
    interpreters = dict(interpreters or {})
    perturb = _perturb_fn(attack, device)
    preds, per_interp = MetricSums(), {name: MetricSums() for name in interpreters}
    batches = iter_batches(data, batch_size=batch_size, device=device)
    progress = progress and distributed.is_main()
    for i, (x, y, start, n_global) in enumerate(
        tqdm(distributed.local_batches(batches), desc="evaluate", disable=not progress, leave=False)
    ):
        if len(x) == 0:  # this rank's slice of a batch smaller than the number of ranks
            continue
        x_hat = perturb(x, y).detach()
        with torch.no_grad():
            maps = {}
            shared = next((n for n, it in interpreters.items() if it.classifier is classifier), None)
            if shared is not None:  # its forward pass gives the logits and the maps of the predictions
                benign_logits, bm = interpreters[shared].explain(x)
                adv_logits, am = interpreters[shared].explain(x_hat)
                maps[shared] = (bm, am)
            else:
                benign_logits, adv_logits = classifier(x), classifier(x_hat)
            preds.update_predictions(benign_logits, adv_logits, y, target)
            fooled = benign_logits.argmax(1) != adv_logits.argmax(1)
            for name, interp in interpreters.items():
                if name in maps:
                    bm, am = maps[name]
                else:
                    bm = interp(x, benign_logits.argmax(1))
                    am = interp(x_hat, adv_logits.argmax(1))
                per_interp[name].update_maps(bm, am, seed=i, part=(start, n_global), fooled=fooled)
    for sums in (preds, *per_interp.values()):
        sums.all_reduce()
    out = preds.summary()
    out["interpreters"] = {name: s.summary() for name, s in per_interp.items()}
    if isinstance(attack, torch.Tensor) or isinstance(attack, UniversalAttack):
        n = attack if isinstance(attack, torch.Tensor) else attack.perturbation
        out["perturbation_linf"] = float(perturbation_norm(n, "linf"))
        out["perturbation_l2"] = float(perturbation_norm(n, "l2"))
    if return_sums:
        out["_sums"] = {"predictions": preds, **per_interp}
    return out


def _perturb_fn(attack, device):
    if isinstance(attack, torch.Tensor):
        n_hat = attack.to(device)
        return lambda x, y: apply_perturbation(x, n_hat)
    if isinstance(attack, UniversalAttack):
        return lambda x, y: attack.perturb(x)
    if isinstance(attack, PerImageAttack) or callable(attack):
        return attack
    raise TypeError(f"cannot evaluate {type(attack).__name__}: pass a perturbation tensor or an attack")
