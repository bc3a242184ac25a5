"""From configs to objects: the classifier, interpreters, attack and data a command's config names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..classifiers import Classifier, create_classifier, load_classifier
from ..data import (
    DataSplits,
    load_splits,
)
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
        from ..errors import ConfigError

        why = str(e).split("() ", 1)[-1]  # "build() got an unexpected keyword argument 'widths'"
        raise ConfigError(f"classifier {cfg.name!r} {why} (check classifier.options)") from None


# -- attacks -----------------------------------------------------------------------------------------
def build_interpreter(
    name: Optional[str],
    classifier: Classifier,
    *,
    checkpoint: Optional[str] = None,
    options: Optional[Dict[str, Any]] = None,
):
    """A registered interpreter; ``rts`` needs the checkpoint written by ``juap train-rts``."""
    from .. import create_interpreter
    from ..errors import ConfigError

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

    from .._registry import ATTACKS
    from ..errors import ConfigError

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
    from ..errors import CheckpointError

    if clf.num_classes != splits.num_classes:
        raise CheckpointError(
            f"the classifier has {clf.num_classes} classes but the data set has {splits.num_classes} "
            f"({', '.join(splits.classes[:8])}{'...' if splits.num_classes > 8 else ''}): "
            "use a classifier checkpoint trained on this data (juap train-classifier)"
        )
