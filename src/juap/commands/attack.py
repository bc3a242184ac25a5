"""`juap attack`: fit one attack, save its perturbation or generator, evaluate it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .._registry import ATTACKS
from ..app.artifacts import perturbation_provenance, save_perturbation
from ..app.history import RunLog
from ..app.report import map_panels, transitions_csv
from ..app.runs import finish_run
from ..budget import quantize_8bit
from ..data import (
    CountSkipped,
    data_summary,
    drop_last_for,
    make_loader,
    save_split,
)
from ..data.batches import iter_batches
from ..errors import ConfigError
from ..evaluation import evaluate, perturb_fn
from ..metrics import is_fooled, l1_distance
from ..runtime import distributed
from ..runtime.config import to_dict
from ..runtime.distributed import resolve_device
from ..runtime.io import save_tensors
from ..runtime.loop import Checkpointing
from ..transforms import parse_transform
from .build import (
    attack_data,
    build_attack,
    build_classifier,
    build_interpreter,
    check_classes,
    eval_interpreters,
)
from .configs import (
    AttackConfig,
    ClassifierConfig,
    DataConfig,
    EvalConfig,
    InterpreterConfig,
    LogConfig,
    attack_split_data,
)


@dataclasses.dataclass(frozen=True)
class AttackRunConfig:
    """``juap attack`` and ``juap evaluate``."""

    data: DataConfig = dataclasses.field(default_factory=attack_split_data)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    interpreter: InterpreterConfig = dataclasses.field(default_factory=InterpreterConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"


def run_attack(
    cfg, run_dir: Path, *, progress: bool = True, resume: bool = False, checkpoint_every: Optional[int] = None
) -> Dict[str, Any]:
    """``juap attack``: fit on the train split, evaluate on the test split, save the artifacts.

    The run folder gets ``perturbation.safetensors`` with ``perturbation.png`` (raw) and
    ``perturbation_amplified.png``, ``metrics.json`` (with the class transitions and per-class figures),
    ``transitions.csv`` and ``maps.png`` (see :func:`write_insight`).

    An attack whose ``fit`` checkpoints (JUAP, GUAP) writes ``checkpoint.safetensors`` into ``run_dir``
    every ``checkpoint_every`` steps (default: its ``eval_every``); ``resume`` continues from it.
    """
    torch.manual_seed(cfg.seed)  # the same on every rank: models built below agree (random weights too)
    device = resolve_device(cfg.device)
    splits, train, val, test = attack_data(cfg, progress=progress)
    if distributed.is_main():  # under torchrun only rank 0 writes files
        save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes).to(device)
    check_classes(clf, splits)
    interp = build_interpreter(
        cfg.interpreter.name, clf, checkpoint=cfg.interpreter.checkpoint, options=cfg.interpreter.options
    )
    interp = interp.to(device) if interp is not None else None
    attack = build_attack(cfg.attack, clf, interp, device=device, seed=cfg.seed)
    if distributed.world_size() > 1:  # per-rank RNG from here (per-image random starts differ by rank)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    test_loader = CountSkipped(make_loader(test, batch_size=cfg.evaluate.batch_size))
    return fit_and_measure(
        run_dir,
        cfg,
        clf,
        attack,
        train=train,
        val=val,
        test=test_loader,
        interpreters=lambda: {n: i.to(device) for n, i in eval_interpreters(cfg, clf).items()},
        class_names=splits.classes,
        device=device,
        progress=progress,
        resume=resume,
        checkpoint_every=checkpoint_every,
        after={"data_summary": data_summary(splits, train=train, val=val, test=test)},
    )


def fit_and_measure(
    run_dir: Path,
    cfg,
    clf,
    attack,
    *,
    train: Dataset,
    val: Optional[Dataset],
    test,
    interpreters: Callable[[], Dict[str, Any]],
    class_names: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: Optional[int] = None,
    after: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """One attack run after its set-up (``juap attack``, each cell of a grid and of ``juap demo``): fit a
    built universal ``attack`` on ``train``, picking its perturbation on ``val``, with checkpoints
    (``resume``), ``history.csv`` and its artifacts (:func:`fit_universal`), then measure it on ``test``
    and write the run folder (:func:`measure_and_write`). A per-image attack is only measured.

    Args:
        run_dir: the run folder.
        cfg: the run's :class:`AttackRunConfig` (``attack``, ``evaluate``, ``log``, ``seed``).
        clf, attack: the classifier and the attack built on it (:func:`~juap.commands.build.build_attack`).
        train, val: data sets of ``(image (3, H, W) in [0, 1], label)`` items; ``val`` None: none held out.
        test: a loader or a list of ``(x, y)`` batches to measure on.
        interpreters: builds the interpreters to measure with, called after the fit (building a learned
            one draws from the global RNG, and the fit's draws come first).
        class_names: the data set's classes, for ``metrics.json`` and the figures.
        device: where to compute; default: the classifier's.
        progress: show progress bars.
        resume: continue the fit from ``run_dir``'s checkpoint.
        checkpoint_every: steps between checkpoints (default: the attack's ``eval_every``).
        after: entries written over ``metrics.json``'s (e.g. ``data_summary``).

    Returns:
        The metrics written to ``metrics.json``.
    """
    t0 = time.perf_counter()
    fit_info: Dict[str, Any] = {}
    if attack.universal:
        fit_info = fit_universal(
            attack, cfg, train, val, run_dir, progress=progress, resume=resume, every=checkpoint_every
        )
    fit_seconds = time.perf_counter() - t0
    metrics = measure_and_write(
        run_dir,
        cfg,
        clf,
        interpreters(),
        attack,
        test,
        class_names=class_names,
        device=device,
        progress=progress,
        extra={"fit_seconds": fit_seconds, **fit_info},
        after=after,
    )
    if attack.universal:  # the file again, now with what was measured
        save_run_perturbation(run_dir, attack, cfg, metrics)
    return metrics


RECORDED = ("n_images", "fooling_ratio", "map_interpreter", "iou", "l1", "as_8bit")  # in perturbation files
DATA_UNRECORDED = ("num_workers", "in_memory")  # how the images are read, not which


def is_weights_name(weights: Any) -> bool:
    """A named set of weights (``imagenet``, ``IMAGENET1K_V1``, ``demo``), not a file of this machine."""
    return isinstance(weights, str) and not any(c in weights for c in "/\\") and not Path(weights).suffix


def save_run_perturbation(run_dir: Path, attack, cfg, metrics: Optional[Mapping[str, Any]] = None) -> None:
    """Write the run's ``perturbation.safetensors`` / ``.png`` with their provenance (the classifier, its
    weights' name and normalisation, the attack's parameters, the seed, the images and, once measured,
    the metrics)."""
    a, n_hat = cfg.attack, attack.perturbation
    provenance = perturbation_provenance(
        attack.classifier, params=a.params, seed=cfg.seed, input_size=tuple(n_hat.shape[-2:]),
        metrics=None if metrics is None else {k: metrics[k] for k in RECORDED if k in metrics},
    )  # fmt: skip
    if is_weights_name(cfg.classifier.weights):
        provenance["classifier_weights"] = cfg.classifier.weights
    provenance["data"] = {k: v for k, v in to_dict(cfg.data).items() if k not in DATA_UNRECORDED}
    save_perturbation(
        run_dir / "perturbation", n_hat, attack=a.name, norm=a.norm, eps=a.eps, provenance=provenance
    )


def measure_and_write(
    run_dir: Path,
    cfg,
    clf,
    interps: Dict[str, Any],
    attack,
    data,
    *,
    device: Optional[torch.device] = None,
    class_names: Optional[Sequence[str]] = None,
    progress: bool = False,
    extra: Optional[Dict[str, Any]] = None,
    after: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The last step of every run that measures an attack (``juap attack``, ``juap evaluate``, each cell of
    a grid or of the demo): evaluate ``attack`` (a fitted or per-image attack, or a perturbation) on
    ``data`` (a loader or a list of ``(x, y)`` batches) against every interpreter of ``interps``, with the
    unmodified classifier; write a per-image attack's ``history.csv``, then ``transitions.csv`` and
    ``maps.png`` (:func:`write_insight`) and ``metrics.json`` (:func:`summarize` with ``extra``, then
    ``after`` over it; a :class:`~juap.data.CountSkipped` loader adds its count of unreadable images to
    ``data_summary``), and mark the run folder finished. Returns the metrics."""
    ev = evaluate(
        clf,
        attack,
        data,
        interpreters=interps,
        target=cfg.attack.params.get("target"),
        device=device,
        progress=progress,
        per_class=True,
        faithfulness=cfg.evaluate.faithfulness or None,
        faithfulness_baseline=cfg.evaluate.faithfulness_baseline,
    )
    if not getattr(attack, "universal", True) and attack.history and distributed.is_main():
        log = RunLog(run_dir, tensorboard=cfg.log.tensorboard, title=f"juap attack {cfg.attack.name}")
        for row in attack.history:  # a per-image attack's steps over the test batches (rank 0's share)
            log(row)
        log.finish(hinge=attack.hinge_level)
    write_insight(run_dir, cfg, ev, clf, attack, data, interps, class_names=class_names, device=device)
    metrics = summarize(cfg, ev, class_names=class_names, **(extra or {}))
    metrics.update(after or {})
    if isinstance(attack, torch.Tensor) or getattr(attack, "universal", False):
        n_hat = attack if isinstance(attack, torch.Tensor) else attack.perturbation
        main = metrics.get("map_interpreter")
        again = data.loader if isinstance(data, CountSkipped) else data  # unreadable images counted once
        mine = {main: interps[main]} if main in interps else {}
        target = cfg.attack.params.get("target")
        metrics["as_8bit"] = measure_8bit(
            clf, n_hat, again, mine, norm=metrics["norm"], eps=metrics["eps"], target=target, device=device
        )
        if cfg.evaluate.transforms:
            metrics["robustness"] = measure_transformed(
                clf, n_hat, again, mine, cfg.evaluate.transforms, target=target, device=device
            )
    if isinstance(data, CountSkipped):  # unreadable at decode time
        metrics["data_summary"] = {**metrics.get("data_summary", {}), "test_skipped_images": data.skipped}
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def _main_figures(clf, n_hat, data, interps, *, target=None, device=None, transform=None) -> Dict[str, Any]:
    """Fooling ratio, accuracy and the main interpreter's IoU / L1 of ``n_hat`` (one evaluation pass)."""
    ev = evaluate(clf, n_hat, data, interpreters=interps, target=target, device=device, transform=transform)
    keys = ("fooling_ratio", "clean_accuracy", "target_success_rate", "perturbation_linf", "perturbation_l2")
    out = {k: ev[k] for k in keys if k in ev}
    for name, m in ev["interpreters"].items():
        out.update({"map_interpreter": name, "iou": m.get("iou"), "l1": m.get("l1")})
    return out


def measure_8bit(clf, n_hat, data, interps, *, norm, eps, target=None, device=None) -> Dict[str, Any]:
    """The figures of ``n_hat`` as it is applied to 8-bit images: quantised to whole 0-255 steps
    (:func:`~juap.budget.quantize_8bit`, within the budget ``norm``/``eps`` when known), added, clipped.
    ``interps``: the map figures' interpreter (the run's main one), or none."""
    q = quantize_8bit(n_hat, norm=norm, eps=eps)
    return _main_figures(clf, q, data, interps, target=target, device=device)


def measure_transformed(clf, n_hat, data, interps, specs, *, target=None, device=None) -> Dict[str, Any]:
    """``{spec: figures}``: the fooling ratio (and the main interpreter's IoU / L1) of ``n_hat`` when the
    benign and the adversarial images both go through each transformation of ``specs`` (``jpeg:75``, ...;
    :mod:`juap.transforms`) before the model sees them."""
    return {
        spec: _main_figures(
            clf, n_hat, data, interps, target=target, device=device, transform=parse_transform(spec)
        )  # fmt: skip
        for spec in specs
    }


def fit_universal(
    attack,
    cfg,
    train: Dataset,
    val: Optional[Dataset],
    run_dir: Path,
    *,
    progress: bool,
    resume: bool = False,
    every: Optional[int] = None,
) -> Dict[str, Any]:
    """Fit a universal attack in the loop engine (checkpoints, history) and save the artifacts it declares.

    ``train`` is read in shuffled batches (seeded by ``cfg.seed``) of the attack's own ``batch_size`` (an
    attack that declares none: ``cfg.evaluate.batch_size``); returns its :class:`FitResult`'s summary."""
    batch = getattr(attack, "batch_size", cfg.evaluate.batch_size)
    # a generator's steps: full batches
    drop_last = "generator" in attack.artifacts and drop_last_for(len(train), batch)
    train_loader = make_loader(train, batch_size=batch, shuffle=True, seed=cfg.seed, drop_last=drop_last)
    val_loader = make_loader(val, batch_size=batch) if val is not None else None
    log = RunLog(run_dir, tensorboard=cfg.log.tensorboard, title=f"juap attack {cfg.attack.name}")
    checkpoint = Checkpointing(run_dir, every=every, resume=resume)
    attack.fit(train_loader, val_data=val_loader, progress=progress, checkpoint=checkpoint, log=log)
    result = attack.fit_result
    if distributed.is_main():
        log.finish(selected=result.selected, hinge=attack.hinge_level)
    a = cfg.attack
    save_run_perturbation(run_dir, attack, cfg)
    if "generator" in attack.artifacts and distributed.is_main():
        tensors, meta = attack.generator_artifact()
        save_tensors(run_dir / "generator.safetensors", tensors, {**meta, "norm": a.norm, "eps": a.eps})
    return result.summary()


def summarize(cfg, ev: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """metrics.json: the attack's identity, its budget, and the figures on the test split."""
    params = cfg.attack.params
    generator = ATTACKS.get(cfg.attack.name).hyperparams.get("generator")  # its declared default
    main = cfg.interpreter.name or (cfg.evaluate.interpreters[0] if cfg.evaluate.interpreters else None)
    out: Dict[str, Any] = {
        "attack": cfg.attack.name,
        "generator": params.get("generator", generator.default) if generator is not None else None,
        "interpreter": cfg.interpreter.name,
        "norm": cfg.attack.norm,
        "eps": cfg.attack.eps,
        "objective": params.get("objective"),
        "classifier": cfg.classifier.name,
    }
    for key in ("perturbation_linf", "perturbation_l2"):
        if key in ev:
            out[key] = ev[key]
    if "perturbation_linf" in ev:
        out["perturbation_norm"] = ev[f"perturbation_{cfg.attack.norm}"]
    for key in ("n_images", "fooling_ratio", "clean_accuracy", "adversarial_accuracy", "target_success_rate"):
        if key in ev:
            out[key] = ev[key]
    # where the fooled images go (classes are benign predictions; per interpreter figures in "transfer")
    for key in ("dominant_label", "dominant_label_share", "num_classes", "transitions", "per_class"):
        if key in ev:
            out[key] = ev[key]
    names = extra.get("class_names")
    if names and ev.get("dominant_label") is not None:
        out["dominant_label_name"] = names[ev["dominant_label"]]
    if main and main in ev["interpreters"]:
        m = ev["interpreters"][main]
        out.update(
            {
                "map_interpreter": main,
                "l1": m.get("l1"),
                "iou": m.get("iou"),
                "iou_per_k": {k.split("@")[1]: v for k, v in m.items() if k.startswith("iou@")},
                "random_iou": m.get("random_iou"),
            }
        )
    out["transfer"] = ev["interpreters"]
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


# -- what a run shows: transitions.csv and maps.png ----------------------------------------------------
FIGURE_POOL = 128  # maps.png picks its images among the first this many test images


def write_insight(
    run_dir: Path,
    cfg,
    ev: Dict[str, Any],
    clf,
    attack,
    data,
    interps: Dict[str, Any],
    *,
    class_names: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """``transitions.csv`` (from ``ev``, an evaluation with ``per_class=True``) and ``maps.png``: benign vs
    adversarial images and maps of ``cfg.evaluate.figure_count`` test images of ``data`` (a loader or a
    list of batches, read again) picked by ``cfg.evaluate.figure_images``. Under torchrun only rank 0
    writes (and draws)."""

    if not distributed.is_main():
        return
    if "transitions" in ev:
        transitions_csv(run_dir / "transitions.csv", ev["transitions"], class_names)
    if not interps or cfg.evaluate.figure_count == 0:
        return
    main = cfg.interpreter.name if cfg.interpreter.name in interps else next(iter(interps))
    rows, how = map_rows(
        clf,
        attack,
        data,
        interps,
        main=main,
        select=cfg.evaluate.figure_images,
        count=cfg.evaluate.figure_count,
        seed=cfg.seed,
        class_names=class_names,
        device=device,
    )
    if rows:
        map_panels(run_dir / "maps.png", rows, title=f"benign vs adversarial maps: {how}")


@torch.no_grad()
def map_rows(
    clf,
    attack,
    data,
    interps: Dict[str, Any],
    *,
    main: str,
    select: str = "fooled",
    count: int = 4,
    seed: int = 0,
    class_names: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
    pool: int = FIGURE_POOL,
) -> Tuple[List[Dict[str, Any]], str]:
    """Rows for :func:`~juap.app.report.map_panels`, one per picked image: the benign and adversarial
    images, then per interpreter the benign map (of the benign prediction) and the adversarial map (of
    the adversarial prediction). Images are picked among the first ``pool`` of ``data`` (see
    :func:`pick_images`); map change is the L1 (eq 19) of the ``main`` interpreter.

    Returns:
        ``(rows, how)``, ``how`` a caption saying how the images were picked.
    """

    check_selection(select)
    device = device or next(clf.parameters()).device
    perturb = perturb_fn(attack, device)
    xs, xas, fooled, change = [], [], [], []
    for x, y in iter_batches(data, batch_size=pool, device=device):
        with torch.enable_grad():  # a per-image attack (PGD, JAP) needs gradients
            x_hat = perturb(x, y).detach()
        lb, mb = interps[main].explain(x)
        la, ma = interps[main].explain(x_hat)
        xs.append(x.cpu())
        xas.append(x_hat.cpu())
        fooled.append(is_fooled(lb.argmax(1), la.argmax(1)).cpu())
        change.append(l1_distance(ma, mb).cpu())
        if sum(len(b) for b in xs) >= pool:
            break
    if not xs:
        return [], "no test images"
    x, x_hat = torch.cat(xs)[:pool], torch.cat(xas)[:pool]
    fooled, change = torch.cat(fooled)[:pool], torch.cat(change)[:pool]
    picks, how = pick_images(fooled, change, select, count, seed, measure=f"{main} L1")
    name = (lambda c: class_names[c]) if class_names else str
    rows = []
    for i, why in picks:
        xi, xa = x[i : i + 1].to(device), x_hat[i : i + 1].to(device)
        panels: List[Tuple] = []
        for iname, interp in interps.items():
            lb, mb = interp.explain(xi)
            la, ma = interp.explain(xa)
            if not panels:
                panels += [
                    (x[i], None, f"benign: {name(int(lb.argmax(1)))}"),
                    (x_hat[i], None, f"adversarial: {name(int(la.argmax(1)))}"),
                ]
            panels += [
                (x[i], mb[0].cpu(), f"{iname} benign"),
                (x_hat[i], ma[0].cpu(), f"{iname} adversarial"),
            ]
        rows.append({"label": f"image {i + 1}{why}", "panels": panels})
    return rows, how


FIGURE_SELECTIONS = ("fooled", "map_change", "random")


def pick_images(
    fooled: torch.Tensor,
    change: torch.Tensor,
    select: str,
    count: int,
    seed: int = 0,
    *,
    measure: str = "map L1",
) -> Tuple[List[Tuple[int, str]], str]:
    """Which images a map figure shows, and why.

    Args:
        fooled: bool (N,), whether the perturbation changed each image's prediction.
        change: (N,), how much each image's map changed (e.g. L1, eq 19), named ``measure``.
        select: ``fooled`` (the first fooled images; the first images when none is), ``map_change`` (half
            with the largest change, half with the smallest) or ``random`` (seeded).
        count: how many images (at most N).

    Returns:
        ``([(index, note for the row label), ...], caption of the whole selection)``.

    Raises:
        ConfigError: ``select`` is none of :data:`FIGURE_SELECTIONS`.
    """
    check_selection(select)
    n = len(fooled)
    count = min(count, n)
    if select == "fooled":
        idx = torch.nonzero(fooled).flatten().tolist()[:count]
        if not idx:
            return [(i, "") for i in range(count)], f"no image of the first {n} fooled: the first {count}"
        return [(i, ", fooled") for i in idx], f"the first {len(idx)} fooled of the first {n} test images"
    if select == "map_change":
        order = torch.argsort(change, descending=True, stable=True).tolist()
        top = order[: (count + 1) // 2]
        low = [i for i in order[::-1] if i not in top][: count // 2]
        picks = [(i, f", {measure} {float(change[i]):.2f}") for i in top + low]
        return picks, f"largest and smallest change ({measure}) of {n} test images"
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values  # random
    return [(int(i), "") for i in idx], f"{count} random test images (seed {seed})"


def check_selection(select: str) -> None:
    """Raise ConfigError unless ``select`` is one of :data:`FIGURE_SELECTIONS`."""

    if select not in FIGURE_SELECTIONS:
        raise ConfigError(
            f"evaluate.figure_images = {select!r} is not allowed. Allowed values: "
            f"{', '.join(FIGURE_SELECTIONS)}"
        )
