"""From configs to objects: the classifier, interpreters, attack and data a command's config names."""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import Subset

from .._registry import ATTACKS, INTERPRETERS
from ..attacks.base import COMMON_ARGS
from ..classifiers import Classifier, create_classifier, load_classifier
from ..data import DataSplits, load_splits
from ..errors import CheckpointError, ConfigError
from ..interpreters.base import Interpreter, split_spec
from ..runtime import distributed
from .configs import ClassifierConfig


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
        why = str(e).split("() ", 1)[-1]  # "build() got an unexpected keyword argument 'widths'"
        raise ConfigError(f"classifier {cfg.name!r} {why} (check classifier.options)") from None


# -- attacks ---------------------------------------------------------------------------------------------
def build_interpreter(
    name: Optional[str],
    classifier: Classifier,
    *,
    checkpoint: Optional[str] = None,
    options: Optional[Dict[str, Any]] = None,
) -> Optional[Interpreter]:
    """A registered interpreter (``name`` may carry a layer: ``gradcam@layer3``, ``pgc:layercam@layer3``); one
    that declares ``requires_checkpoint`` (RTS) needs its trained file."""
    if name is None:
        return None
    name, at_layer = split_spec(name)
    cls = INTERPRETERS.get(name)
    opts = {**at_layer, **dict(options or {})}
    if cls.requires_checkpoint:
        if not checkpoint:
            raise ConfigError(
                f"the {cls.label} interpreter ({name!r}) is a learned model and needs its trained file: "
                f"set interpreter.checkpoint, or evaluate.checkpoints: {{{name}: PATH}}, to the file its "
                "training command wrote (`juap --help` lists the commands)"
            )
        opts["checkpoint"] = checkpoint
    elif checkpoint:
        raise ConfigError(f"interpreter {name!r} takes no checkpoint (it is not a learned model)")
    return cls.create(classifier, **opts)


def attack_param_names(cls: type) -> set:
    """The keyword arguments an attack class accepts: its declared ``hyperparams`` and the common ones."""
    common = set(COMMON_ARGS) - ({"interpreter"} if not cls.takes_interpreter else set())
    return set(cls.hyperparams) | common


def build_attack(cfg, classifier: Classifier, interpreter, *, device=None, seed: Optional[int] = None):
    """The attack a config names, with its ``params`` checked against the attack's declared hyperparams.

    ``seed`` (the run's) seeds an attack that declares a seeded default (its generator's weights and noise,
    its data order) unless ``params`` gives one: ``--set seed=1`` changes the whole run, not only the data
    order. An attack unseeded by default (PGD's random starts) stays so.
    """
    cls = ATTACKS.get(cfg.name)
    for key in cfg.params:
        if key not in cls.hyperparams:
            close = difflib.get_close_matches(key, sorted(cls.hyperparams), n=1)
            hint = f" Did you mean 'attack.params.{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key 'attack.params.{key}' for attack {cfg.name!r}.{hint} "
                f"Known: {', '.join(sorted(cls.hyperparams))}"
            )
    try:
        cls.check_hyperparams(cfg.params)
    except ConfigError as e:  # the same message, with the config's key
        raise ConfigError(str(e).replace(f"attack {cfg.name!r}.", "attack.params.")) from None
    kwargs = dict(cfg.params, classifier=classifier, norm=cfg.norm, eps=cfg.eps, device=device)
    seeded = "seed" in cls.hyperparams and cls.hyperparams["seed"].default is not None  # PGD: unseeded
    if seed is not None and seeded and "seed" not in cfg.params:
        kwargs["seed"] = seed
    if cls.takes_interpreter:
        kwargs["interpreter"] = interpreter
    elif interpreter is not None:
        raise ConfigError(
            f"attack {cfg.name!r} uses no interpreter; set interpreter.name: null "
            "(the maps are still measured for every interpreter in evaluate.interpreters)"
        )
    return cls(**kwargs)


def learned_checkpoints(evaluate, interpreter=None) -> Dict[str, str]:
    """The trained file of each learned interpreter a config gives: ``evaluate.checkpoints`` (``{name:
    path}``, each one joins the transfer table) and ``interpreter.checkpoint`` for the attacked one."""
    out = dict(evaluate.checkpoints)
    if interpreter is not None and interpreter.name and interpreter.checkpoint:
        out.setdefault(interpreter.name, interpreter.checkpoint)
    return out


def eval_interpreters(cfg, classifier: Classifier) -> Dict[str, Any]:
    """Every interpreter of the transfer table: ``evaluate.interpreters``, the attacked one, and each
    learned interpreter whose trained file is given."""
    ckpts = learned_checkpoints(cfg.evaluate, cfg.interpreter)
    names = list(dict.fromkeys([*cfg.evaluate.interpreters, *ckpts, *filter(None, [cfg.interpreter.name])]))
    return {
        n: build_interpreter(
            n,
            classifier,
            checkpoint=ckpts.get(n) if INTERPRETERS.get(split_spec(n)[0]).requires_checkpoint else None,
            options=cfg.interpreter.options if n == cfg.interpreter.name else None,
        )
        for n in names
    }


def attack_data(cfg, *, progress: bool):
    """Splits for an attack: train (minus a held-out validation part) and test."""
    with distributed.main_first():  # under torchrun, rank 0 fills the data cache, then the others read it
        splits = load_splits(cfg.data, progress=progress)
    n_train = len(splits.train)
    n_val = max(1, int(round(cfg.attack.val_fraction * n_train))) if cfg.attack.val_fraction > 0 else 0
    if n_val >= n_train:  # a train split of one image: it is trained on, none is held out
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


def check_classes(clf: Classifier, splits: DataSplits) -> None:
    """Refuse a classifier whose number of classes is not the data set's (a checkpoint of other data)."""
    if clf.num_classes != splits.num_classes:
        raise CheckpointError(
            f"the classifier has {clf.num_classes} classes but the data set has {splits.num_classes} "
            f"({', '.join(splits.classes[:8])}{'...' if splits.num_classes > 8 else ''}): "
            "use a classifier checkpoint trained on this data (juap train-classifier)"
        )
