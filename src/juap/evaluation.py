"""``juap.evaluate``: metrics of a perturbation or attack, with the unmodified classifier and interpreters.

As in the paper's eqs 18-20: the benign map explains f(x); the adversarial map explains the class
predicted for x_hat (what an inspector sees). Figures are streamed as sums and counts
(:class:`~juap.metrics.MetricSums`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Protocol

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._validate import is_number
from .budget import apply_perturbation, check_finite, perturbation_norm, within_budget
from .classifiers.base import Classifier
from .data.batches import iter_batches
from .errors import CheckpointError, ConfigError
from .faithfulness import deletion_insertion
from .interpreters.base import Interpreter
from .metrics import MetricSums, is_fooled
from .runtime import distributed

PerImage = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # f(x, y) -> x_adv


class FittedUniversalAttack(Protocol):
    """What :func:`evaluate` needs of a fitted universal attack (:class:`juap.attacks.base.UniversalAttack`
    provides it; this module sits below the attacks, which call it to validate)."""

    universal: bool  # True
    perturbation: torch.Tensor  # (3, H, W), the fitted n_hat

    def perturb(self, x: torch.Tensor) -> torch.Tensor: ...


def evaluate(
    classifier: Classifier,
    attack: torch.Tensor | FittedUniversalAttack | PerImage,
    data,
    *,
    interpreters: Optional[Mapping[str, Interpreter] | Interpreter] = None,
    target: Optional[int] = None,
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    progress: bool = False,
    per_class: bool = False,
    transform: Optional[Callable[..., torch.Tensor]] = None,
    faithfulness: Optional[int] = None,
    faithfulness_baseline: str = "blur",
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
        per_class: also report where the fooled images go and how each class fares, classes being the
            *benign predictions* (not the labels): ``transitions`` (K x K counts, rows the benign and
            columns the adversarial prediction; they sum to ``n_images``), ``dominant_label`` and
            ``dominant_label_share`` (of the fooled images), and ``per_class`` lists indexed by class
            (``n_images``, ``n_fooled``, ``fooling_ratio``; per interpreter ``l1`` and ``iou``). Off by
            default: an attack's validation calls this function every few steps.
        transform: what happens to an image before the model sees it (:func:`juap.transforms.parse_transform`,
            e.g. JPEG), applied to the benign and to the adversarial images alike after the perturbation.
        faithfulness: ``S`` (e.g. 16) to also measure, per interpreter, the deletion and insertion areas
            (:func:`juap.faithfulness.deletion_insertion`, blurred baseline, ``S`` steps) of the benign map on
            the benign image (for the benign prediction) and of the adversarial map on the perturbed image
            (for its prediction): ``deletion_benign``, ``deletion_adversarial``, ``insertion_benign``,
            ``insertion_adversarial``. Costs ``4 (S + 1)`` forward passes per image and interpreter.
        faithfulness_baseline: what removed pixels become: ``"blur"`` (SPEC section 6), ``"black"`` or
            ``"mean"`` (:func:`juap.faithfulness.deletion_insertion`).

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
    perturb = perturb_fn(attack, device)
    preds, per_interp = MetricSums(), {name: MetricSums() for name in interpreters}
    batches = iter_batches(data, batch_size=batch_size, device=device)
    progress = progress and distributed.is_main()
    for i, (x, y, start, n_global) in enumerate(
        tqdm(distributed.local_batches(batches), desc="evaluate", disable=not progress, leave=False)
    ):
        if len(x) == 0:  # this rank's slice of a batch smaller than the number of ranks
            continue
        x_hat = perturb(x, y).detach()
        if transform is not None:  # both on their way to the model, the same random draw for both
            x, x_hat = transform(x, seed=i), transform(x_hat, seed=i)
        where = (i, start, n_global)
        _measure_batch(
            classifier, interpreters, x, x_hat, y, preds, per_interp, target, per_class, where,
            (faithfulness, faithfulness_baseline),
        )  # fmt: skip
    for sums in (preds, *per_interp.values()):
        sums.all_reduce()
    if not preds.sums.get("n", 0):  # no figure measured on no image is a result
        raise ConfigError("evaluate: the data is empty: no images to measure the attack on")
    out = preds.summary()
    out["interpreters"] = {name: s.summary() for name, s in per_interp.items()}
    if isinstance(attack, torch.Tensor) or getattr(attack, "universal", False):
        n = attack if isinstance(attack, torch.Tensor) else attack.perturbation
        out["perturbation_linf"] = float(perturbation_norm(n.double(), "linf"))  # float64: no overflow
        out["perturbation_l2"] = float(perturbation_norm(n.double(), "l2"))
    return out


@torch.no_grad()
def _measure_batch(
    classifier, interpreters, x, x_hat, y, preds, per_interp, target, per_class, where, faithfulness=(0, "")
) -> None:
    """Add one batch's predictions (``preds``) and maps (``per_interp``) to the sums; ``where`` is
    ``(batch index, this slice's start, global batch size)`` (the random-map floor's draw)."""
    i, start, n_global = where
    maps = {}
    shared = next((n for n, it in interpreters.items() if it.classifier is classifier), None)
    if shared is not None:  # its forward pass gives the logits and the maps of the predictions
        benign_logits, bm = interpreters[shared].explain(x)
        adv_logits, am = interpreters[shared].explain(x_hat)
        maps[shared] = (bm, am)
    else:
        benign_logits, adv_logits = classifier(x), classifier(x_hat)
    preds.update_predictions(benign_logits, adv_logits, y, target)
    benign_pred, adv_pred = benign_logits.argmax(1), adv_logits.argmax(1)
    fooled = is_fooled(benign_pred, adv_pred)
    by_class = {}
    if per_class:
        preds.update_classes(benign_logits, adv_logits)
        by_class = {"classes": benign_pred, "num_classes": benign_logits.shape[1]}
    for name, interp in interpreters.items():
        bm, am = maps[name] if name in maps else (interp(x, benign_pred), interp(x_hat, adv_pred))
        per_interp[name].update_maps(bm, am, seed=i, part=(start, n_global), fooled=fooled, **by_class)
        if faithfulness[0]:  # (steps, baseline)
            curves = dict(steps=faithfulness[0], baseline=faithfulness[1], batch_size=len(x) * 4)
            per_interp[name].update_faithfulness(
                deletion_insertion(classifier, x, bm, benign_pred, **curves),
                deletion_insertion(classifier, x_hat, am, adv_pred, **curves),
            )


def perturb_fn(attack, device):
    """``f(x, y) -> x_adv`` for a perturbation tensor, a fitted universal attack or a per-image attack."""
    if isinstance(attack, torch.Tensor):
        check_finite(attack)
        n_hat = attack.to(device)
        return lambda x, y: apply_perturbation(x, n_hat)
    if getattr(attack, "universal", False):  # a fitted UniversalAttack
        return lambda x, y: attack.perturb(x)
    if callable(attack):  # a PerImageAttack or any f(x, y)
        return attack
    raise TypeError(f"cannot evaluate {type(attack).__name__}: pass a perturbation tensor or an attack")


# A saved perturbation may exceed its budget by float rounding of the projection, no more.
def perturbation_budget(
    n_hat: torch.Tensor,
    *,
    file_budget: Optional[Mapping[str, object]] = None,
    config_budget: Optional[Mapping[str, object]] = None,
    source: str = "the perturbation",
) -> Dict:
    """The budget a perturbation is reported under, and its own measured norms (0-255 units).

    The budget is the one the perturbation's file records (``norm``, ``eps`` in its metadata); a budget in
    the config is for files that record none. A config budget that disagrees with the file's is an
    error, not a choice: one file, one budget. A budget the perturbation exceeds is never reported.

    Args:
        n_hat: (3, H, W) in [0, 1] units.
        file_budget: the file's metadata (``norm``, ``eps``), or None / {} when it records none.
        config_budget: ``{"norm", "eps"}`` when the config gives a budget, else None.
        source: the file, for messages.

    Returns:
        ``{"norm", "eps", "budget_source", "perturbation_norm", "perturbation_linf", "perturbation_l2"}``;
        ``norm``/``eps``/``budget_source`` are None when neither the file nor the config gives a budget
        (``perturbation_norm`` is then the L_inf norm).

    Raises:
        NumericalError: the perturbation holds NaN or infinite values.
        ConfigError: the config's budget differs from the file's, or the perturbation exceeds its budget.
    """

    check_finite(n_hat, f"{source}")
    measured = {k: float(perturbation_norm(n_hat.double(), k)) for k in ("linf", "l2")}  # float64: no inf
    recorded = _recorded_budget(file_budget or {}, source)
    given = dict(config_budget) if config_budget else None
    if recorded and given and (recorded["norm"] != given["norm"] or recorded["eps"] != float(given["eps"])):
        shown = measured[recorded["norm"]]
        raise ConfigError(
            f"{source} records its budget as {_budget(recorded)} (measured {shown:.4g}), "
            f"but the config gives {_budget(given)}: leave attack.eps and attack.norm unset to use the "
            "file's budget, or give the same ones"
        )
    budget, origin = (recorded, "file") if recorded else (given, "config") if given else (None, None)
    if budget is None:
        return {"norm": None, "eps": None, "budget_source": None, "perturbation_norm": measured["linf"],
                **{f"perturbation_{k}": v for k, v in measured.items()}}  # fmt: skip
    norm, eps = budget["norm"], float(budget["eps"])
    if not within_budget(measured[norm], eps):
        fix = (
            "the budget its file records: the metadata does not describe the tensor; save the perturbation "
            "again with the budget it was made under"
            if origin == "file"
            else "the budget the config gives (attack.norm, attack.eps): give the budget it was made under, "
            "or none to report its measured norm alone"
        )
        raise ConfigError(
            f"{source} measures {measured[norm]:.4g} in {_NORM_NAMES[norm]} (0-255 units), more than "
            f"{_budget(budget)}, {fix}"
        )
    return {"norm": norm, "eps": eps, "budget_source": origin, "perturbation_norm": measured[norm],
            **{f"perturbation_{k}": v for k, v in measured.items()}}  # fmt: skip


_NORM_NAMES = {"linf": "L_inf", "l2": "L_2"}


def _recorded_budget(meta: Mapping[str, object], source: str) -> Optional[Dict]:
    """The budget a file's metadata records (None if it records none); one juap cannot read is an error."""

    if meta.get("eps") is None and meta.get("norm") is None:
        return None
    norm, eps = meta.get("norm"), meta.get("eps")
    number = is_number(eps)
    if not (isinstance(norm, str) and norm in _NORM_NAMES and number and math.isfinite(eps) and eps > 0):
        raise CheckpointError(
            f"{source} records a budget juap cannot read (norm={norm!r}, eps={eps!r}; expected norm linf or "
            "l2 and eps > 0 in 0-255 units): save the perturbation again with its budget, or without one"
        )
    return {"norm": norm, "eps": float(eps)}


