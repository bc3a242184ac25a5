"""`juap train-classifier`: fine-tune or train a classifier and write its run folder."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..app.history import RunLog
from ..app.runs import finish_run
from ..classifiers import Classifier, save_classifier
from ..data import (
    DataSplits,
    InMemoryLoader,
    SplitView,
    data_summary,
    drop_last_for,
    eval_transform,
    load_splits,
    make_loader,
    require_classes,
    save_split,
    to_tensors,
)
from ..errors import CheckpointError, ConfigError, NumericalError
from ..evaluation import evaluate_accuracy
from ..runtime import distributed
from ..runtime.config import to_dict
from ..runtime.distributed import any_rank, resolve_device
from ..runtime.loop import (
    Checkpointing,
    EpochBatches,
    TrainLoop,
    broadcast_buffers,
    restore_batchnorm,
    run_epochs,
    to_sync_batchnorm,
)
from .build import build_classifier
from .configs import ClassifierConfig, DataConfig, LogConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainClassifierConfig:
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
    Under torchrun it trains data-parallel (:func:`train_classifier`); rank 0 writes.
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
    """Train ``clf`` in place on ``splits.train`` as ``cfg`` says and measure it on ``splits.test``.

    Builds the loaders (whole batches only; the synthetic set decoded once and augmented on tensors)
    and runs :func:`train_classifier`; ``juap train-classifier`` and the demo's cached classifier
    (:mod:`juap.commands.demo_models`) both train through here.

    Args:
        clf: the classifier, built for ``splits.num_classes`` classes; trained in place.
        splits: the train and test splits (the train split with its augmentation).
        cfg: the data, training and seed settings.
        device: where to train.
        progress: show progress bars.
        checkpoint, log: as for :func:`train_classifier`.

    Returns:
        :func:`train_classifier`'s metrics.

    Raises:
        ConfigError: the training split has fewer than 2 images.
    """
    if distributed.world_size() > 1:  # the model is built: per-rank RNG from here (augmentation, dropout)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    train_loader = _train_loader(splits, cfg)
    test_loader = make_loader(splits.test, batch_size=256, num_workers=cfg.data.num_workers)
    return train_classifier(
        clf,
        train_loader,
        test_loader,
        cfg.train,
        device=device,
        progress=progress,
        checkpoint=checkpoint,
        log=log,
    )


def _train_loader(splits: DataSplits, cfg: TrainClassifierConfig) -> InMemoryLoader | DataLoader:
    """Augmented training batches ``(x, y, n_skipped)`` of ``splits.train``: whole batches only (no
    BatchNorm step on a lone last image), unless the split is one batch or less: then every epoch is that
    one smaller batch, never zero steps. The synthetic set (or ``data.in_memory``) is decoded once and
    augmented per batch (random crop + flip) on tensors."""
    n_train, batch = len(splits.train), cfg.train.batch_size
    if n_train < 2:
        raise ConfigError(
            f"the training split has {n_train} image(s); training a classifier needs at least 2: add images "
            "or raise data.train_fraction"
        )
    drop_last = drop_last_for(n_train, batch)
    if n_train < batch:
        warnings.warn(
            f"the training split has {n_train} images, fewer than one batch of train.batch_size={batch}: "
            f"each epoch is one step on all {n_train} (set train.batch_size={n_train} to silence this)",
            stacklevel=3,
        )
    in_memory = cfg.data.decode_once
    if in_memory:
        plain = SplitView(splits.train.base, splits.train.indices, eval_transform(cfg.data.image_size))
        x, y, _ = to_tensors(plain)
        return InMemoryLoader(x, y, batch_size=batch, augment=True, seed=cfg.seed, drop_last=drop_last)
    return make_loader(
        splits.train,
        batch_size=batch,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        drop_last=drop_last,
    )


def _load_training_state(state: Dict, clf: Classifier, opt, sched) -> None:
    """Load a train-classifier checkpoint; one of another architecture or class count is refused."""
    if state.get("arch") != clf.arch or state.get("num_classes") != clf.num_classes:
        raise CheckpointError(
            f"the checkpoint is of classifier {state.get('arch')!r} with {state.get('num_classes')} classes, "
            f"not {clf.arch!r} with {clf.num_classes}: resume with the same config, or start a new run"
        )
    try:
        clf.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"the checkpoint does not fit this classifier: {e}") from None


class _ClassifierTrainer:
    """``train-classifier`` for the loop engine: SGD with Nesterov momentum on a one-cycle schedule."""

    def __init__(self, clf: Classifier, loader, cfg: TrainConfig, device: torch.device) -> None:
        self.clf, self.cfg, self.device = clf, cfg, device
        decay = [p for p in clf.parameters() if p.ndim > 1]  # no weight decay on biases and BatchNorm
        other = [p for p in clf.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        self.opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        total = cfg.epochs * max(1, len(loader))
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15
        )
        self.batches = EpochBatches(loader, cfg.epochs, on_epoch=self._new_epoch)
        # running counts: the accuracy is the last epoch's; seconds survive a resume
        self.c = {"correct": 0, "seen": 0, "skipped": 0, "seconds": 0.0}

    def _new_epoch(self, epoch: int) -> None:
        self.c.update(correct=0, seen=0)
        self.clf.train()

    def begin(self, loop: TrainLoop) -> None:
        self.loop = loop
        self.model = distributed.wrap_ddp(self.clf)  # broadcasts rank 0's parameters and buffers
        self.t0 = time.perf_counter() - self.c["seconds"]

    def snapshot(self) -> Dict[str, Any]:
        return {
            **self.c,
            "arch": self.clf.arch,
            "num_classes": self.clf.num_classes,
            "model": self.clf.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "data": self.batches.position(),
        }

    def restore(self, state: Dict[str, Any]) -> None:
        _load_training_state(state, self.clf, self.opt, self.sched)

    def load(self, state: Dict[str, Any]) -> None:
        self.restore(state)
        self.c.update({k: state[k] for k in self.c})
        self.batches.restore(state["data"])

    def step(self, i: int) -> Optional[Dict[str, float]]:
        item = self.batches.next()
        if item is None:  # no (more) batches: a train split smaller than one batch
            self.loop.finished = True
            return None
        epoch, (x, y, n_skip) = item
        self.c["skipped"] += n_skip
        self.c["seconds"] = time.perf_counter() - self.t0
        if any_rank(len(y) == 0):  # under torchrun all ranks skip alike
            self.sched.step()
            return None
        x, y = x.to(self.device), y.to(self.device)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        if any_rank(not bool(torch.isfinite(loss))):
            raise NumericalError(f"train-classifier: the loss became {loss.item()}")
        lr = self.opt.param_groups[0]["lr"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.c["correct"] += int((logits.argmax(1) == y).sum())
        self.c["seen"] += len(y)
        accuracy = self.c["correct"] / max(self.c["seen"], 1)
        return {"epoch": epoch + 1, "loss": loss.item(), "accuracy": accuracy, "lr": lr}


def train_classifier(
    clf: Classifier,
    train_loader: DataLoader,
    test_loader: DataLoader | None,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    checkpoint: Optional[Checkpointing] = None,
    log: Any = None,
) -> Dict:
    """Train ``clf`` in place with SGD (Nesterov momentum, cosine schedule), then measure test accuracy.

    Args:
        clf: the classifier (its own normalisation inside); trained in place.
        train_loader: augmented training batches ``(x, y, n_skipped)``.
        test_loader: held-out batches for the final top-1 accuracy (Table I), or None.
        cfg: epochs, batch size, learning rate and regularisation.
        checkpoint: where and how often (default: every epoch or 200 steps, whichever is sooner) to save
            the weights, optimiser, schedule, data position and RNG states, and whether to resume (the
            same result as one run); NaN/Inf losses are rolled back to the last good state with the lr
            halved, up to ``checkpoint.max_rollbacks`` times.
        log: receives one history row per step (loss, running accuracy, lr), e.g. a
            :class:`~juap.app.history.RunLog`.

    Under torchrun (:mod:`juap.runtime.distributed`) the model trains as DistributedDataParallel, each rank on
    its share of every global batch of ``cfg.batch_size`` images (:func:`shard_train_loader`; the batch
    size must divide by the number of processes); the schedule counts global steps, the accuracies are
    sums and counts added over the ranks, rank 0 alone writes checkpoints and shows progress, and every
    rank reads the checkpoint on resume (with the same number of processes). See the note on BatchNorm
    at the top of this module.

    Returns:
        Metrics: ``test_accuracy``, ``train_accuracy`` (last epoch, on augmented data), timings, counts.
    """

    progress = progress and distributed.is_main()
    clf.to(device).train()
    swapped = to_sync_batchnorm(clf, device)
    trainer = run_epochs(
        "train-classifier",
        lambda loader: _ClassifierTrainer(clf, loader, cfg, device),
        train_loader,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        checkpoint=checkpoint,
        per_rank=("correct", "seen", "skipped", "data", "rng"),
        log=log,
        progress=progress,
    )
    restore_batchnorm(swapped)
    broadcast_buffers(clf)  # under torchrun: rank 0's BatchNorm statistics everywhere
    sums = distributed.all_reduce_sums({k: trainer.c[k] for k in ("correct", "seen", "skipped")})  # ranks
    metrics: Dict = {
        "train_accuracy": sums["correct"] / max(sums["seen"], 1),
        "train_seconds": round(time.perf_counter() - trainer.t0, 2),
        "epochs": cfg.epochs,
        "train_images": len(train_loader.dataset),
        "skipped_images": int(sums["skipped"]),
    }
    if test_loader is not None:
        ev = evaluate_accuracy(clf, test_loader, device=device, progress=progress)
        metrics.update(
            test_accuracy=ev["accuracy"],
            test_images=ev["total"],
            skipped_images=metrics["skipped_images"] + ev["skipped"],
        )
    clf.eval()
    return metrics
