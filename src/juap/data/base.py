"""What a named data set needs, declared on its class and kept in the ``DATASETS`` registry.

``data: {name: ...}`` in a config resolves through :func:`juap.data.config.data_set`; commands and config
checks ask the class (does it need ``data.root``? which class folders must it have? how is it split?)
instead of comparing names. A new data set is one small subclass registered by name::

    @DATASETS.register("flowers")
    class Flowers(DataSet):
        classes = ("daisy", "rose", "tulip")

This module does not import torch (the synthetic set, which registers here, must not need it).
"""

from __future__ import annotations

from typing import ClassVar, List, Optional, Sequence, Tuple

from .config import DataConfig


class DataSet:
    """A data set of class folders (ImageFolder layout) and its declared needs.

    Attributes:
        classes: the class folders it must have, in class order (``None``: whatever folders are there).
        needs_root: whether ``data.root`` must be given; a set that makes its own folder (``root``
            overridden) does not need one.
        records_boxes: whether its images come with object boxes (``boxes.json``: the pointing game).
        in_memory: whether it is small enough to decode once for training (``data.in_memory``'s default).
        fixed_split: whether :meth:`split` ignores ``data.train_fraction`` / ``test_fraction``.
    """

    classes: ClassVar[Optional[Tuple[str, ...]]] = None
    needs_root: ClassVar[bool] = True
    records_boxes: ClassVar[bool] = False
    in_memory: ClassVar[bool] = False
    fixed_split: ClassVar[bool] = False

    @classmethod
    def root(cls, cfg: DataConfig, *, progress: bool = False) -> str:
        """The folder of images for ``cfg`` (made on first use by a set that does not need ``data.root``)."""
        return str(cfg.root)

    @classmethod
    def split(cls, cfg: DataConfig, paths: Sequence[str]) -> Tuple[List[int], List[int]]:
        """Train and test indices into ``paths`` (the scanned image files, in folder order): by default
        the seeded random fractions of ``cfg`` (the paper's 20% subsets)."""
        from .splits import split_indices  # torch, only once images are split

        fractions = (cfg.train_fraction, cfg.test_fraction)
        return split_indices(len(paths), fractions=fractions, seed=cfg.split_seed)

    @classmethod
    def groups(cls, paths: Sequence[str]) -> Optional[List[str]]:
        """The group of every image in ``paths`` that a further split must keep whole (images cut from one
        source); ``None``: every image stands alone."""
        return None
