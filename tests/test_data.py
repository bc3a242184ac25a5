import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from juap.data import (
    DataConfig,
    ImageFolderDataset,
    load_splits,
    make_loader,
    split_groups,
    split_indices,
    train_transform,
)
from juap.errors import ConfigError, DataError


def _img(path, mode="RGB", size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "L":
        im = im.convert("L")
    elif mode == "RGBA":
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "data"
    _img(root / "cat" / "rgb.jpg")
    _img(root / "cat" / "gray.png", "L", seed=1)
    _img(root / "dog" / "rgba.png", "RGBA", seed=2)
    _img(root / "dog" / "palette.gif", "P", seed=3)
    _img(root / "dog" / "ok.png", seed=4)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg at all" * 10)
    good = (root / "dog" / "ok.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_folder_converts_modes_and_skips_bad_files(messy_folder):
    with pytest.warns(UserWarning, match="skipped 3 unreadable or non-image files"):
        ds = ImageFolderDataset(messy_folder, image_size=32)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 5 and ds.report.skipped == 3
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1
        assert y in (0, 1)


def test_truncated_at_load_time_is_skipped_and_counted(tmp_path):
    root = tmp_path / "d"
    _img(root / "a" / "1.jpg", size=(200, 200))
    _img(root / "a" / "2.jpg", size=(200, 200), seed=1)
    ds = ImageFolderDataset(root, image_size=16)
    # Corrupt a file after the scan: the header check passed, decoding now fails.
    data = (root / "a" / "2.jpg").read_bytes()
    (root / "a" / "2.jpg").write_bytes(data[:300])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(make_loader(ds, batch_size=2))
    x, y, skipped = batches[0]
    assert x.shape[0] == 1 and skipped == 1


def test_empty_and_classless_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="it is empty"):
        ImageFolderDataset(tmp_path / "empty")
    _img(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "flat")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no readable images"):
        ImageFolderDataset(tmp_path / "noimg")


def test_split_folders_are_merged_and_known_classes_checked(tmp_path):
    root = tmp_path / "chest_xray"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            _img(root / split / cls / f"{split}.jpeg")
    ds = ImageFolderDataset(root, image_size=16, classes=("NORMAL", "PNEUMONIA"))
    assert ds.classes == ["NORMAL", "PNEUMONIA"] and len(ds) == 4
    with pytest.raises(DataError, match="expected"):
        ImageFolderDataset(root, image_size=16, classes=("buildings", "forest"))
    intel = tmp_path / "intel" / "seg_train" / "seg_train"
    _img(intel / "forest" / "1.jpg")
    _img(intel / "sea" / "2.jpg")
    assert ImageFolderDataset(tmp_path / "intel", image_size=16).classes == ["forest", "sea"]


def test_split_protocol_is_deterministic_and_disjoint():
    a = split_indices(1000, fractions=(0.2, 0.2), seed=3)
    b = split_indices(1000, fractions=(0.2, 0.2), seed=3)
    c = split_indices(1000, fractions=(0.2, 0.2), seed=4)
    assert a == b and a != c
    assert len(a[0]) == 200 and len(a[1]) == 200 and not set(a[0]) & set(a[1])
    with pytest.raises(ConfigError, match="sum to at most 1"):
        split_indices(10, fractions=(0.7, 0.7), seed=0)


def test_a_grouped_split_keeps_every_group_whole_and_near_its_shares():
    # e.g. the crops of 10 source photos, 53 or 54 each: the detector split of `juap evade` on the photos
    groups = [f"photo{i % 10}" for i in range(533)]
    for seed in range(5):
        parts = split_groups(groups, fractions=(0.5, 0.25), seed=seed)
        assert sorted(i for p in parts for i in p) == list(range(533))
        names = [{groups[i] for i in p} for p in parts]
        assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        assert abs(len(parts[0]) - 266) <= 27 and abs(len(parts[1]) - 133) <= 27  # half a group off at most
    again = split_groups(list(groups), fractions=(0.5, 0.25), seed=4)
    assert again == parts  # the same groups and seed, the same parts
    singles = split_groups([str(i) for i in range(100)], fractions=(0.5, 0.25), seed=0)
    assert [len(p) for p in singles] == [50, 25, 25]
    uneven = ["big"] * 90 + ["a", "b"]  # one group holds most images: every part still gets one
    assert all(split_groups(uneven, fractions=(0.5, 0.25), seed=0))
    with pytest.raises(ConfigError, match="2 groups .* too few for 3 parts"):
        split_groups(["a", "a", "b"], fractions=(0.5, 0.25), seed=0)


def test_fractions_that_sum_to_one_split_an_odd_count():
    """0.5 + 0.5 of 723 images: each half rounds to 362, but the two take 723 between them, not 724."""
    train, test = split_indices(723, fractions=(0.5, 0.5), seed=0)
    assert len(train) + len(test) == 723 and not set(train) & set(test)
    with pytest.raises(ConfigError, match="too few"):
        split_indices(1, fractions=(0.5, 0.5), seed=0)


def test_load_splits_on_a_folder_saves_indices(tmp_path):
    root = tmp_path / "d"
    for i in range(20):
        _img(root / ("a" if i % 2 else "b") / f"{i}.png", seed=i)
    cfg = DataConfig(name="folder", root=str(root), image_size=16, train_fraction=0.5, test_fraction=0.25)
    s1, s2 = load_splits(cfg), load_splits(cfg)
    assert s1.split["train"] == s2.split["train"] and len(s1.train) == 10 and len(s1.test) == 5
    assert not set(s1.split["train"]) & set(s1.split["test"])
    x, y = s1.test[0]
    assert x.shape == (3, 16, 16)


def test_train_transform_augments_but_keeps_shape():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    t = train_transform(32)
    torch.manual_seed(0)
    outs = [t(im) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_data_config_validation():
    with pytest.raises(ConfigError, match="data.root is required"):
        DataConfig(name="imagenet")
    with pytest.raises(ConfigError, match="data.image_size"):
        DataConfig(image_size=4)
    with pytest.raises(ConfigError, match="at most 1"):
        DataConfig(train_fraction=0.9, test_fraction=0.2)


def test_in_memory_loader_crops_and_flips_like_the_paper():
    import torch.nn.functional as F

    from juap.data import InMemoryLoader

    x = torch.rand(12, 3, 16, 16)
    y = torch.arange(12)
    loader = InMemoryLoader(x, y, batch_size=5, augment=True, seed=1)
    assert len(loader) == 3
    seen = []
    for xb, yb, skipped in loader:
        assert skipped == 0 and xb.shape[1:] == (3, 16, 16)
        for img, label in zip(xb, yb, strict=True):
            padded = F.pad(x[label][None], (2, 2, 2, 2), mode="reflect")[0]
            crops = [padded[:, i : i + 16, j : j + 16] for i in range(5) for j in range(5)]
            assert any(torch.equal(img, c) or torch.equal(img, c.flip(-1)) for c in crops)
            seen.append(int(label))
    assert sorted(seen) == list(range(12))
    plain = InMemoryLoader(x, y, batch_size=4, shuffle=False)
    assert torch.equal(next(iter(plain))[0], x[:4])
