"""From configs to objects and run folders: the layer between the CLI and the library."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from . import distributed
from .classifiers import Classifier, create_classifier, load_classifier, save_classifier
from .config import ClassifierConfig, TrainClassifierConfig, to_dict
from .data import (
    CountSkipped,
    DataSplits,
    InMemoryLoader,
    SplitView,
    data_summary,
    eval_transform,
    load_splits,
    make_loader,
    require_classes,
    save_split,
    to_tensors,
)
from .data.synthetic import default_cache_dir
from .io import write_json
from .runs import finish_run
from .training import evaluate_accuracy, resolve_device, train_classifier

log = logging.getLogger(__name__)


def build_classifier(cfg: ClassifierConfig, *, num_classes: int | None = None) -> Classifier:
    """The classifier a config names; ``num_classes`` (from the data) fills in when the config has none."""
    n = cfg.num_classes if cfg.num_classes is not None else num_classes
    if (
        cfg.weights
        and Path(cfg.weights).suffix == ".safetensors"
        and cfg.num_classes is None
        and not cfg.reset_head
    ):
        return load_classifier(cfg.weights, name=cfg.name, **cfg.options)
    try:
        return create_classifier(
            cfg.name, num_classes=n, weights=cfg.weights, reset_head=cfg.reset_head, **cfg.options
        )
    except TypeError as e:  # an option this architecture does not take, e.g. widths for resnet18
        from .errors import ConfigError

        why = str(e).split("() ", 1)[-1]  # "build() got an unexpected keyword argument 'widths'"
        raise ConfigError(f"classifier {cfg.name!r} {why} (check classifier.options)") from None


def run_train_classifier(
    cfg: TrainClassifierConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: Optional[int] = None,
) -> Dict[str, Any]:
    """``juap train-classifier``: train on the train split, report top-1 on the test split, save all.

    Training checkpoints into ``run_dir`` every ``checkpoint_every`` steps; ``resume`` continues from there.
    Under torchrun it trains data-parallel (:func:`~juap.training.train_classifier`); rank 0 writes.
    """
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    device = distributed.device_for_rank(resolve_device(cfg.device))
    with distributed.main_first():  # under torchrun, rank 0 fills the data cache, then the others read it
        splits = load_splits(cfg.data, augment_train=True, progress=progress)
    require_classes(splits.train, splits.classes)
    if distributed.is_main():
        save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    if clf.num_classes != splits.num_classes:
        from .errors import ConfigError

        raise ConfigError(
            f"the classifier has {clf.num_classes} classes but the data has {splits.num_classes} "
            f"({splits.classes}); set classifier.num_classes={splits.num_classes} and "
            "classifier.reset_head=true to fine-tune a new head"
        )
    ckpt = {"checkpoint_dir": run_dir, "checkpoint_every": checkpoint_every, "resume": resume}
    metrics = _train_and_measure(clf, splits, cfg, device=device, progress=progress, **ckpt)
    if distributed.is_main():
        save_classifier(clf, run_dir / "classifier.safetensors", classes=splits.classes)
    metrics.update(
        classifier=cfg.classifier.name, classes=splits.classes, data=cfg.data.name, data_root=splits.root
    )
    metrics["data_summary"] = data_summary(splits, train=splits.train, test=splits.test)
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def _train_and_measure(
    clf: Classifier,
    splits: DataSplits,
    cfg: TrainClassifierConfig,
    *,
    device: torch.device,
    progress: bool,
    **checkpoints: Any,
) -> Dict[str, Any]:
    in_memory = cfg.data.in_memory if cfg.data.in_memory is not None else cfg.data.name == "synthetic"
    if distributed.world_size() > 1:  # the model is built: per-rank RNG from here (augmentation, dropout)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    if in_memory:  # decode once, augment per batch (random crop + flip) on tensors
        plain = SplitView(splits.train.base, splits.train.indices, eval_transform(cfg.data.image_size))
        x, y, _ = to_tensors(plain)
        train_loader = InMemoryLoader(
            x, y, batch_size=cfg.train.batch_size, augment=True, seed=cfg.seed, drop_last=True
        )
    else:
        train_loader = make_loader(
            splits.train,
            batch_size=cfg.train.batch_size,
            shuffle=True,
            num_workers=cfg.data.num_workers,
            seed=cfg.seed,
            drop_last=True,
        )
    test_loader = make_loader(splits.test, batch_size=256, num_workers=cfg.data.num_workers)
    return train_classifier(
        clf, train_loader, test_loader, cfg.train, device=device, progress=progress, **checkpoints
    )


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def demo_classifier_path(cfg: TrainClassifierConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`cached_demo_classifier` keeps the classifier trained with ``cfg``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache / "demo" / f"classifier-{cfg.classifier.name}-{config_hash(to_dict(cfg))}.safetensors"


def cached_demo_classifier(
    cfg: TrainClassifierConfig, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Tuple[Classifier, DataSplits, Dict[str, Any], bool]:
    """Train the demo classifier once per config and reuse it from the cache afterwards.

    Returns:
        (classifier, splits, metrics, was_cached).
    """
    ckpt = demo_classifier_path(cfg, cache_dir)
    meta_path = ckpt.with_suffix(".json")
    splits = load_splits(cfg.data, augment_train=True, progress=progress)
    if ckpt.is_file() and meta_path.is_file():
        return load_classifier(ckpt), splits, json.loads(meta_path.read_text()), True
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    t0 = time.perf_counter()
    metrics = _train_and_measure(clf, splits, cfg, device=device, progress=progress)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
    clf.cpu()
    save_classifier(clf, ckpt, classes=splits.classes)
    write_json(meta_path, metrics)
    return clf, splits, metrics, False


def demo_accuracy(clf: Classifier, splits: DataSplits) -> Dict[str, Any]:
    return evaluate_accuracy(clf, make_loader(splits.test, batch_size=256), device=torch.device("cpu"))


# -- attacks -----------------------------------------------------------------------------------------
def build_interpreter(
    name: Optional[str],
    classifier: Classifier,
    *,
    checkpoint: Optional[str] = None,
    options: Optional[Dict[str, Any]] = None,
):
    """A registered interpreter; ``rts`` needs the checkpoint written by ``juap train-rts``."""
    from . import create_interpreter
    from .errors import ConfigError

    if name is None:
        return None
    opts = dict(options or {})
    if name == "rts":
        if not checkpoint:
            raise ConfigError(
                "the rts interpreter needs a trained model: set interpreter.checkpoint (or "
                "evaluate.rts_checkpoint) to the rts.safetensors written by `juap train-rts`"
            )
        opts["checkpoint"] = checkpoint
    elif checkpoint:
        raise ConfigError(f"interpreter {name!r} takes no checkpoint (only rts does)")
    return create_interpreter(name, classifier, **opts)


def attack_param_names(cls: type) -> set:
    """Keyword arguments accepted by an attack class, gathered along its constructors' MRO."""
    import inspect

    names: set = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.KEYWORD_ONLY:
                names.add(p.name)
    return names - set(getattr(cls, "fixed_params", ()))


