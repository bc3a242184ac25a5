"""The config sections shared by several commands (data, classifier, interpreter, attack, evaluation)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Literal, Optional, Tuple

from .._validate import check_range
from ..data.config import DataConfig


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
    checkpoint: Optional[str] = None  # RTS: the model trained by `juap train-rts`
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
    rts_checkpoint: Optional[str] = None  # adds "rts" to the table when given
    batch_size: int = 64
    max_images: Optional[int] = None
    # maps.png: which test images it shows (fooled: the first fooled ones; map_change: those whose map
    # changed most and least; random: seeded by `seed`), and how many (0: no figure)
    figure_images: Literal["fooled", "map_change", "random"] = "fooled"
    figure_count: int = 4

    def __post_init__(self) -> None:
        check_range("evaluate.batch_size", self.batch_size, low=1)
        check_range("evaluate.figure_count", self.figure_count, low=0)


def attack_split_data() -> DataConfig:
    """The paper's attack protocol: seeded, disjoint 20% train and 20% test subsets of the data."""
    return DataConfig(train_fraction=0.2, test_fraction=0.2)
