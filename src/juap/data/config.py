"""The ``data`` section of a config: which images, at what size, and how they are split; and the
registered data set its ``name`` resolves to (:func:`data_set`)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from .._registry import DATASETS, UnknownNameError
from .._validate import check_range
from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split (the paper's seeded random subsets)."""

    name: str = "synthetic"  # a registered data set (juap.data.base.DataSet): synthetic, photos, folder, ...
    root: str | None = None
    image_size: int = 64
    train_fraction: float = 0.8
    test_fraction: float = 0.2
    split_seed: int = 0
    num_images: int = 3000  # synthetic only
    num_classes: int = 6  # synthetic only
    synthetic_seed: int = 0  # synthetic only
    num_workers: int = 0
    in_memory: Optional[bool] = None  # decode the training images once (default: the data set's in_memory)

    def __post_init__(self) -> None:
        spec = data_set(self.name)  # an unknown name: a ConfigError listing the known ones
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
        if spec.needs_root and not self.root:
            raise ConfigError(f"data.root is required for data.name = {self.name!r} (the folder of images)")

    @property
    def decode_once(self) -> bool:
        """Whether training decodes the images once: ``in_memory``, else the data set's declared default."""
        return self.in_memory if self.in_memory is not None else data_set(self.name).in_memory


def data_set(name: str) -> type:
    """The registered data set ``name`` (a :class:`juap.data.base.DataSet` subclass); an unknown name is a
    ConfigError listing the known ones."""
    try:
        return DATASETS.get(name)
    except UnknownNameError as e:
        raise ConfigError(f"data.name: {e}") from None


def list_data_sets() -> List[str]:
    """The names ``data.name`` accepts."""
    return DATASETS.names()