def takes_interpreter(cls: type) -> bool:
    """Whether an attack class uses an interpreter (JUAP, JAP), judged by its own constructor: GUAP
    inherits the argument from the JUAP loop but drops it."""
    import inspect

    return "interpreter" in inspect.signature(cls.__init__).parameters


def build_attack(cfg, classifier: Classifier, interpreter, *, device=None):
    """The attack a config names, with its ``params`` checked against the attack's arguments."""
    import difflib

    from ._registry import ATTACKS
    from .errors import ConfigError

    cls = ATTACKS.get(cfg.name)
    allowed = attack_param_names(cls) - {"classifier", "norm", "eps", "interpreter", "device"}
    for key in cfg.params:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean 'attack.params.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key 'attack.params.{key}' for attack {cfg.name!r}.{hint} "
                f"Known: {', '.join(sorted(allowed))}"
            )
    kwargs = dict(cfg.params, classifier=classifier, norm=cfg.norm, eps=cfg.eps, device=device)
    if takes_interpreter(cls):
        kwargs["interpreter"] = interpreter
    elif interpreter is not None:
        raise ConfigError(
            f"attack {cfg.name!r} uses no interpreter; set interpreter.name: null "
            "(the maps are still measured for every interpreter in evaluate.interpreters)"
        )
    try:
        return cls(**kwargs)
    except TypeError as e:  # a missing required argument, e.g. guap_ct without a target
        raise ConfigError(f"attack {cfg.name!r}: {e}") from None


