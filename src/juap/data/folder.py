"""ImageFolder-style data: class subfolders of images, read as RGB tensors in [0, 1].

Unreadable and non-image files are skipped with a warning and a count; an empty folder or one
without class subfolders is refused with a :class:`~juap.errors.DataError`.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .._registry import DATASETS
from ..errors import DataError
from .base import DataSet
from .decode import decode_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Split folders some public data sets ship with (Kermany's chest X-ray, Intel's seg_train/seg_test).
SPLIT_DIRS = ("train", "test", "val", "seg_train", "seg_test")


@dataclass(frozen=True)
class ScanReport:
    """What a folder scan kept (per class) and skipped."""

    kept: int
    skipped: int
    skipped_examples: Tuple[str, ...]
    per_class: Dict[str, int] = field(default_factory=dict)


def find_class_dirs(root: Path) -> List[Path]:
    """The class folders under ``root``; split folders (train/, test/, seg_train/seg_train/) are merged."""
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_DIRS]
    if split_dirs and len(split_dirs) == len(subdirs):
        out: List[Path] = []
        for s in split_dirs:
            inner = s / s.name if (s / s.name).is_dir() else s  # Intel: seg_train/seg_train/<class>
            out.extend(sorted(p for p in inner.iterdir() if p.is_dir() and not p.name.startswith(".")))
        return out
    return subdirs


def scan_folder(root: str | os.PathLike, *, classes: Sequence[str] | None = None):
    """List ``(path, class_index)`` samples of an ImageFolder tree, skipping non-image files.

    Args:
        root: a folder with one subfolder per class (or split folders holding them).
        classes: expected class names (e.g. ``("NORMAL", "PNEUMONIA")``); a mismatch is an error.

    Returns:
        (samples, class_names, report).
    """
    root = Path(root)
    class_dirs = find_class_dirs(root)
    if not class_dirs:
        has_files = any(p.is_file() for p in root.iterdir())
        why = "it holds files but no class subfolders" if has_files else "it is empty"
        raise DataError(
            f"data folder {str(root)!r} cannot be used: {why}. Expected one subfolder per class, "
            "e.g. root/cat/001.jpg, root/dog/002.jpg"
        )
    names = sorted({d.name for d in class_dirs})
    if classes is not None and set(classes) != set(names):
        raise DataError(f"data folder {str(root)!r} has classes {names}, expected {sorted(classes)}")
    index = {n: i for i, n in enumerate(names)}
    samples: List[Tuple[str, int]] = []
    skipped: List[str] = []
    for d in class_dirs:
        for p in sorted(d.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS and _header_ok(p):
                samples.append((str(p), index[d.name]))
            else:
                skipped.append(str(p))
    if not samples:
        raise DataError(f"data folder {str(root)!r} has class subfolders {names} but no readable images")
    per_class = dict.fromkeys(names, 0)
    for _, c in samples:
        per_class[names[c]] += 1
    report = ScanReport(
        kept=len(samples), skipped=len(skipped), skipped_examples=tuple(skipped[:5]), per_class=per_class
    )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable or non-image files in {root} (e.g. {skipped[0]})",
            stacklevel=2,
        )
    return samples, names, report


def _header_ok(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def eval_transform(image_size: int) -> Callable:
    """Resize the shorter side to ``image_size`` and centre-crop a square; float tensor in [0, 1]."""
    from torchvision.transforms import v2 as T  # here: importing torchvision costs seconds

    return T.Compose(
        [
            T.ToImage(),
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


def train_transform(image_size: int) -> Callable:
    """The paper's augmentation: random crop (padded by 1/8) and horizontal flip, after the eval resize."""
    from torchvision.transforms import v2 as T

    pad = max(1, image_size // 8)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.RandomCrop(image_size, padding=pad, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )


class ImageFolderDataset(Dataset):
    """Images of an ImageFolder tree as ``(image (3, S, S) in [0, 1], label)``.

    Every PIL mode is decoded to RGB in [0, 1] by its own range (8- and 16-bit grayscale, 32-bit integer
    and float, palette, CMYK, alpha dropped; :mod:`juap.data.decode`). An image that cannot be decoded at
    load time (e.g. truncated, or a float image outside [0, 1]) yields ``None``; :func:`collate_skip`
    drops it and counts it.

    Args:
        root: the data folder.
        image_size: side of the square output.
        transform: PIL -> tensor transform; defaults to :func:`eval_transform`.
        classes: expected class names, checked against the folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int = 224,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if image_size < 8:
            raise DataError(f"image_size must be at least 8, got {image_size}")
        self.root = Path(root)
        self.samples, self.classes, self.report = scan_folder(self.root, classes=classes)
        self.targets = [c for _, c in self.samples]
        self.image_size = image_size
        self.transform = transform or eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Image.Image | torch.Tensor | None:
        """Image ``i`` as RGB in [0, 1] (:func:`~juap.data.decode.decode_rgb`), or None if unreadable."""
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                return decode_rgb(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # DataError too
            warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None

    def __getitem__(self, i: int):
        img = self.load_image(i)
        if img is None:
            return None
        return self.transform(img), self.targets[i]


def collate_skip(batch):
    """Default collate that drops ``None`` samples (unreadable images). Returns ``(x, y, n_skipped)``."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    xs, ys = zip(*kept, strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long), skipped


# -- the named folder data sets: data.root is their folder; the paper's must have their class folders --
@DATASETS.register("folder")
class Folder(DataSet):
    """Any ImageFolder: one subfolder of images per class, in ``data.root``."""


@DATASETS.register("imagenet")
class ImageNet(DataSet):
    """ImageNet's validation images in one folder per synset (whatever its 1000 synsets are)."""


@DATASETS.register("chestxray")
class ChestXRay(DataSet):
    """Chest X-Ray (Kermany et al.): NORMAL and PNEUMONIA."""

    classes = ("NORMAL", "PNEUMONIA")


@DATASETS.register("intel")
class Intel(DataSet):
    """Intel Image Classification: six scene classes."""

    classes = ("buildings", "forest", "glacier", "mountain", "sea", "street")
