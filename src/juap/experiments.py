"""From configs to objects and run folders: the layer between the CLI and the library."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from .classifiers import Classifier, create_classifier, load_classifier, save_classifier
from .config import ClassifierConfig, TrainClassifierConfig, to_dict
from .data import DataSplits, load_splits, make_loader, save_split
from .data.synthetic import default_cache_dir
from .io import write_json
from .runs import finish_run
from .training import evaluate_accuracy, resolve_device, train_classifier

log = logging.getLogger(__name__)


def build_classifier(cfg: ClassifierConfig, *, num_classes: int | None = None) -> Classifier:
    """The classifier a config names; ``num_classes`` (from the data) fills in when the config has none."""
    n = cfg.num_classes if cfg.num_classes is not None else num_classes
    if (
        cfg.weights
        and Path(cfg.weights).suffix == ".safetensors"
        and cfg.num_classes is None
        and not cfg.reset_head
    ):
        return load_classifier(cfg.weights, name=cfg.name, **cfg.options)
    return create_classifier(
        cfg.name, num_classes=n, weights=cfg.weights, reset_head=cfg.reset_head, **cfg.options
    )


def run_train_classifier(
    cfg: TrainClassifierConfig, run_dir: Path, *, progress: bool = True
) -> Dict[str, Any]:
    """``juap train-classifier``: train on the train split, report top-1 on the test split, save all."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data, augment_train=True, progress=progress)
    save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    if clf.num_classes != splits.num_classes:
        from .errors import ConfigError

        raise ConfigError(
            f"the classifier has {clf.num_classes} classes but the data has {splits.num_classes} "
            f"({splits.classes}); set classifier.num_classes={splits.num_classes} and "
            "classifier.reset_head=true to fine-tune a new head"
        )
    metrics = _train_and_measure(clf, splits, cfg, device=device, progress=progress)
    save_classifier(clf, run_dir / "classifier.safetensors", classes=splits.classes)
    metrics.update(
        classifier=cfg.classifier.name, classes=splits.classes, data=cfg.data.name, data_root=splits.root
    )
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def _train_and_measure(
    clf: Classifier, splits: DataSplits, cfg: TrainClassifierConfig, *, device: torch.device, progress: bool
) -> Dict[str, Any]:
    train_loader = make_loader(
        splits.train,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        drop_last=True,
    )
    test_loader = make_loader(splits.test, batch_size=256, num_workers=cfg.data.num_workers)
    return train_classifier(clf, train_loader, test_loader, cfg.train, device=device, progress=progress)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_demo_classifier(
    cfg: TrainClassifierConfig, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Tuple[Classifier, DataSplits, Dict[str, Any], bool]:
    """Train the demo classifier once per config and reuse it from the cache afterwards.

    Returns:
        (classifier, splits, metrics, was_cached).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = config_hash(to_dict(cfg))
    ckpt = cache / "demo" / f"classifier-{cfg.classifier.name}-{key}.safetensors"
    meta_path = ckpt.with_suffix(".json")
    splits = load_splits(cfg.data, augment_train=True, progress=progress)
    if ckpt.is_file() and meta_path.is_file():
        return load_classifier(ckpt), splits, json.loads(meta_path.read_text()), True
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    t0 = time.perf_counter()
    metrics = _train_and_measure(clf, splits, cfg, device=device, progress=progress)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
    clf.cpu()
    save_classifier(clf, ckpt, classes=splits.classes)
    write_json(meta_path, metrics)
    return clf, splits, metrics, False


def demo_accuracy(clf: Classifier, splits: DataSplits) -> Dict[str, Any]:
    return evaluate_accuracy(clf, make_loader(splits.test, batch_size=256), device=torch.device("cpu"))