def eval_interpreters(cfg, classifier: Classifier) -> Dict[str, Any]:
    """Every interpreter of the transfer table (``evaluate.interpreters`` and RTS when a model is given)."""
    names = list(cfg.evaluate.interpreters)
    rts_ckpt = cfg.evaluate.rts_checkpoint or (
        cfg.interpreter.checkpoint if cfg.interpreter.name == "rts" else None
    )
    if rts_ckpt and "rts" not in names:
        names.append("rts")
    if cfg.interpreter.name and cfg.interpreter.name not in names:
        names.append(cfg.interpreter.name)
    return {
        n: build_interpreter(
            n,
            classifier,
            checkpoint=rts_ckpt if n == "rts" else None,
            options=cfg.interpreter.options if n == cfg.interpreter.name else None,
        )
        for n in names
    }


def attack_data(cfg, *, progress: bool):
    """Splits for an attack: train (minus a held-out validation part) and test."""
    from torch.utils.data import Subset

    with distributed.main_first():  # under torchrun, rank 0 fills the data cache, then the others read it
        splits = load_splits(cfg.data, progress=progress)
    n_train = len(splits.train)
    n_val = max(1, int(round(cfg.attack.val_fraction * n_train))) if cfg.attack.val_fraction > 0 else 0
    if n_val >= n_train:  # a train split of one image: it is trained on, none is held out
        import warnings

        warnings.warn(f"the train split holds {n_train} image(s): none held out for validation", stacklevel=2)
        n_val = 0
    # Split indices are sorted (hence grouped by class folder): hold out a seeded random part.
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train = Subset(splits.train, sorted(order[n_val:])) if n_val else splits.train
    val = Subset(splits.train, sorted(order[:n_val])) if n_val else None
    test = splits.test
    if cfg.evaluate.max_images and cfg.evaluate.max_images < len(test):
        keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        test = Subset(test, sorted(keep[: cfg.evaluate.max_images].tolist()))
    return splits, train, val, test


def _check_classes(clf: Classifier, splits: DataSplits) -> None:
    from .errors import CheckpointError

    if clf.num_classes != splits.num_classes:
        raise CheckpointError(
            f"the classifier has {clf.num_classes} classes but the data set has {splits.num_classes} "
            f"({', '.join(splits.classes[:8])}{'...' if splits.num_classes > 8 else ''}): "
            "use a classifier checkpoint trained on this data (juap train-classifier)"
        )


