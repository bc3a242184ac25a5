"""The ``data`` section of a config: which images, at what size, and how they are split."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from .._validate import check_range
from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split (the paper's seeded random subsets)."""

    name: Literal["synthetic", "folder", "imagenet", "chestxray", "intel", "photos"] = "synthetic"
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
        if self.name not in ("synthetic", "photos") and not self.root:
            raise ConfigError(f"data.root is required for data.name = {self.name!r} (the folder of images)")
