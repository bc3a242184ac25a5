"""Real photos the project can build offline: every photo shipped inside the installed packages, in crops.

Twenty source photos ship inside scikit-image, scikit-learn and matplotlib. Each is cut into square crops
at four scales (1, 3/4, 1/2 and 0.35 of its shorter side; at each scale a grid of positions half a
crop apart), each crop resized to 224x224. The train/test split is **by source photo**: no photo has a
crop on both sides (the two views of the stereo motorcycle count as one photo and stay together).

============================ ============ ===== ============================================================
photo                        package      split provenance and licence
============================ ============ ===== ============================================================
astronaut (Eileen Collins)   scikit-image train NASA Great Images; public domain
motorcycle (left + right)    scikit-image train Middlebury stereo 2014 (Scharstein et al.); research data,
                                                redistributed by scikit-image, no licence stated
flower                       scikit-learn train Flickr, vultilion; CC BY 2.0
moon                         scikit-image train shipped by scikit-image, no restrictions stated
brick                        scikit-image train CC0Textures; CC0
grass                        scikit-image train DeviantArt, linolafett; CC0
clock                        scikit-image train Stefan van der Walt; public domain
text                         scikit-image train Wikipedia File:Corner.png; public domain
cell                         scikit-image train Schürmann et al.; CC0
retina                       scikit-image train Wikimedia Commons, fundus photograph; CC0
chelsea (the cat)            scikit-image test  Stefan van der Walt; CC0
coffee                       scikit-image test  Rachel Michetti (Pikolo Espresso Bar); CC0
rocket (DSCOVR, Falcon 9)    scikit-image test  SpaceX; public domain
china (Summer Palace)        scikit-learn test  Flickr, danielbuechele; CC BY 2.0
grace_hopper                 matplotlib   test  U.S. Navy photograph; public domain
camera (cameraman)           scikit-image test  Lav Varshney; CC0
coins (Greek coins)          scikit-image test  Brooklyn Museum; no known copyright restrictions
gravel                       scikit-image test  CC0Textures; CC0
hubble_deep_field            scikit-image test  NASA / hubblesite.org; public domain
immunohistochemistry         scikit-image test  no known copyright restrictions
============================ ============ ===== ============================================================

Left out: scikit-image's ``cat`` (the same file as chelsea), ``horse``, ``logo``, ``colorwheel`` (not
photos), ``page`` (a scan), ``microaneurysms`` (102x102), ``lfw_subset`` (25x25 faces) and the images
it must download (``lily``, ``eagle``, ...); matplotlib's other sample files (data, not photos). Debian's
``opencv-doc`` has sample photos too but is not a Python package, so it is not used.

Size: 10 training photos (11 files: the motorcycle's two views) give 539 crops and 10 test photos give
533 crops; 1072 in all
(:func:`photo_crops` lists them without writing anything).

Labels: the photos have no ImageNet labels, and attacks use the classifier's own benign prediction
(C_x = f(x)) anyway. :func:`photos_root` writes the crops into an ImageFolder of 1000 class folders
``000`` ... ``999`` (the ImageNet index, so folder order is class order), each crop in the folder of
EfficientNet-Lite0's top-1 class on it; a clean accuracy measured on this set is that model's agreement
with itself at another size, not an accuracy.

Use it in an experiment file with ``data: {name: photos}``: the crops are written once into the cache
(``$JUAP_CACHE``, default ``~/.cache/juap``, under ``photos/``) and ``load_splits`` takes the split by
photo instead of the random fractions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from .._registry import DATASETS
from ..errors import DataError
from .base import DataSet
from .synthetic import default_cache_dir

VERSION = 1
CROP_SIZE = 224
SCALES = (1.0, 0.75, 0.5, 0.35)
MIN_CROP = 64  # pixels of the source photo: smaller crops are left out
SEP = "__"  # file names: <photo>__s<scale>_<row>_<col>.png
CLASS_FOLDERS = tuple(f"{i:03d}" for i in range(1000))


@dataclasses.dataclass(frozen=True)
class Photo:
    """One source photo: its name, the package that ships it, its split and its provenance."""

    name: str
    package: str
    split: str
    licence: str
    load: Callable[[], List[np.ndarray]]  # one or more (H, W, 3) uint8 views of the same scene


def _skimage(name: str) -> Callable[[], List[np.ndarray]]:
    def load() -> List[np.ndarray]:
        import skimage.data

        if name == "motorcycle":
            left, right, _ = skimage.data.stereo_motorcycle()
            return [left, right]
        return [getattr(skimage.data, name)()]

    return load


def _sklearn(name: str) -> Callable[[], List[np.ndarray]]:
    def load() -> List[np.ndarray]:
        from sklearn.datasets import load_sample_image

        return [load_sample_image(f"{name}.jpg")]

    return load


def _grace_hopper() -> List[np.ndarray]:
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return [np.asarray(im.convert("RGB"))]


PHOTOS: Tuple[Photo, ...] = (
    Photo("astronaut", "scikit-image", "train", "NASA; public domain", _skimage("astronaut")),
    Photo("motorcycle", "scikit-image", "train", "Middlebury stereo 2014", _skimage("motorcycle")),
    Photo("flower", "scikit-learn", "train", "vultilion (Flickr); CC BY 2.0", _sklearn("flower")),
    Photo("moon", "scikit-image", "train", "scikit-image; none stated", _skimage("moon")),
    Photo("brick", "scikit-image", "train", "CC0Textures; CC0", _skimage("brick")),
    Photo("grass", "scikit-image", "train", "linolafett (DeviantArt); CC0", _skimage("grass")),
    Photo("clock", "scikit-image", "train", "Stefan van der Walt; public domain", _skimage("clock")),
    Photo("text", "scikit-image", "train", "Wikipedia; public domain", _skimage("text")),
    Photo("cell", "scikit-image", "train", "Schürmann et al.; CC0", _skimage("cell")),
    Photo("retina", "scikit-image", "train", "Wikimedia Commons; CC0", _skimage("retina")),
    Photo("chelsea", "scikit-image", "test", "Stefan van der Walt; CC0", _skimage("chelsea")),
    Photo("coffee", "scikit-image", "test", "Rachel Michetti; CC0", _skimage("coffee")),
    Photo("rocket", "scikit-image", "test", "SpaceX; public domain", _skimage("rocket")),
    Photo("china", "scikit-learn", "test", "danielbuechele (Flickr); CC BY 2.0", _sklearn("china")),
    Photo("grace_hopper", "matplotlib", "test", "U.S. Navy; public domain", _grace_hopper),
    Photo("camera", "scikit-image", "test", "Lav Varshney; CC0", _skimage("camera")),
    Photo("coins", "scikit-image", "test", "Brooklyn Museum; no known restrictions", _skimage("coins")),
    Photo("gravel", "scikit-image", "test", "CC0Textures; CC0", _skimage("gravel")),
    Photo("hubble_deep_field", "scikit-image", "test", "NASA; public domain", _skimage("hubble_deep_field")),
    Photo(
        "immunohistochemistry",
        "scikit-image",
        "test",
        "no known restrictions",
        _skimage("immunohistochemistry"),
    ),
)


def load_photo(photo: Photo) -> List[np.ndarray]:
    """The photo's views as (H, W, 3) uint8 arrays (grayscale photos repeated on 3 channels).

    Raises:
        DataError: the package that ships it is not installed.
    """
    try:
        views = photo.load()
    except ImportError:
        raise DataError(
            f"photo {photo.name!r} ships with {photo.package}, which is not installed: "
            "pip install 'juap[photos]'"
        ) from None
    out = []
    for v in views:
        v = np.asarray(v)
        if v.dtype != np.uint8:
            raise DataError(f"photo {photo.name!r} is {v.dtype}, not uint8")
        if v.ndim == 2:
            v = np.repeat(v[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(v[:, :, :3]))
    return out


def crop_boxes(height: int, width: int) -> List[Tuple[float, int, int, Tuple[int, int, int, int]]]:
    """The square crops of one photo: ``(scale, row, col, (x0, y0, x1, y1))`` at every scale of SCALES.

    Args:
        height, width: the photo's size in pixels.

    Returns:
        At each scale s a crop side c = round(s * min(height, width)) (at least MIN_CROP, else the scale
        is skipped), on a grid of positions about c/2 apart that spans the photo edge to edge.
    """
    out = []
    for s in SCALES:
        c = int(round(s * min(height, width)))
        if c < MIN_CROP:
            continue
        ny = math.ceil((height - c) / (c / 2)) + 1
        nx = math.ceil((width - c) / (c / 2)) + 1
        for r in range(ny):
            y0 = round(r * (height - c) / max(ny - 1, 1))
            for q in range(nx):
                x0 = round(q * (width - c) / max(nx - 1, 1))
                out.append((s, r, q, (x0, y0, x0 + c, y0 + c)))
    return out


def photo_crops(photos: Sequence[Photo] | None = None) -> List[Dict[str, object]]:
    """Every crop of every photo, as records (no image data): photo, view, split, scale, box, file name.

    Args:
        photos: the source photos (default: all of PHOTOS).

    Returns:
        One dict per crop, in a fixed order.
    """
    records = []
    for p in PHOTOS if photos is None else photos:
        for v, img in enumerate(load_photo(p)):
            h, w = img.shape[:2]
            for s, r, q, box in crop_boxes(h, w):
                records.append(
                    {
                        "photo": p.name,
                        "view": v,
                        "split": p.split,
                        "scale": s,
                        "box": list(box),
                        "file": f"{p.name}{SEP}v{v}_s{s:.2f}_{r}_{q}.png",
                    }
                )
    return records


def _crop_images(photo: Photo) -> List[Tuple[str, Image.Image]]:
    out = []
    for v, img in enumerate(load_photo(photo)):
        pil = Image.fromarray(img)
        for s, r, q, box in crop_boxes(*img.shape[:2]):
            crop = pil.crop(box).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
            out.append((f"{photo.name}{SEP}v{v}_s{s:.2f}_{r}_{q}.png", crop))
    return out


def label_crops(images: Sequence[Image.Image], *, batch_size: int = 32) -> List[int]:
    """EfficientNet-Lite0's top-1 ImageNet class of each 224x224 crop.

    Args:
        images: RGB PIL images of 224x224.
        batch_size: images per forward pass.

    Returns:
        One class index in 0..999 per image.
    """
    import torch

    from ..classifiers import create_classifier

    clf = create_classifier("efficientnet_lite0", weights="imagenet")
    labels: List[int] = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.stack(
                [
                    torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                    for im in images[i : i + batch_size]
                ]
            )
            labels += clf(x).argmax(1).tolist()
    return labels


def photos_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ImageFolder of the photo crops, written once into the cache (atomically) and reused.

    Args:
        cache_dir: the cache folder (default ``$JUAP_CACHE`` or ``~/.cache/juap``).

    Returns:
        ``<cache>/photos/v<VERSION>``, holding ``000`` ... ``999`` and ``meta.json`` (every crop's photo,
        split, scale, box and label, and the photos' provenance).
    """
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "photos" / f"v{VERSION}"
    if (root / "meta.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        crops = [c for p in PHOTOS for c in _crop_images(p)]
        labels = label_crops([im for _, im in crops])
        for d in CLASS_FOLDERS:
            (tmp / d).mkdir()
        by_name = {r["file"]: r for r in photo_crops(PHOTOS)}
        for (name, im), y in zip(crops, labels, strict=True):
            im.save(tmp / f"{y:03d}" / name)
            by_name[name]["label"] = y
        meta = {
            "version": VERSION,
            "crop_size": CROP_SIZE,
            "scales": list(SCALES),
            "photos": [
                {"name": p.name, "package": p.package, "split": p.split, "licence": p.licence} for p in PHOTOS
            ],
            "crops": list(by_name.values()),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(root)
        except OSError:  # another process finished first
            if not (root / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def photo_of(path: str | os.PathLike) -> str:
    """The source photo of a crop file (its name before ``__``)."""
    name = Path(path).name
    if SEP not in name:
        raise DataError(f"{path} is not a photo crop (expected <photo>{SEP}... in its name)")
    return name.split(SEP, 1)[0]


def split_by_photo(paths: Sequence[str]) -> Tuple[List[int], List[int]]:
    """Train and test indices of crop files, by their source photo's split in PHOTOS.

    Args:
        paths: the crop files, e.g. an ImageFolder's sample paths.

    Returns:
        (train indices, test indices), each sorted; no photo has crops in both.
    """
    split = {p.name: p.split for p in PHOTOS}
    train, test = [], []
    for i, path in enumerate(paths):
        name = photo_of(path)
        if name not in split:
            raise DataError(f"{path}: unknown source photo {name!r}")
        (train if split[name] == "train" else test).append(i)
    return train, test


@DATASETS.register("photos")
class Photos(DataSet):
    """The photo crops, written into the cache on first use (``data.root``, if given, is the cache folder),
    in the 1000 ImageNet class folders, split by source photo (``data.*_fraction`` unused)."""

    classes = CLASS_FOLDERS
    needs_root = False
    fixed_split = True

    @classmethod
    def root(cls, cfg, *, progress: bool = False) -> str:
        return str(photos_root(cfg.root or None))

    @classmethod
    def split(cls, cfg, paths: Sequence[str]) -> Tuple[List[int], List[int]]:
        return split_by_photo(paths)

    @classmethod
    def groups(cls, paths: Sequence[str]) -> List[str]:
        return [photo_of(p) for p in paths]  # crops of one photo are near copies: they stay together
