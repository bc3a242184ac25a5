"""`juap train-classifier`: fine-tune or train a classifier and write its run folder."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..classifiers import Classifier, save_classifier
from ..data import (
    DataSplits,
    InMemoryLoader,
    SplitView,
    data_summary,
    eval_transform,
    load_splits,
    make_loader,
    require_classes,
    save_split,
    to_tensors,
)
from ..evaluation import evaluate_accuracy
from ..runtime import distributed
from ..runtime.config import to_dict
from ..runtime.distributed import resolve_device
from ..runtime.loop import (
    any_rank,
    broadcast_buffers,
    gather_rank_states,
    open_loop_checkpoints,
    restore_batchnorm,
    set_epoch,
    shard_train_loader,
    to_sync_batchnorm,
)
from ..runtime.runs import finish_run
from ._build import build_classifier
from .configs import ClassifierConfig, DataConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainClassifierConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
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
        from ..errors import ConfigError

        raise ConfigError(
            f"the classifier has {clf.num_classes} classes but the data has {splits.num_classes} "
            f"({splits.classes}); set classifier.num_classes={splits.num_classes} and "
            "classifier.reset_head=true to fine-tune a new head"
        )
    ckpt = {"checkpoint_dir": run_dir, "checkpoint_every": checkpoint_every, "resume": resume}
    metrics = _train_and_measure(clf, splits, cfg, device=device, progress=progress, **ckpt)
    if distributed.is_main():
        save_classifier(clf, run_dir / "classifier.safetensors", classes=splits.classes)
    metrics.update(
        classifier=cfg.classifier.name, classes=splits.classes, data=cfg.data.name, data_root=splits.root
    )
    metrics["data_summary"] = data_summary(splits, train=splits.train, test=splits.test)
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics


def _train_and_measure(
    clf: Classifier,
    splits: DataSplits,
    cfg: TrainClassifierConfig,
    *,
    device: torch.device,
    progress: bool,
    **checkpoints: Any,
) -> Dict[str, Any]:
    in_memory = cfg.data.in_memory if cfg.data.in_memory is not None else cfg.data.name == "synthetic"
    if distributed.world_size() > 1:  # the model is built: per-rank RNG from here (augmentation, dropout)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    if in_memory:  # decode once, augment per batch (random crop + flip) on tensors
        plain = SplitView(splits.train.base, splits.train.indices, eval_transform(cfg.data.image_size))
        x, y, _ = to_tensors(plain)
        train_loader = InMemoryLoader(
            x, y, batch_size=cfg.train.batch_size, augment=True, seed=cfg.seed, drop_last=True
        )
    else:
        train_loader = make_loader(
            splits.train,
            batch_size=cfg.train.batch_size,
            shuffle=True,
            num_workers=cfg.data.num_workers,
            seed=cfg.seed,
            drop_last=True,
        )
    test_loader = make_loader(splits.test, batch_size=256, num_workers=cfg.data.num_workers)
    return train_classifier(
        clf, train_loader, test_loader, cfg.train, device=device, progress=progress, **checkpoints
    )


def _load_training_state(state: Dict, clf: Classifier, opt, sched) -> None:
    """Load a train-classifier checkpoint; one of another architecture or class count is refused."""
    from ..errors import CheckpointError

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


def train_classifier(
    clf: Classifier,
    train_loader: DataLoader,
    test_loader: DataLoader | None,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    max_rollbacks: int = 3,
) -> Dict:
    """Train ``clf`` in place with SGD (Nesterov momentum, cosine schedule), then measure test accuracy.

    Args:
        clf: the classifier (its own normalisation inside); trained in place.
        train_loader: augmented training batches ``(x, y, n_skipped)``.
        test_loader: held-out batches for the final top-1 accuracy (Table I), or None.
        cfg: epochs, batch size, learning rate and regularisation.
        checkpoint_dir: folder for ``checkpoint.safetensors`` (weights, optimiser, schedule, data
            position, RNG states), written every ``checkpoint_every`` steps (default: every epoch or 200
            steps, whichever is sooner), at the end and on SIGINT/SIGTERM.
        resume: continue from the checkpoint in ``checkpoint_dir`` (the same result as one run).
        max_rollbacks: NaN/Inf losses rolled back to the last good state with the lr halved before a
            NumericalError.

    Under torchrun (:mod:`juap.runtime.distributed`) the model trains as DistributedDataParallel, each rank on
    its share of every global batch of ``cfg.batch_size`` images (:func:`shard_train_loader`; the batch
    size must divide by the number of processes); the schedule counts global steps, the accuracies are
    sums and counts added over the ranks, rank 0 alone writes checkpoints and shows progress, and every
    rank reads the checkpoint on resume (with the same number of processes). See the note on BatchNorm
    at the top of this module.

    Returns:
        Metrics: ``test_accuracy``, ``train_accuracy`` (last epoch, on augmented data), timings, counts.
    """
    from ..errors import NumericalError
    from ..runtime.checkpoint import cpu_copy, lower_lr, lr_settings, rng_states, set_rng_states

    world = distributed.world_size()
    progress = progress and distributed.is_main()
    if world > 1:
        distributed.check_divisible(cfg.batch_size, "train.batch_size")
    full_loader = train_loader
    train_loader = shard_train_loader(train_loader)
    clf.to(device).train()
    swapped = to_sync_batchnorm(clf, device)
    params_decay = [p for n, p in clf.named_parameters() if p.ndim > 1]
    params_other = [p for n, p in clf.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": params_decay, "weight_decay": cfg.weight_decay},
            {"params": params_other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    steps = cfg.epochs * max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    ckpt, state, loader = open_loop_checkpoints(
        train_loader,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        kind="train-classifier",
        resume=resume,
        max_rollbacks=max_rollbacks,
    )
    c = {"step": 0, "epoch": 0, "correct": 0, "seen": 0, "skipped": 0, "seconds": 0.0}
    per_rank = ("correct", "seen", "skipped", "data", "rng")

    def snapshot() -> Dict:
        s = {
            **c,
            "arch": clf.arch,
            "num_classes": clf.num_classes,
            "model": clf.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data": loader.position(),
            "rng": rng_states(),
        }
        ranks = gather_rank_states({k: s[k] for k in per_rank})  # None in one process
        return s if ranks is None else {**s, "ranks": ranks}

    if state is not None:
        _load_training_state(state, clf, opt, sched)
        c.update({k: state[k] for k in c})
        set_rng_states(state["rng"])
    else:
        ckpt.remember(snapshot())
    model = distributed.wrap_ddp(clf)  # broadcasts rank 0's parameters and buffers; clf itself alone
    t0 = time.perf_counter() - c["seconds"]
    bar = tqdm(
        total=steps, initial=c["step"], desc="train-classifier", disable=not progress, dynamic_ncols=True
    )
    for epoch in ckpt.steps(range(c["epoch"], cfg.epochs)):
        clf.train()
        if epoch != c["epoch"]:
            c.update(epoch=epoch, correct=0, seen=0)
        set_epoch(train_loader, epoch)
        for x, y, n_skip in loader:
            c["step"] += 1
            c["skipped"] += n_skip
            if any_rank(len(y) == 0):  # under torchrun all ranks skip alike
                bar.update(1)
                sched.step()
                continue
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if any_rank(not bool(torch.isfinite(loss))):
                lrs = lr_settings(opt, sched)
                good = ckpt.roll_back(NumericalError(f"train-classifier: the loss became {loss.item()}"))
                _load_training_state(cpu_copy(good), clf, opt, sched)
                lower_lr(opt, lrs, ckpt.lr_factor, sched)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            c["correct"] += int((logits.argmax(1) == y).sum())
            c["seen"] += len(y)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{cfg.epochs}",
                loss=f"{loss.item():.3f}",
                acc=f"{c['correct'] / max(c['seen'], 1):.3f}",
            )
            bar.update(1)
            c["seconds"] = time.perf_counter() - t0
            ckpt.step_end(c["step"], snapshot, last=c["step"] == steps)
    bar.close()
    restore_batchnorm(swapped)
    broadcast_buffers(clf)  # under torchrun: rank 0's BatchNorm statistics everywhere
    correct, seen, skipped = c["correct"], c["seen"], c["skipped"]
    if world > 1:  # sums and counts over the ranks
        sums = distributed.all_reduce_sums({"correct": correct, "seen": seen, "skipped": skipped})
        correct, seen, skipped = (int(sums[k]) for k in ("correct", "seen", "skipped"))
    train_time = time.perf_counter() - t0
    metrics: Dict = {
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": round(train_time, 2),
        "epochs": cfg.epochs,
        "train_images": len(full_loader.dataset),
        "skipped_images": skipped,
    }
    if test_loader is not None:
        ev = evaluate_accuracy(clf, test_loader, device=device, progress=progress)
        metrics.update(
            test_accuracy=ev["accuracy"], test_images=ev["total"], skipped_images=skipped + ev["skipped"]
        )
    clf.eval()
    return metrics
