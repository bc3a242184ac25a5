"""`juap train-classifier`: fine-tune or train a classifier and write its run folder.

The command's config (its YAML sections), the run folder, and the call into the core: the training itself
is :mod:`juap.classifiers.training`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..app.history import RunLog
from ..app.runs import finish_run
from ..classifiers import Classifier, save_classifier, training
from ..data import DataSplits, data_summary, load_splits, require_classes, save_split
from ..errors import ConfigError
from ..runtime import distributed
from ..runtime.config import to_dict
from ..runtime.distributed import resolve_device
from ..runtime.loop import Checkpointing
from .build import build_classifier
from .configs import ClassifierConfig, DataConfig, LogConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainClassifierConfig:
    """``juap train-classifier``: the data, the classifier to train, its training, the log."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"


def run_train_classifier(
    cfg: TrainClassifierConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: Optional[int] = None,
) -> Dict[str, Any]:
    """``juap train-classifier``: train on the train split, report top-1 on the test split, save all.

    Training checkpoints into ``run_dir`` every ``checkpoint_every`` steps; ``resume`` continues from there.
    Under torchrun it trains data-parallel (:mod:`juap.classifiers.training`); rank 0 writes.
    """
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    device = distributed.device_for_rank(resolve_device(cfg.device))
    with distributed.main_first():  # under torchrun, rank 0 fills the data cache, then the others read it
        splits = load_splits(cfg.data, augment_train=True, progress=progress)
    require_classes(splits.train, splits.classes)
    if distributed.is_main():
        save_split(run_dir / "split.json", splits.split)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    if clf.num_classes != splits.num_classes:
        raise ConfigError(
            f"the classifier has {clf.num_classes} classes but the data has {splits.num_classes} "
            f"({splits.classes}); set classifier.num_classes={splits.num_classes} and "
            "classifier.reset_head=true to fine-tune a new head"
        )
    checkpoint = Checkpointing(run_dir, checkpoint_every, resume)
    log = RunLog(
        run_dir, tensorboard=cfg.log.tensorboard, title=f"juap train-classifier {cfg.classifier.name}"
    )
    metrics = train_on_splits(
        clf, splits, cfg, device=device, progress=progress, checkpoint=checkpoint, log=log
    )
    if distributed.is_main():
        log.finish()
        save_classifier(clf, run_dir / "classifier.safetensors", classes=splits.classes)
    metrics.update(
        classifier=cfg.classifier.name, classes=splits.classes, data=cfg.data.name, data_root=splits.root
    )
    metrics["data_summary"] = data_summary(splits, train=splits.train, test=splits.test)
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def train_on_splits(
    clf: Classifier,
    splits: DataSplits,
    cfg: TrainClassifierConfig,
    *,
    device: torch.device,
    progress: bool,
    checkpoint: Optional[Checkpointing] = None,
    log: Any = None,
) -> Dict[str, Any]:
    """:func:`juap.classifiers.training.train_on_splits` with the settings of ``cfg``'s sections (``data``,
    ``train``, ``seed``); ``juap train-classifier`` and the demo's cached classifier
    (:mod:`juap.commands.demo_models`) both train through here."""
    return training.train_on_splits(
        clf,
        splits,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        in_memory=cfg.data.decode_once,
        device=device,
        progress=progress,
        checkpoint=checkpoint,
        log=log,
        **trainer_settings(cfg.train),
    )


def train_classifier(
    clf: Classifier, train_loader: Any, test_loader: Any, cfg: TrainConfig, **options: Any
) -> Dict[str, Any]:
    """:func:`juap.classifiers.training.train_classifier` with the settings of a ``train`` section."""
    return training.train_classifier(clf, train_loader, test_loader, **options, **trainer_settings(cfg))


def trainer_settings(train: TrainConfig) -> Dict[str, Any]:
    """The ``train`` section as :class:`~juap.classifiers.training.ClassifierTrainer`'s keyword settings
    (the batch size goes to the loader)."""
    return {k: v for k, v in to_dict(train).items() if k != "batch_size"}