def run_attack(
    cfg, run_dir: Path, *, progress: bool = True, resume: bool = False, checkpoint_every: Optional[int] = None
) -> Dict[str, Any]:
    """``juap attack``: fit on the train split, evaluate on the test split, save the artifacts.

    An attack whose ``fit`` checkpoints (JUAP, GUAP) writes ``checkpoint.safetensors`` into ``run_dir``
    every ``checkpoint_every`` steps (default: its ``eval_every``); ``resume`` continues from it.
    """
    from .attacks.base import UniversalAttack
    from .evaluation import evaluate

    torch.manual_seed(cfg.seed)  # the same on every rank: models built below agree (random weights too)
    device = resolve_device(cfg.device)
    splits, train, val, test = attack_data(cfg, progress=progress)
    if distributed.is_main():  # under torchrun only rank 0 writes files
        save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes).to(device)
    _check_classes(clf, splits)
    interp = build_interpreter(
        cfg.interpreter.name, clf, checkpoint=cfg.interpreter.checkpoint, options=cfg.interpreter.options
    )
    interp = interp.to(device) if interp is not None else None
    attack = build_attack(cfg.attack, clf, interp, device=device)
    if distributed.world_size() > 1:  # per-rank RNG from here (per-image random starts differ by rank)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    batch = getattr(attack, "batch_size", 30)
    t0 = time.perf_counter()
    fit_info: Dict[str, Any] = {}
    if isinstance(attack, UniversalAttack):
        drop_last = (
            getattr(attack, "generator_spec", None) is not None and len(train) > batch
        )  # fixed-size steps
        train_loader = make_loader(train, batch_size=batch, shuffle=True, seed=cfg.seed, drop_last=drop_last)
        val_loader = make_loader(val, batch_size=batch) if val is not None else None
        fit_kwargs = {"val_data": val_loader} if "val_data" in _fit_params(attack) else {}
        if "checkpoint_dir" in _fit_params(attack):
            fit_kwargs.update(checkpoint_dir=run_dir, checkpoint_every=checkpoint_every, resume=resume)
        n_hat = attack.fit(train_loader, progress=progress, **fit_kwargs)
        save_perturbation(
            run_dir / "perturbation", n_hat, attack=cfg.attack.name, norm=cfg.attack.norm, eps=cfg.attack.eps
        )
        if getattr(attack, "generator", None) is not None and distributed.is_main():
            from .io import save_tensors

            save_tensors(
                run_dir / "generator.safetensors",
                {
                    **{f"generator.{k}": v for k, v in attack.generator.state_dict().items()},
                    "noise": attack.noise,
                },
                {
                    "format": "juap.generator",
                    "generator": str(attack.generator_spec),
                    "generator_options": attack.generator_options,
                    "norm": cfg.attack.norm,
                    "eps": cfg.attack.eps,
                },
            )
        fit_info = {
            "best_step": getattr(attack, "best_step", None),
            "validation": getattr(attack, "best_val", None),
        }
    fit_seconds = time.perf_counter() - t0
    interps = {n: i.to(device) for n, i in eval_interpreters(cfg, clf).items()}
    target = cfg.attack.params.get("target")
    test_loader = CountSkipped(make_loader(test, batch_size=cfg.evaluate.batch_size))
    ev = evaluate(
        clf, attack, test_loader, interpreters=interps, target=target, device=device, progress=progress
    )
    metrics = summarize(cfg, ev, fit_seconds=fit_seconds, **fit_info)
    metrics["data_summary"] = {
        **data_summary(splits, train=train, val=val, test=test),
        "test_skipped_images": test_loader.skipped,  # unreadable at decode time
    }
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def _fit_params(attack) -> set:
    import inspect

    return set(inspect.signature(attack.fit).parameters)


