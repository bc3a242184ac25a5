"""The data-set registry: every ``data.name`` is a registered :class:`~juap.data.base.DataSet` whose needs
(class folders, a root, how it is made and split, object boxes) are declared, not dispatched by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from juap._registry import DATASETS
from juap.data import DataConfig, DataSet, data_set, list_data_sets, load_splits
from juap.errors import ConfigError


def test_every_named_data_set_is_registered_with_its_needs():
    assert {"synthetic", "photos", "folder", "imagenet", "chestxray", "intel"} <= set(list_data_sets())
    assert not data_set("synthetic").needs_root and data_set("synthetic").records_boxes
    assert data_set("synthetic").in_memory and not data_set("folder").in_memory
    assert not data_set("photos").needs_root and data_set("photos").fixed_split
    assert data_set("chestxray").classes == ("NORMAL", "PNEUMONIA") and data_set("imagenet").classes is None
    assert all(data_set(n).needs_root for n in ("folder", "imagenet", "chestxray", "intel"))


def test_an_unknown_data_set_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown data set 'synthtic'. Did you mean 'synthetic'\?.*photos"):
        DataConfig(name="synthtic")
    with pytest.raises(ConfigError, match="data.root is required for data.name = 'intel'"):
        DataConfig(name="intel")


def test_decode_once_follows_the_data_set_unless_the_config_says():
    assert DataConfig().decode_once and not DataConfig(name="folder", root="x").decode_once
    assert (
        not DataConfig(in_memory=False).decode_once
        and DataConfig(name="folder", root="x", in_memory=True).decode_once
    )


def _folder(root: Path, classes, n: int = 4) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (40 * i, 10, 200)).save(root / c / f"{i}.png")
    return root


def test_a_new_data_set_is_one_registered_class(tmp_path, monkeypatch):
    """A data set registered by name (its classes and its own split) works through DataConfig and
    load_splits with no change elsewhere."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))  # registered for this test only

    @DATASETS.register("flowers")
    class Flowers(DataSet):
        classes = ("daisy", "rose")

        @classmethod
        def split(cls, cfg, paths):  # the even files train, the odd ones test
            return [i for i in range(len(paths)) if i % 2 == 0], [i for i in range(len(paths)) if i % 2]

    splits = load_splits(
        DataConfig(name="flowers", root=str(_folder(tmp_path / "f", Flowers.classes)), image_size=16)
    )
    assert splits.classes == ["daisy", "rose"] and len(splits.train) == len(splits.test) == 4
    with pytest.raises(Exception, match=r"expected \['daisy', 'rose'\]"):  # its declared classes are checked
        load_splits(
            DataConfig(name="flowers", root=str(_folder(tmp_path / "g", ("daisy", "tulip"))), image_size=16)
        )
