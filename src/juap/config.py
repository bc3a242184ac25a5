"""Typed, validated configuration: frozen dataclasses loaded from YAML with ``--set`` overrides.

Errors name the field, the bad value and the allowed values, and suggest the nearest key for a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from .errors import ConfigError

T = TypeVar("T")


def check_range(
    where: str, value: float, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """Raise ConfigError unless ``value`` lies in the given range."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high
    )
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        raise ConfigError(
            f"{where} = {value!r} is out of range; it must be {' and '.join(x for x in (lo, hi) if x)}"
        )


# -- sections ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split (the paper's seeded random subsets)."""

    name: Literal["synthetic", "folder", "imagenet", "chestxray", "intel"] = "synthetic"
    root: str | None = None
    image_size: int = 64
    train_fraction: float = 0.8
    test_fraction: float = 0.2
    split_seed: int = 0
    num_images: int = 3000  # synthetic only
    num_classes: int = 6  # synthetic only
    synthetic_seed: int = 0  # synthetic only
    num_workers: int = 0
    in_memory: Optional[bool] = None  # decode the training images once (default: for the synthetic set)

    def __post_init__(self) -> None:
        check_range("data.image_size", self.image_size, low=16)
        check_range("data.train_fraction", self.train_fraction, low=0, high=1, low_open=True)
        check_range("data.test_fraction", self.test_fraction, low=0, high=1, low_open=True)
        if self.train_fraction + self.test_fraction > 1 + 1e-9:
            raise ConfigError(
                f"data.train_fraction + data.test_fraction = {self.train_fraction + self.test_fraction} "
                "must be at most 1 (the subsets are disjoint)"
            )
        check_range("data.num_images", self.num_images, low=12)
        check_range("data.num_workers", self.num_workers, low=0)
        if self.name != "synthetic" and not self.root:
            raise ConfigError(f"data.root is required for data.name = {self.name!r} (the folder of images)")


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
class TrainClassifierConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"


# -- loading -----------------------------------------------------------------------------------------
def load_config(cls: Type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML (optional), apply ``section.key=value`` overrides, validate into ``cls``."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return from_dict(cls, raw)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> Dict[str, Any]:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict, returning a new dict."""
    out = _deepcopy_dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _deepcopy_dict(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A config as plain data, for ``config.yaml`` in a run folder."""
    return dataclasses.asdict(cfg)


def from_dict(cls: Type[T], raw: Mapping[str, Any], where: str = "") -> T:
    """Validate a mapping into the dataclass ``cls``; unknown keys and bad values raise ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {_join(where, close[0])!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {_join(where, key)!r}.{hint} Known keys in "
                f"{where or 'the top level'}: {', '.join(fields)}"
            )
    kwargs = {k: _coerce(hints[k], v, _join(where, k)) for k, v in raw.items()}
    return cls(**kwargs)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where} = {value!r} is not allowed.{hint} Allowed values: {', '.join(map(str, args))}"
            )
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if math.isnan(value):
            raise ConfigError(f"{where} must be a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, Tuple, list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


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
class EvalConfig:
    """What ``juap attack`` / ``juap evaluate`` measure on the test split."""

    interpreters: Tuple[str, ...] = ("cam", "gradcam")
    rts_checkpoint: Optional[str] = None  # adds "rts" to the table when given
    batch_size: int = 64
    max_images: Optional[int] = None

    def __post_init__(self) -> None:
        check_range("evaluate.batch_size", self.batch_size, low=1)


def attack_split_data() -> DataConfig:
    """The paper's attack protocol: seeded, disjoint 20% train and 20% test subsets of the data."""
    return DataConfig(train_fraction=0.2, test_fraction=0.2)


@dataclasses.dataclass(frozen=True)
class AttackRunConfig:
    """``juap attack`` and ``juap evaluate``."""

    data: DataConfig = dataclasses.field(default_factory=attack_split_data)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    interpreter: InterpreterConfig = dataclasses.field(default_factory=InterpreterConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
