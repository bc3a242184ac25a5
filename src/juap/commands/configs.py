"""The config sections shared by several commands (data, classifier, interpreter, attack, evaluation)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple

from .._registry import INTERPRETERS
from .._validate import check_range
from ..data.config import DataConfig
from ..errors import ConfigError
from ..interpreters.base import split_spec
from ..transforms import parse_transform


# -- sections ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """A registered classifier and its weights (enum name, local checkpoint path, or none)."""

    name: str = "small_resnet"
    weights: str | None = None
    num_classes: int | None = None
    reset_head: bool = False
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Classifier training (``juap train-classifier``)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, low=1)
        check_range("train.batch_size", self.batch_size, low=1)
        check_range("train.lr", self.lr, low=0, low_open=True)
        check_range("train.momentum", self.momentum, low=0, high=1)
        check_range("train.weight_decay", self.weight_decay, low=0)
        check_range("train.label_smoothing", self.label_smoothing, low=0, high=1)


@dataclasses.dataclass(frozen=True)
class InterpreterConfig:
    """The interpreter an attack keeps unchanged (``name: null`` for none, e.g. GUAP, UAP, PGD)."""

    name: Optional[str] = None
    checkpoint: Optional[str] = None  # a learned interpreter's (requires_checkpoint) trained file
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """A registered attack, its budget (eps in 0-255 units) and its hyperparameters (``params``)."""

    name: str = "juap"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 10.0
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    val_fraction: float = 0.1  # of the train split, held out to pick the best perturbation

    def __post_init__(self) -> None:
        check_range("attack.eps", self.eps, low=0, low_open=True)
        check_range("attack.val_fraction", self.val_fraction, low=0, high=0.5)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """What a training command logs besides ``history.csv`` and ``curves.png`` (always written)."""

    tensorboard: bool = False  # TensorBoard events in RUN/tensorboard/ (pip install "juap[tensorboard]")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``juap attack`` / ``juap evaluate`` measure on the test split."""

    interpreters: Tuple[str, ...] = ("cam", "gradcam")
    # {interpreter: trained file} for learned interpreters (those declaring requires_checkpoint), e.g.
    # {rts: runs/rts/rts.safetensors}; each one given joins the table
    checkpoints: Dict[str, str] = dataclasses.field(default_factory=dict)
    batch_size: int = 64
    max_images: Optional[int] = None
    # maps.png: which test images it shows (fooled: the first fooled ones; map_change: those whose map
    # changed most and least; random: seeded by `seed`), and how many (0: no figure)
    figure_images: Literal["fooled", "map_change", "random"] = "fooled"
    figure_count: int = 4
    # a universal perturbation measured again after each of these, applied to the benign and the
    # adversarial images alike (juap.transforms): e.g. [jpeg:75, resize:0.5, crop:0.875, blur:1]
    transforms: Tuple[str, ...] = ()
    # deletion / insertion areas (juap.faithfulness) of every interpreter's benign and adversarial maps, with
    # this many steps (e.g. 16); 0: not measured (they cost 4 (steps + 1) forward passes per image and map)
    faithfulness: int = 0
    faithfulness_baseline: Literal["blur", "black", "mean"] = "blur"  # what the removed pixels become

    def __post_init__(self) -> None:
        check_range("evaluate.batch_size", self.batch_size, low=1)
        check_range("evaluate.figure_count", self.figure_count, low=0)
        check_range("evaluate.faithfulness", self.faithfulness, low=0)
        for spec in self.interpreters:  # an unknown name or a missing extra fails at load time
            INTERPRETERS.get(split_spec(spec)[0])
        check_checkpoints("evaluate.checkpoints", self.checkpoints)
        for spec in self.transforms:
            parse_transform(spec)  # a bad spec fails at load time, listing the known ones


def learned_interpreters() -> List[str]:
    """The registered interpreters that declare ``requires_checkpoint`` (a trained model, e.g. RTS)."""
    return [n for n in INTERPRETERS.names() if INTERPRETERS.get(n).requires_checkpoint]


def check_checkpoints(where: str, checkpoints: Mapping[str, Any]) -> None:
    """``checkpoints`` maps learned interpreters to their trained files; another name is a ConfigError."""
    learned = learned_interpreters()
    for name, path in checkpoints.items():
        INTERPRETERS.get(name)  # an unknown interpreter: the known ones listed
        if name not in learned:
            raise ConfigError(
                f"{where}.{name}: interpreter {name!r} takes no checkpoint (it is not a learned model); "
                f"learned interpreters: {', '.join(learned) or '(none)'}"
            )
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.{name} must be the path of a trained file, got {path!r}")


def migrate_checkpoint_keys(section: Any, where: str) -> Any:
    """An old config section's ``<interpreter>_checkpoint: PATH`` keys (``rts_checkpoint`` before
    ``checkpoints`` existed) moved into ``checkpoints: {interpreter: PATH}``, with a FutureWarning naming
    the new key (a null one is dropped); a section without such keys is returned as it is."""
    if not isinstance(section, Mapping):
        return section
    legacy = {f"{n}_checkpoint" for n in learned_interpreters()}
    old = [k for k in section if k in legacy]
    if not old:
        return section
    out = {k: v for k, v in section.items() if k not in old}
    moved = {k.removesuffix("_checkpoint"): section[k] for k in old if section[k] is not None}
    out["checkpoints"] = {**moved, **dict(out.get("checkpoints") or {})}
    if moved:  # a null old key meant nothing: dropped without a word
        given = ", ".join(f"{where}.{n}_checkpoint" for n in moved)
        warnings.warn(
            f"{given} is deprecated: write {where}.checkpoints: {{{', '.join(moved)}: PATH}} instead "
            "(the trained file of each learned interpreter, by name)",
            FutureWarning,
            stacklevel=3,
        )
    return out


def migrate_legacy_keys(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """A command's or an experiment's raw config with old keys moved to their new places (a FutureWarning
    each): ``evaluate.rts_checkpoint`` and ``grid.classifiers[i].rts_checkpoint`` become ``checkpoints``."""
    out = dict(raw)
    if "evaluate" in out:
        out["evaluate"] = migrate_checkpoint_keys(out["evaluate"], "evaluate")
    grid = out.get("grid")
    if isinstance(grid, Mapping) and isinstance(grid.get("classifiers"), (list, tuple)):
        where = "grid.classifiers[{}]"
        clfs = [migrate_checkpoint_keys(c, where.format(i)) for i, c in enumerate(grid["classifiers"])]
        out["grid"] = {**grid, "classifiers": clfs}
    return out


def attack_split_data() -> DataConfig:
    """The paper's attack protocol: seeded, disjoint 20% train and 20% test subsets of the data."""
    return DataConfig(train_fraction=0.2, test_fraction=0.2)
