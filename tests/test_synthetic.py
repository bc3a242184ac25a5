"""Tests of the embedded synthetic data set (juap.data.synthetic): pure numpy + Pillow, fast."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from juap.data import synthetic
from juap.data.synthetic import (
    CLASS_NAMES,
    SYNTHETIC_VERSION,
    default_cache_dir,
    generate_synthetic,
    load_boxes,
    render_sample,
    synthetic_root,
)

N = 24  # a multiple of 6, so the default classes are exactly balanced
DEAD_PID = 999_999_999  # above Linux pid_max: no such process


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pngs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.png"))


def _index(relative: str) -> int:
    return int(re.search(r"_(\d{5})\.png$", relative).group(1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "ds", num_images=N, image_size=32, seed=3)


# --------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_data(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", num_images=N, image_size=32, seed=3)
    assert _pngs(again) == _pngs(dataset)
    for relative in _pngs(dataset):
        np.testing.assert_array_equal(_pixels(again / relative), _pixels(dataset / relative))
    assert load_boxes(again) == load_boxes(dataset)


def test_different_seed_gives_different_data(dataset: Path, tmp_path: Path) -> None:
    other = generate_synthetic(tmp_path / "other", num_images=N, image_size=32, seed=4)
    assert _pngs(other) == _pngs(dataset)  # same layout ...
    differing = [r for r in _pngs(dataset) if not np.array_equal(_pixels(other / r), _pixels(dataset / r))]
    assert len(differing) == N  # ... every image differs
    assert load_boxes(other) != load_boxes(dataset)


def test_every_image_is_different(dataset: Path) -> None:
    arrays = [_pixels(dataset / r).tobytes() for r in _pngs(dataset)]
    assert len(set(arrays)) == N
    assert len(set(load_boxes(dataset).values())) > N // 2
    clutters = {synthetic._render(i, seed=3, draw_object=False)[0].tobytes() for i in (0, 6, 12)}
    assert len(clutters) == 3  # same class, different index: different background


def test_images_do_not_depend_on_dataset_size_or_order(dataset: Path) -> None:
    for index in (17, 2, 9):  # out of order, alone
        image, box, label = render_sample(index, seed=3, image_size=32)
        relative = f"{CLASS_NAMES[label]}/{CLASS_NAMES[label]}_{index:05d}.png"
        np.testing.assert_array_equal(np.asarray(image), _pixels(dataset / relative))
        assert load_boxes(dataset)[relative] == box


def test_render_sample_equals_written_files(dataset: Path) -> None:
    boxes = load_boxes(dataset)
    for relative in _pngs(dataset):
        index = _index(relative)
        image, box, label = render_sample(index, seed=3, image_size=32)
        assert image.mode == "RGB" and image.size == (32, 32)
        assert relative.split("/")[0] == CLASS_NAMES[label]
        np.testing.assert_array_equal(np.asarray(image), _pixels(dataset / relative))
        assert boxes[relative] == box


# --------------------------------------------------------------------------------------------------
# boxes and content


@pytest.mark.parametrize("image_size", [32, 64])
def test_boxes_are_inside_non_empty_and_tight(image_size: int) -> None:
    for index in range(N):
        image, box, _ = render_sample(index, seed=1, image_size=image_size)
        x0, y0, x1, y1 = box
        assert all(isinstance(v, int) for v in box)
        assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
        extent = max(x1 - x0, y1 - y0) / image_size
        assert 0.33 <= extent <= 0.72, (index, box)

        clutter, no_box, _ = synthetic._render(index, seed=1, image_size=image_size, draw_object=False)
        assert no_box is None
        change = np.abs(np.asarray(image, np.int32) - np.asarray(clutter, np.int32)).sum(axis=2)
        inside = np.zeros_like(change, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert change[inside].sum() > 0.95 * change.sum()
        assert change[~inside].sum() == 0  # the object leaves no trace outside its box
        changed = change > 0
        # tight: every edge row and column of the box holds a changed pixel
        assert changed[y0, x0:x1].any() and changed[y1 - 1, x0:x1].any()
        assert changed[y0:y1, x0].any() and changed[y0:y1, x1 - 1].any()
        # the object covers a good part of its box and is clearly visible
        assert changed[inside].mean() > 0.25
        assert np.median(change[change > 20]) > 60


def test_clutter_only_background_does_not_depend_on_class() -> None:
    clutter_a, _, label_a = synthetic._render(4, seed=0, num_classes=6, draw_object=False)
    clutter_b, _, label_b = synthetic._render(4, seed=0, num_classes=3, draw_object=False)
    assert label_a != label_b
    np.testing.assert_array_equal(np.asarray(clutter_a), np.asarray(clutter_b))


@pytest.mark.parametrize("image_size", [16, 32, 96, 128, 224])
def test_image_sizes(image_size: int) -> None:
    for index in range(3):
        image, (x0, y0, x1, y1), label = render_sample(index, image_size=image_size)
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
        assert label == index % 6


def test_colour_does_not_identify_the_class() -> None:
    samples = [render_sample(i, seed=5, image_size=16) for i in range(192)]
    colours = np.array([np.asarray(im, np.float32).reshape(-1, 3).mean(axis=0) for im, _, _ in samples])
    labels = np.array([label for _, _, label in samples])
    train, test = slice(0, 96), slice(96, 192)
    centroids = np.stack([colours[train][labels[train] == c].mean(axis=0) for c in range(6)])
    nearest = np.linalg.norm(colours[test][:, None] - centroids[None], axis=2).argmin(axis=1)
    assert (nearest == labels[test]).mean() < 0.4  # chance is 1/6


# --------------------------------------------------------------------------------------------------
# layout and metadata


def test_folder_layout_and_meta(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == sorted([*CLASS_NAMES, "boxes.json", "meta.json"])
    pngs = _pngs(dataset)
    assert len(pngs) == N
    for relative in pngs:
        name = relative.split("/")[0]
        assert re.fullmatch(rf"{name}/{name}_\d{{5}}\.png", relative)
        assert CLASS_NAMES.index(name) == _index(relative) % 6
    assert sorted(load_boxes(dataset)) == pngs
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["version"] == SYNTHETIC_VERSION
    assert meta["seed"] == 3 and meta["num_images"] == N and meta["image_size"] == 32
    assert meta["num_classes"] == 6 and meta["class_names"] == list(CLASS_NAMES)


def test_class_names_are_sorted_like_imagefolder() -> None:
    assert list(CLASS_NAMES) == sorted(CLASS_NAMES) and len(set(CLASS_NAMES)) == len(CLASS_NAMES) >= 6


def test_classes_are_balanced(dataset: Path) -> None:
    counts = {name: len(list((dataset / name).glob("*.png"))) for name in CLASS_NAMES}
    assert set(counts.values()) == {N // 6}


def test_fewer_classes(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", num_images=12, image_size=32, num_classes=4)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(CLASS_NAMES[:4])
    assert {len(list((root / n).glob("*.png"))) for n in CLASS_NAMES[:4]} == {3}
    assert json.loads((root / "meta.json").read_text())["class_names"] == list(CLASS_NAMES[:4])


def test_load_boxes_returns_int_tuples(dataset: Path) -> None:
    boxes = load_boxes(dataset)
    assert all(
        isinstance(b, tuple) and len(b) == 4 and all(isinstance(v, int) for v in b) for b in boxes.values()
    )


def test_load_boxes_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boxes.json"):
        load_boxes(tmp_path)
    (tmp_path / "boxes.json").write_text('{"a/a_00000.png": [1, 2, 3]}')
    with pytest.raises(ValueError, match="malformed"):
        load_boxes(tmp_path)


# --------------------------------------------------------------------------------------------------
# atomicity and reuse


def _age_all_files(root: Path) -> dict[str, int]:
    old = 1_000_000_000  # 2001
    for path in root.rglob("*"):
        os.utime(path, (old, old))
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def _no_rendering(*args: object, **kwargs: object) -> None:
    raise AssertionError("a complete data set was rendered again")


def test_complete_folder_is_reused_without_rewriting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_synthetic(tmp_path / "ds", num_images=12, image_size=32)
    mtimes = _age_all_files(root)
    monkeypatch.setattr(synthetic, "_render", _no_rendering)
    assert generate_synthetic(root, num_images=12, image_size=32) == root
    assert {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left


def test_stale_tmp_folder_is_cleaned_and_live_one_kept(tmp_path: Path) -> None:
    stale = tmp_path / f"ds.tmp-{DEAD_PID}-abc"
    (stale / "circle").mkdir(parents=True)
    (stale / "circle" / "circle_00000.png").write_bytes(b"half written")
    live = tmp_path / f"ds.tmp-{os.getpid()}-other"  # a run still in progress
    live.mkdir()
    root = generate_synthetic(tmp_path / "ds", num_images=6, image_size=32)
    assert not stale.exists()
    assert live.exists()
    assert len(_pngs(root)) == 6 and (root / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", live.name])


def test_incomplete_folder_is_regenerated(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", num_images=6, image_size=32)
    (root / "boxes.json").unlink()  # e.g. damaged by hand
    generate_synthetic(root, num_images=6, image_size=32)
    assert len(load_boxes(root)) == 6


def test_other_parameters_replace_an_outdated_dataset(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", num_images=6, image_size=32, seed=0)
    generate_synthetic(root, num_images=12, image_size=32, seed=1)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["seed"] == 1 and meta["num_images"] == 12
    assert len(_pngs(root)) == 12
    image, _, label = render_sample(7, seed=1, image_size=32)
    name = CLASS_NAMES[label]
    np.testing.assert_array_equal(_pixels(root / f"{name}/{name}_00007.png"), np.asarray(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a juap synthetic data set"):
        generate_synthetic(root, num_images=6, image_size=32)
    assert (root / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # the temporary folder was removed


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    root = generate_synthetic(tmp_path / "ds", num_images=6, image_size=32)
    assert len(_pngs(root)) == 6


# --------------------------------------------------------------------------------------------------
# cache location


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JUAP_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("JUAP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "juap"


def test_synthetic_root_encodes_parameters_and_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = synthetic_root(cache_dir=tmp_path, num_images=6, image_size=32, num_classes=3, seed=2)
    assert root.parent == tmp_path
    assert f"v{SYNTHETIC_VERSION}" in root.name
    for part in ("n6", "s32", "c3", "seed2"):
        assert part in root.name.split("-")
    assert len(_pngs(root)) == 6
    mtimes = _age_all_files(root)
    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_render", _no_rendering)
        assert synthetic_root(cache_dir=tmp_path, num_images=6, image_size=32, num_classes=3, seed=2) == root
    assert {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    other = synthetic_root(cache_dir=tmp_path, num_images=6, image_size=32, num_classes=3, seed=3)
    assert other != root

    monkeypatch.setenv("JUAP_CACHE", str(tmp_path / "env"))
    assert synthetic_root(num_images=6, image_size=32).parent == tmp_path / "env"


def test_progress_bar_option(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "ds", num_images=6, image_size=32, progress=True)
    assert len(_pngs(root)) == 6


# --------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 1}, r"num_classes must be 2\.\.6"),
        ({"num_classes": 7}, r"num_classes must be 2\.\.6"),
        ({"image_size": 15}, r"image_size must be >= 16"),
        ({"image_size": 32.5}, r"image_size must be an integer"),
        ({"seed": -1}, r"seed must be >= 0"),
        ({"num_images": 0}, r"num_images must be >= 1"),
        ({"num_images": True}, r"num_images must be an integer"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "ds", **kwargs)
    with pytest.raises(ValueError, match=message):
        synthetic_root(cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"index": -1}, r"index must be >= 0"),
        ({"index": 0, "num_classes": 9}, r"num_classes must be 2\.\.6"),
        ({"index": 0, "image_size": 8}, r"image_size must be >= 16"),
        ({"index": 0, "seed": -5}, r"seed must be >= 0"),
    ],
)
def test_render_sample_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_sample(**kwargs)
