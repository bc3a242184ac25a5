"""Data sets: any ImageFolder, the paper's (ImageNet val, Chest X-Ray, Intel), the embedded synthetic set."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError
from ..runtime import distributed
from . import photos, synthetic  # noqa: F401  (register "photos" and "synthetic" in DATASETS)
from .base import DataSet
from .config import DataConfig, data_set, list_data_sets
from .folder import ImageFolderDataset, ScanReport, collate_skip, eval_transform, scan_folder, train_transform
from .splits import load_split, save_split, split_groups, split_indices


class SplitView(Dataset):
    """A subset of an :class:`ImageFolderDataset` read through its own transform."""

    def __init__(self, base: ImageFolderDataset, indices: Sequence[int], transform: Callable) -> None:
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = self.base.load_image(self.indices[i])
        if img is None:
            return None
        return self.transform(img), self.base.targets[self.indices[i]]

    def path(self, i: int) -> str:
        return self.base.samples[self.indices[i]][0]


@dataclass
class DataSplits:
    """The train and test subsets of one data set, and how they were drawn."""

    train: SplitView
    test: SplitView
    classes: List[str]
    root: str
    split: Dict[str, object]
    report: ScanReport

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def data_root(cfg: DataConfig, *, progress: bool = False) -> str:
    """The folder of images for ``cfg``: ``data.root``, or the one the data set makes on first use (the
    synthetic set generates its images into the cache)."""
    return data_set(cfg.name).root(cfg, progress=progress)


def load_splits(cfg: DataConfig, *, augment_train: bool = False, progress: bool = False) -> DataSplits:
    """Scan the data folder and draw the seeded train/test subsets (by default the paper's random 20%)."""
    spec = data_set(cfg.name)
    root = spec.root(cfg, progress=progress)
    base = ImageFolderDataset(root, image_size=cfg.image_size, classes=spec.classes)
    present = [c for c, n in base.report.per_class.items() if n]
    if len(present) < MIN_CLASSES:
        raise DataError(
            f"the data in {root!r} has images of {len(present)} class ({', '.join(present)}): a classifier "
            f"and an attack on it need at least {MIN_CLASSES} classes, one subfolder each (e.g. "
            "root/cat/1.jpg, root/dog/2.jpg)"
        )
    train_idx, test_idx = spec.split(cfg, [path for path, _ in base.samples])  # photos: by source photo
    split = {
        "root": root,
        "num_samples": len(base),
        "seed": cfg.split_seed,
        "fractions": [cfg.train_fraction, cfg.test_fraction],
        "train": train_idx,
        "test": test_idx,
    }
    tt = train_transform(cfg.image_size) if augment_train else eval_transform(cfg.image_size)
    return DataSplits(
        train=SplitView(base, train_idx, tt),
        test=SplitView(base, test_idx, eval_transform(cfg.image_size)),
        classes=base.classes,
        root=root,
        split=split,
        report=base.report,
    )


MIN_CLASSES = 2  # one class: nothing to classify, and every accuracy or fooling ratio is trivial


def class_counts(ds: Dataset, classes: Sequence[str]) -> Dict[str, int]:
    """Images per class of a :class:`SplitView` or an :class:`ImageFolderDataset` (through any Subset)."""
    indices: Sequence[int] = range(len(ds))
    while isinstance(ds, Subset):  # Subset(Subset(view, a), b): indices into the view below
        indices = [ds.indices[i] for i in indices]
        ds = ds.dataset
    if isinstance(ds, SplitView):
        targets = [ds.base.targets[ds.indices[i]] for i in indices]
    elif isinstance(ds, ImageFolderDataset):
        targets = [ds.targets[i] for i in indices]
    else:
        raise TypeError(f"cannot count the classes of a {type(ds).__name__}")
    counts = dict.fromkeys(classes, 0)
    for t in targets:
        counts[classes[t]] += 1
    return counts


def require_classes(ds: Dataset, classes: Sequence[str], what: str = "the train split") -> None:
    """Refuse training on a subset that holds images of fewer than :data:`MIN_CLASSES` classes."""
    present = [c for c, n in class_counts(ds, classes).items() if n]
    if len(present) < MIN_CLASSES:
        raise DataError(
            f"{what} holds images of {len(present)} class ({', '.join(present) or 'none'}) of "
            f"{len(classes)}: training needs at least {MIN_CLASSES}; use more images or a larger "
            "data.train_fraction"
        )


def data_summary(splits: DataSplits, **views: Dataset) -> Dict[str, object]:
    """For metrics.json: images per class in the data and in each view (``train=..., test=...``), and the
    files the scan skipped (not images, or unreadable)."""
    out: Dict[str, object] = {
        "images": splits.report.kept,
        "per_class": dict(splits.report.per_class),
        "skipped_files": splits.report.skipped,
        "skipped_examples": list(splits.report.skipped_examples),
    }
    for name, ds in views.items():
        if ds is not None:
            out[f"{name}_images"] = len(ds)
            out[f"{name}_per_class"] = class_counts(ds, splits.classes)
    return out


class CountSkipped:
    """Iterate a loader of ``(x, y, n_skipped)`` batches and add up ``n_skipped`` (images dropped because
    they could not be decoded) in ``.skipped``."""

    def __init__(self, loader) -> None:
        self.loader, self.skipped = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.skipped += int(batch[2])
            yield batch


def drop_last_for(n_images: int, batch_size: int) -> bool:
    """Whether a training loader should drop its last, partial batch: only when ``n_images`` holds more
    than one batch, so that no step sees a lone leftover image and a small split still trains (one batch
    of all its images per epoch) instead of yielding no batch at all."""
    return n_images > batch_size


def make_loader(
    ds: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A loader whose batches are ``(x, y, n_skipped)`` (unreadable images dropped and counted).

    With a CUDA GPU the batches come in pinned memory, so copies to the GPU can overlap compute
    (``data.num_workers`` decodes in parallel); without one, plain memory.
    """
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skip,
        generator=g,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


__all__ = [
    "MIN_CLASSES",
    "CountSkipped",
    "DataSplits",
    "ImageFolderDataset",
    "DataSet",
    "SplitView",
    "collate_skip",
    "data_root",
    "data_set",
    "list_data_sets",
    "eval_transform",
    "class_counts",
    "data_summary",
    "load_split",
    "load_splits",
    "make_loader",
    "save_split",
    "require_classes",
    "scan_folder",
    "split_groups",
    "split_indices",
    "train_transform",
]


class InMemoryLoader:
    """Batches ``(x, y, 0)`` from tensors held in memory, with the paper's augmentation done per batch.

    For small data sets (the embedded one): decoding every image once instead of every epoch, and a
    batched random crop (reflect-padded by 1/8) + horizontal flip instead of per-image PIL transforms.

    With ``shard=True`` under torchrun (:mod:`~juap.runtime.distributed`) every rank draws the same batch
    (order and augmentation from the shared ``seed``) and yields only its contiguous slice of it, so W
    processes see exactly the batches one process sees, split W ways; ``len()`` stays the number of
    global batches. Alone (one process) ``shard`` changes nothing.
    """

    def __init__(
        self,
        x,
        y,
        *,
        batch_size: int,
        shuffle: bool = True,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        shard: bool = False,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.shard = shard
        self.generator = torch.Generator().manual_seed(seed)
        self.dataset = x  # len(loader.dataset) is the number of images, as for a DataLoader

    def sharded(self) -> InMemoryLoader:
        """This loader for one torchrun rank (``shard=True``); it shares the generator, so the global batch
        order and augmentation are drawn as in one process
        (:func:`~juap.runtime.distributed.shard_train_loader`)."""
        out = copy.copy(self)
        out.shard = True
        return out

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.augment:  # drawn for the whole global batch: the generator advances alike on every rank
                pad = max(1, self.x.shape[-2] // 8)
                dy, dx = torch.randint(0, 2 * pad + 1, (2, len(idx)), generator=self.generator)
                flip = torch.rand(len(idx), generator=self.generator) < 0.5
            if self.shard and distributed.world_size() > 1:  # this rank's contiguous slice
                lo, hi = distributed.slice_bounds(len(idx))
                idx = idx[lo:hi]
                if self.augment:
                    dy, dx, flip = dy[lo:hi], dx[lo:hi], flip[lo:hi]
            x, y = self.x[idx], self.y[idx]
            if self.augment:
                h, w = x.shape[-2:]
                xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
                rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(
                    -1, x.shape[1], -1, w + 2 * pad
                )
                x = xp.gather(2, rows)
                cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(-1, x.shape[1], h, -1)
                x = x.gather(3, cols)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x, y, 0


def to_tensors(ds, *, batch_size: int = 256):
    """Decode a whole (small) data set once: ``(x (N, 3, H, W), y (N,), n_skipped)``."""
    xs, ys, skipped = [], [], 0
    for x, y, s in make_loader(ds, batch_size=batch_size):
        xs.append(x)
        ys.append(y)
        skipped += s
    return torch.cat(xs), torch.cat(ys), skipped