def _budget(b: Mapping[str, object]) -> str:
    return f"{_NORM_NAMES.get(str(b['norm']), b['norm'])} eps={float(b['eps']):g}"


@torch.no_grad()
def evaluate_accuracy(
    clf: Classifier, loader: DataLoader, *, device: torch.device, progress: bool = False
) -> Dict:
    """Top-1 accuracy of ``clf`` over ``loader`` (batches ``(x, y, n_skipped)``), as counts and a ratio.

    Under torchrun each rank classifies a disjoint share of a ``DataLoader``'s images (another iterable:
    its slice of every batch) and the counts are added over the ranks, so every rank returns the counts
    of the whole loader.
    """
    clf.eval()
    correct = total = skipped = 0
    world = distributed.world_size()
    batches = distributed.shard_eval_loader(loader)
    if world > 1 and batches is loader:  # not a DataLoader: this rank's slice of every batch
        batches = distributed.local_eval_batches(loader)
    for x, y, n_skip in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        skipped += n_skip
        if len(y) == 0:
            continue
        pred = clf(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    if world > 1:
        sums = distributed.all_reduce_sums({"correct": correct, "total": total, "skipped": skipped})
        correct, total, skipped = (int(sums[k]) for k in ("correct", "total", "skipped"))
    return {"correct": correct, "total": total, "skipped": skipped, "accuracy": correct / max(total, 1)}
