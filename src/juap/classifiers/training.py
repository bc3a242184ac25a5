"""Training a classifier (Table I): SGD with Nesterov momentum on a one-cycle schedule, in the loop engine.

:class:`ClassifierTrainer` is the classifier's :class:`~juap.runtime.loop.Trainer`; :func:`train_classifier`
trains a classifier in place on a loader and measures its top-1 accuracy on a test loader;
:func:`train_on_splits` builds those loaders from a data set's splits first (``juap train-classifier`` and
the demo's classifier train through it). The settings are keyword arguments; the YAML sections that give
them belong to the command (:mod:`juap.commands.train_classifier`).

Under torchrun (:mod:`juap.runtime.distributed`) the model trains as DistributedDataParallel, each rank on
its share of every global batch (:func:`~juap.runtime.distributed.shard_train_loader`; the batch size must
divide by the number of processes); the schedule counts global steps, the accuracies are sums and counts
added over the ranks, rank 0 alone writes checkpoints and shows progress, and every rank reads the
checkpoint on resume (with the same number of processes). On CUDA the BatchNorm layers train as
SyncBatchNorm; elsewhere each rank normalises with its own slice and rank 0's statistics are kept.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .._validate import check_range
from ..data import (
    DataSplits,
    InMemoryLoader,
    SplitView,
    drop_last_for,
    eval_transform,
    make_loader,
    to_tensors,
)
from ..errors import CheckpointError, ConfigError, NumericalError
from ..evaluation import evaluate_accuracy
from ..runtime import distributed
from ..runtime.distributed import any_rank
from ..runtime.loop import (
    Checkpointing,
    EpochBatches,
    Trainer,
    broadcast_buffers,
    restore_batchnorm,
    run_epochs,
    to_sync_batchnorm,
)
from .base import Classifier


class ClassifierTrainer(Trainer):
    """Train a classifier in place: SGD with Nesterov momentum (no weight decay on biases and BatchNorm)
    on a one-cycle schedule, cross-entropy with optional label smoothing.

    Args:
        classifier: the classifier (its own normalisation inside); trained in place.
        epochs: passes over the training data.
        lr: the one-cycle schedule's peak learning rate.
        momentum: SGD momentum (Nesterov when above 0).
        weight_decay: L2 weight decay on the weights (not on biases and BatchNorm).
        label_smoothing: cross-entropy label smoothing.
        device: where the batches go (default: the classifier's device).

    ``init(loader)`` takes batches ``(x (N, 3, H, W) in [0, 1], y (N,), n_skipped)``; ``result()`` gives
    ``train_accuracy`` (the last epoch's, on augmented data, summed over the ranks), ``train_seconds`` and
    ``skipped_images``.
    """

    per_rank = ("correct", "seen", "skipped", "data", "rng")

    def __init__(
        self,
        classifier: Classifier,
        *,
        epochs: int = 30,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        check_range("epochs", epochs, low=1)
        check_range("lr", lr, low=0, low_open=True)
        check_range("momentum", momentum, low=0, high=1)
        check_range("weight_decay", weight_decay, low=0)
        check_range("label_smoothing", label_smoothing, low=0, high=1)
        self.clf, self.epochs, self.lr, self.momentum = classifier, int(epochs), lr, momentum
        self.weight_decay, self.label_smoothing = weight_decay, label_smoothing
        self.device = device if device is not None else next(classifier.parameters()).device
        # running counts: the accuracy is the last epoch's; seconds survive a resume
        self.c = {"correct": 0, "seen": 0, "skipped": 0, "seconds": 0.0}
        self.per_epoch = 1
        self.done = False

    @property
    def num_steps(self) -> int:
        return self.epochs * self.per_epoch

    def init(self, data: Any, val_data: Any = None, *, progress: bool = True) -> None:
        clf = self.clf
        decay = [p for p in clf.parameters() if p.ndim > 1]  # no weight decay on biases and BatchNorm
        other = [p for p in clf.parameters() if p.ndim <= 1]
        wd = self.weight_decay
        groups = [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]
        nesterov = self.momentum > 0
        self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=nesterov)
        self.per_epoch = max(1, len(data))
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=self.lr, total_steps=self.num_steps, pct_start=0.15
        )
        self.batches = EpochBatches(data, self.epochs, on_epoch=self._new_epoch)

    def _new_epoch(self, epoch: int) -> None:
        self.c.update(correct=0, seen=0)
        self.clf.train()

    def begin(self) -> None:
        self.model = distributed.wrap_ddp(self.clf)  # broadcasts rank 0's parameters and buffers
        self.t0 = time.perf_counter() - self.c["seconds"]

    def state_dict(self) -> Dict[str, Any]:
        return {
            **self.c,
            "arch": self.clf.arch,
            "num_classes": self.clf.num_classes,
            "model": self.clf.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.position(),
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Load the weights, SGD and the schedule; a checkpoint of another architecture or class count is
        refused."""
        clf = self.clf
        if state.get("arch") != clf.arch or state.get("num_classes") != clf.num_classes:
            raise CheckpointError(
                f"the checkpoint is of classifier {state.get('arch')!r} with {state.get('num_classes')} "
                f"classes, not {clf.arch!r} with {clf.num_classes}: resume with the same config, or start a "
                "new run"
            )
        try:
            clf.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"the checkpoint does not fit this classifier: {e}") from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.restore_state(state)
        self.c.update({k: state[k] for k in self.c})
        self.batches.restore(state["data"])

    def converged(self) -> bool:
        return self.done  # the data is used up (a train split smaller than one batch)

    def step(self, i: int) -> Optional[Dict[str, float]]:
        item = self.batches.next()
        if item is None:  # no (more) batches: a train split smaller than one batch
            self.done = True
            return None
        epoch, (x, y, n_skip) = item
        self.c["skipped"] += n_skip
        self.c["seconds"] = time.perf_counter() - self.t0
        if any_rank(len(y) == 0):  # under torchrun all ranks skip alike
            self.scheduler.step()
            return None
        x, y = x.to(self.device), y.to(self.device)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if any_rank(not bool(torch.isfinite(loss))):
            raise NumericalError(f"train-classifier: the loss became {loss.item()}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.c["correct"] += int((logits.argmax(1) == y).sum())
        self.c["seen"] += len(y)
        accuracy = self.c["correct"] / max(self.c["seen"], 1)
        return {"epoch": epoch + 1, "loss": loss.item(), "accuracy": accuracy, "lr": lr}

    def result(self) -> Dict[str, Any]:
        sums = distributed.all_reduce_sums({k: self.c[k] for k in ("correct", "seen", "skipped")})  # ranks
        return {
            "train_accuracy": sums["correct"] / max(sums["seen"], 1),
            "train_seconds": round(time.perf_counter() - self.t0, 2),
            "skipped_images": int(sums["skipped"]),
        }


def train_classifier(
    clf: Classifier,
    train_loader: Any,
    test_loader: Optional[DataLoader] = None,
    *,
    device: torch.device,
    progress: bool = True,
    checkpoint: Optional[Checkpointing] = None,
    log: Any = None,
    **settings: Any,
) -> Dict[str, Any]:
    """Train ``clf`` in place with :class:`ClassifierTrainer`, then measure its test accuracy (Table I).

    Args:
        clf: the classifier (its own normalisation inside); trained in place, left in eval mode.
        train_loader: augmented training batches ``(x, y, n_skipped)``.
        test_loader: held-out batches for the final top-1 accuracy, or None.
        device: where to train.
        progress: show progress bars (rank 0 only).
        checkpoint: where and how often (default: every epoch or 200 steps, whichever is sooner) to save
            the weights, optimiser, schedule, data position and RNG states, and whether to resume (the
            same result as one run); NaN/Inf losses are rolled back to the last good state with the lr
            halved, up to ``checkpoint.max_rollbacks`` times.
        log: receives one history row per step (loss, running accuracy, lr), e.g. a
            :class:`~juap.app.history.RunLog`.
        **settings: :class:`ClassifierTrainer`'s (``epochs``, ``lr``, ``momentum``, ``weight_decay``,
            ``label_smoothing``).

    Returns:
        Metrics: ``train_accuracy`` (last epoch, on augmented data), ``train_seconds``, ``epochs``,
        ``train_images``, ``skipped_images``, and with a test loader ``test_accuracy`` and ``test_images``.
    """
    progress = progress and distributed.is_main()
    clf.to(device).train()
    swapped = to_sync_batchnorm(clf, device)
    trainer = ClassifierTrainer(clf, device=device, **settings)
    found = run_epochs("train-classifier", trainer, train_loader, checkpoint=checkpoint, log=log,
                       progress=progress)  # fmt: skip
    restore_batchnorm(swapped)
    broadcast_buffers(clf)  # under torchrun: rank 0's BatchNorm statistics everywhere
    metrics: Dict[str, Any] = {
        "train_accuracy": found["train_accuracy"],
        "train_seconds": found["train_seconds"],
        "epochs": trainer.epochs,
        "train_images": len(train_loader.dataset),
        "skipped_images": found["skipped_images"],
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


def train_on_splits(
    clf: Classifier,
    splits: DataSplits,
    *,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    in_memory: bool = False,
    device: torch.device,
    progress: bool = True,
    checkpoint: Optional[Checkpointing] = None,
    log: Any = None,
    **settings: Any,
) -> Dict[str, Any]:
    """Train ``clf`` in place on ``splits.train``, measure it on ``splits.test`` (:func:`train_classifier`).

    Builds the loaders first: whole batches only (no BatchNorm step on a lone last image), unless the
    split is one batch or less: then every epoch is that one smaller batch, never zero steps.

    Args:
        clf: the classifier, built for ``splits.num_classes`` classes; trained in place.
        splits: the train and test splits (the train split with its augmentation).
        batch_size: images per (global) training batch.
        seed: the training data's order and augmentation; under torchrun the per-rank RNG seed.
        num_workers: data-loading worker processes.
        in_memory: decode the training images once and augment them per batch (random crop + flip) on
            tensors, as for the synthetic set.
        device, progress, checkpoint, log, settings: as for :func:`train_classifier`.

    Returns:
        :func:`train_classifier`'s metrics.

    Raises:
        ConfigError: the training split has fewer than 2 images.
    """
    if distributed.world_size() > 1:  # the model is built: per-rank RNG from here (augmentation, dropout)
        torch.manual_seed(distributed.rank_seed(seed))
    train_loader = _train_loader(splits, batch_size, seed=seed, num_workers=num_workers, in_memory=in_memory)
    test_loader = make_loader(splits.test, batch_size=256, num_workers=num_workers)
    return train_classifier(
        clf, train_loader, test_loader, device=device, progress=progress, checkpoint=checkpoint, log=log,
        **settings,
    )  # fmt: skip


def _train_loader(
    splits: DataSplits, batch: int, *, seed: int, num_workers: int, in_memory: bool
) -> InMemoryLoader | DataLoader:
    """Augmented training batches ``(x, y, n_skipped)`` of ``splits.train`` (see :func:`train_on_splits`)."""
    n_train = len(splits.train)
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
            stacklevel=4,
        )
    if in_memory:
        size = splits.train.base.image_size
        x, y, _ = to_tensors(SplitView(splits.train.base, splits.train.indices, eval_transform(size)))
        return InMemoryLoader(x, y, batch_size=batch, augment=True, seed=seed, drop_last=drop_last)
    return make_loader(
        splits.train, batch_size=batch, shuffle=True, num_workers=num_workers, seed=seed, drop_last=drop_last
    )