def summarize(cfg, ev: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    """metrics.json: the attack's identity, its budget, and the figures on the test split."""
    params = cfg.attack.params
    main = cfg.interpreter.name or (cfg.evaluate.interpreters[0] if cfg.evaluate.interpreters else None)
    out: Dict[str, Any] = {
        "attack": cfg.attack.name,
        "generator": params.get("generator", "resnet")
        if cfg.attack.name in ("juap", "guap", "guap_ct", "jap")
        else None,
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


def save_perturbation(stem: Path, n_hat: torch.Tensor, *, attack: str, norm: str, eps: float) -> None:
    """Write ``<stem>.safetensors`` (key ``perturbation``, (3, H, W), [0, 1] units) and an amplified PNG.

    Under torchrun only rank 0 writes.
    """
    if not distributed.is_main():
        return
    from PIL import Image

    from .budget import perturbation_norm
    from .errors import JuapError
    from .evaluation import check_finite, within_budget
    from .io import atomic_path, save_tensors

    stem = Path(stem)
    n_hat = n_hat.detach().cpu().float()
    check_finite(n_hat, f"the {attack} perturbation")
    measured = float(perturbation_norm(n_hat.double(), norm))
    if not within_budget(measured, eps):  # never write a budget the perturbation exceeds
        raise JuapError(
            f"the {attack} perturbation measures {measured:.6g} in {norm}, above its budget eps={eps:g}: "
            f"not saved to {stem}.safetensors (a projection bug; please report it)"
        )
    meta = {
        "format": "juap.perturbation",
        "attack": attack,
        "norm": norm,
        "eps": eps,
        "shape": list(n_hat.shape),
        "measured_norm": measured,
    }
    save_tensors(stem.with_suffix(".safetensors"), {"perturbation": n_hat}, meta)
    amp = n_hat / n_hat.abs().max().clamp_min(1e-12) * 0.5 + 0.5  # amplified: 0 -> grey
    arr = (amp.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    with atomic_path(stem.with_suffix(".png")) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def load_perturbation(path: str | os.PathLike) -> torch.Tensor:
    """Read ``perturbation.safetensors`` (a (3, H, W) tensor in [0, 1] pixel units)."""
    from .errors import CheckpointError
    from .evaluation import check_finite
    from .io import load_tensors

    tensors, _ = load_tensors(path)
    if "perturbation" not in tensors:
        raise CheckpointError(f"{path} holds no 'perturbation' tensor (keys: {sorted(tensors)})")
    n = tensors["perturbation"]
    if n.dim() != 3 or n.shape[0] != 3:
        raise CheckpointError(f"{path}: the perturbation must have shape (3, H, W), got {tuple(n.shape)}")
    check_finite(n, f"the perturbation in {path}")
    return n.float()


def run_evaluate(
    cfg, perturbation: str, run_dir: Path, *, progress: bool = True, budget_given: bool = False
) -> Dict[str, Any]:
    """``juap evaluate``: measure a saved perturbation on the test split with every interpreter.

    The budget in metrics.json is the one the file records (a config budget that differs is an error);
    ``budget_given`` says the config set ``attack.eps``/``attack.norm`` (for files that record none).
    """
    from .errors import ConfigError
    from .evaluation import evaluate, perturbation_budget
    from .io import read_metadata

    torch.manual_seed(cfg.seed)  # a classifier without weights is the same random one on every rank
    device = resolve_device(cfg.device)
    n_hat = load_perturbation(perturbation)
    meta = read_metadata(perturbation)
    given = {"norm": cfg.attack.norm, "eps": cfg.attack.eps} if budget_given else None
    budget = perturbation_budget(n_hat, file_budget=meta, config_budget=given, source=str(perturbation))
    splits, _, _, test = attack_data(cfg, progress=progress)
    size = cfg.data.image_size
    if tuple(n_hat.shape[1:]) != (size, size):
        raise ConfigError(
            f"the perturbation is {n_hat.shape[1]}x{n_hat.shape[2]} but the data is resized to "
            f"{size}x{size}: set data.image_size={n_hat.shape[1]} or use a perturbation "
            "made for this size"
        )
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes).to(device)
    _check_classes(clf, splits)
    interps = {n: i.to(device) for n, i in eval_interpreters(cfg, clf).items()}
    test_loader = CountSkipped(make_loader(test, batch_size=cfg.evaluate.batch_size))
    ev = evaluate(
        clf,
        n_hat,
        test_loader,
        interpreters=interps,
        target=cfg.attack.params.get("target"),
        device=device,
        progress=progress,
    )
    metrics = summarize(cfg, ev, perturbation_file=str(perturbation))
    made_by = {k: meta.get(k) for k in ("attack", "generator", "objective")}  # the file's, not the config's
    metrics.update(made_by, **budget)
    metrics["data_summary"] = {**data_summary(splits, test=test), "test_skipped_images": test_loader.skipped}
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics
