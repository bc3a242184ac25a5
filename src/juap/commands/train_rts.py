"""Training the RTS masking model (eq 12, ``juap train-rts``) and the pointing game used to check maps.

``run_train_rts`` loads the classifier checkpoint a config names, refuses one that does not fit the data,
trains :class:`~juap.interpreters.rts.RTS` with Adam on :func:`~juap.interpreters.rts.rts_loss`, measures
it on the test split (loss parts, mean mask area, and on data with object boxes the pointing game) and
writes ``rts.safetensors``, ``metrics.json``, ``config.yaml`` and ``split.json`` into the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..app.history import RunLog
from ..app.runs import finish_run
from ..classifiers import Classifier
from ..data import data_summary, drop_last_for, load_splits, make_loader, require_classes, save_split
from ..data.synthetic import boxes_by_test_index
from ..errors import CheckpointError, ConfigError, NumericalError
from ..interpreters.base import upsample_maps
from ..interpreters.rts import _FROZEN_PREFIXES, ENCODERS, RTS, rts_loss, save_rts
from ..metrics import pointing_game
from ..runtime import distributed
from ..runtime.config import check_range, to_dict
from ..runtime.distributed import any_rank, resolve_device
from ..runtime.io import read_metadata
from ..runtime.loop import (
    Checkpointing,
    EpochBatches,
    TrainLoop,
    broadcast_buffers,
    run_epochs,
)
from .build import build_classifier
from .configs import ClassifierConfig, DataConfig, LogConfig

logger = logging.getLogger(__name__)

LOSS_PARTS = ("total", "preserve", "destroy", "area", "tv")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


# -- config -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RTSModelConfig:
    """The masking model: its encoder (the classifier's features, or a pretrained ResNet) and width."""

    encoder: str = "classifier"
    encoder_weights: str | None = None
    width: int = 64

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ConfigError(
                f"rts.encoder = {self.encoder!r} is not allowed; allowed: {', '.join(ENCODERS)}"
            )
        if self.encoder != "classifier" and not self.encoder_weights:
            raise ConfigError(
                f"rts.encoder = {self.encoder!r} needs rts.encoder_weights (e.g. IMAGENET1K_V1, DEFAULT or a "
                "checkpoint path): a randomly initialised encoder explains nothing"
            )
        if self.encoder == "classifier" and self.encoder_weights:
            raise ConfigError(
                "rts.encoder_weights only applies to a named encoder (rts.encoder=resnet50, ...)"
            )
        check_range("rts.width", self.width, low=1)


@dataclasses.dataclass(frozen=True)
class RTSTrainConfig:
    """Adam on eq 12: ``tv_weight`` l1, ``area_weight`` l2, ``destroy_weight`` l3, ``destroy_power`` l4.

    ``blur_sigma`` (pixels; ``None``: 10 px at 224, scaled with the image side) blurs the replacement
    image; ``fake_label_prob`` is the share of samples trained with a random wrong class selector (whose
    mask must vanish, as Dabkowski & Gal do); ``target`` is the class the masks learn to explain: the
    classifier's prediction (as an attack and the evaluation use them) or the true label (as D&G do);
    ``max_minutes`` bounds the training time.
    """

    epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    tv_weight: float = 1.0
    area_weight: float = 0.5
    area_power: float = 1.0
    destroy_weight: float = 2.0
    destroy_power: float = 0.3
    tv_power: float = 2.0
    blur_sigma: float | None = None
    fake_label_prob: float = 0.2
    target: Literal["predicted", "label"] = "predicted"
    augment: bool = True
    max_minutes: float = 60.0

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, low=1)
        check_range("train.batch_size", self.batch_size, low=1)
        check_range("train.lr", self.lr, low=0, low_open=True)
        check_range("train.weight_decay", self.weight_decay, low=0)
        for name in ("tv_weight", "area_weight", "destroy_weight"):
            check_range(f"train.{name}", getattr(self, name), low=0)
        for name in ("area_power", "destroy_power", "tv_power"):
            check_range(f"train.{name}", getattr(self, name), low=0, low_open=True)
        if self.blur_sigma is not None:
            check_range("train.blur_sigma", self.blur_sigma, low=0, low_open=True)
        check_range("train.fake_label_prob", self.fake_label_prob, low=0, high=1)
        check_range("train.max_minutes", self.max_minutes, low=0, low_open=True)

    def loss_kwargs(self) -> Dict[str, Any]:
        """The eq-12 keyword arguments of :func:`~juap.interpreters.rts.rts_loss`."""
        names = ("tv_weight", "area_weight", "area_power", "destroy_weight", "destroy_power", "tv_power")
        return {**{k: getattr(self, k) for k in names}, "blur_sigma": self.blur_sigma}


@dataclasses.dataclass(frozen=True)
class TrainRTSConfig:
    """``juap train-rts``: the data, the classifier checkpoint to explain, the masking model, training."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    rts: RTSModelConfig = dataclasses.field(default_factory=RTSModelConfig)
    train: RTSTrainConfig = dataclasses.field(default_factory=RTSTrainConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.classifier.weights:
            raise ConfigError(
                "classifier.weights is required: the checkpoint of the classifier the RTS explains, e.g. "
                "--set classifier.weights=runs/train-classifier-.../classifier.safetensors"
            )
        if self.classifier.reset_head:
            raise ConfigError("classifier.reset_head must be false: the RTS explains a trained classifier")


# -- training ----------------------------------------------------------------------------------------
def train_rts(
    rts: RTS,
    train_loader: DataLoader,
    cfg: RTSTrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    checkpoint: Optional[Checkpointing] = None,
    log: Any = None,
) -> Dict[str, Any]:
    """Train the masking model in place with Adam on eq 12; the classifier and encoder stay frozen.

    Args:
        rts: the masking model (its classifier is the one explained).
        train_loader: batches ``(x, y, n_skipped)``; the masks explain the predicted classes, or ``y``
            with ``cfg.target = "label"``.
        cfg: epochs, learning rate, eq-12 weights, fake-label share and time bound.
        device: where to train.
        progress: show a tqdm bar with the live loss.
        checkpoint: where and how often (default: every epoch or 200 steps, whichever is sooner) to save
            the masking model, Adam, schedule, data position, RNG states and loss history, and whether to
            resume; NaN/Inf losses are rolled back to the last good state with the lr halved, up to
            ``checkpoint.max_rollbacks`` times.
        log: receives one history row per step (the eq-12 loss parts and the lr), e.g. a
            :class:`~juap.app.history.RunLog`.

    Under torchrun (:mod:`juap.runtime.distributed`) the masking model trains as DistributedDataParallel, each
    rank on its share of every global batch (:func:`~juap.runtime.loop.shard_train_loader`; the batch size
    must divide by the number of processes) with its own fake-label draws; the schedule counts global
    steps, the loss history is sums and counts added over the ranks, the time bound stops every rank at
    the same step, rank 0 alone writes checkpoints. The masking model's BatchNorm layers normalise with
    each rank's slice (plain BatchNorm per rank; rank 0's running statistics are kept).

    Returns:
        Metrics: ``train_loss`` (loss parts, mean over the last epoch), ``first_loss`` (first epoch),
        ``train_seconds``, ``steps``, ``epochs_done``, ``stopped_early`` (time bound reached).
    """
    rts.to(device).train()
    trainer = run_epochs(
        "train-rts",
        lambda loader: _RTSTrainer(rts, loader, cfg, device),
        train_loader,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        checkpoint=checkpoint,
        per_rank=("seen", "sums", "fake_labels", "data", "rng"),
        log=log,
        progress=progress,
    )
    broadcast_buffers(rts)  # under torchrun: rank 0's BatchNorm statistics everywhere
    rts.eval()
    epochs, c = trainer.epochs, trainer.c
    return {
        "train_loss": epochs[-1] if epochs else {},
        "first_loss": epochs[0] if epochs else {},
        "loss_history": [h["total"] for h in epochs],
        "train_seconds": round(time.perf_counter() - trainer.t0, 2),
        "steps": c["steps"],
        "epochs_done": c["epochs_done"],
        "stopped_early": c["stopped"],
    }


class _RTSTrainer:
    """``train-rts`` for the loop engine: Adam on eq 12, the classifier and the encoder frozen."""

    def __init__(self, rts: RTS, loader, cfg: RTSTrainConfig, device: torch.device) -> None:
        self.rts, self.cfg, self.device = rts, cfg, device
        self.opt = torch.optim.Adam(rts.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.per_epoch = max(1, len(loader))
        total = cfg.epochs * self.per_epoch
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total, eta_min=cfg.lr * 0.05)
        self.gen = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**31))  # fake labels
        self.batches = EpochBatches(loader, cfg.epochs)
        self.trained = _trainable_names(rts)
        # steps: optimiser steps taken (a skipped empty batch or a rolled-back one takes none)
        self.c: Dict[str, Any] = {"steps": 0, "epochs_done": 0, "seen": 0, "seconds": 0.0, "stopped": False}
        self.sums = {k: 0.0 for k in LOSS_PARTS}  # this epoch's, weighted by images
        self.epochs: List[Dict[str, float]] = []  # the loss parts per epoch: means over every rank's images

    def begin(self, loop: TrainLoop) -> None:
        self.loop = loop
        self.model = distributed.wrap_ddp(self.rts)  # averages the masking model's gradients
        self.t0 = time.perf_counter() - self.c["seconds"]
        self.deadline = time.perf_counter() + 60.0 * self.cfg.max_minutes - self.c["seconds"]

    def snapshot(self) -> Dict[str, Any]:
        return {
            **self.c,
            "sums": self.sums,
            "epochs": self.epochs,
            "model": {k: v for k, v in self.rts.state_dict().items() if k in self.trained},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "fake_labels": self.gen.get_state(),
            "data": self.batches.position(),
        }

    def restore(self, s: Dict[str, Any]) -> None:  # a roll-back: weights, Adam, schedule, fake labels
        try:
            self.rts.load_state_dict(s["model"], strict=False)
            self.opt.load_state_dict(s["optimizer"])
            self.sched.load_state_dict(s["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"the checkpoint does not fit this RTS model: {e}") from None
        self.gen.set_state(s["fake_labels"])

    def load(self, s: Dict[str, Any]) -> None:
        if set(s["model"]) != set(self.trained):
            raise CheckpointError(
                "the checkpoint is of another RTS model (other layers); resume with the same config"
            )
        self.restore(s)
        self.c.update({k: s[k] for k in self.c})
        self.sums.update(s["sums"])
        self.epochs[:] = s["epochs"]
        self.batches.restore(s["data"])

    def end_epoch(self, epoch: int) -> None:
        sums = distributed.all_reduce_sums({**self.sums, "_seen": self.c["seen"]})  # over the ranks
        if sums["_seen"]:
            self.epochs.append({k: sums[k] / sums["_seen"] for k in LOSS_PARTS})
        self.c["epochs_done"] += 0 if self.c["stopped"] else 1
        self.c["seen"] = 0
        self.sums.update({k: 0.0 for k in LOSS_PARTS})

    def step(self, i: int) -> Optional[Dict[str, float]]:
        item = self.batches.next()
        if item is None:  # no (more) batches
            self.loop.finished = True
            return None
        epoch, (x, y, _n_skip) = item
        self.c["seconds"] = time.perf_counter() - self.t0
        if any_rank(time.perf_counter() > self.deadline):  # under torchrun every rank stops at this step
            self.c["stopped"] = self.loop.finished = True
            logger.warning("train-rts stopped after %.1f minutes (train.max_minutes)", self.cfg.max_minutes)
            self.end_epoch(epoch)
            return None
        row = None if any_rank(len(y) == 0) else self._train(epoch, x.to(self.device), y.to(self.device))
        if i % self.per_epoch == 0:  # the epoch's last batch
            self.end_epoch(epoch)
        return row

    def _train(self, epoch: int, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        clf, cfg = self.rts.classifier, self.cfg
        if cfg.target == "predicted":
            with torch.no_grad():
                y = clf(x).argmax(1)
        classes, real = _with_fake_labels(y, clf.num_classes, cfg.fake_label_prob, self.gen)
        masks = self.model(x, classes)  # (N, H/4, W/4)
        loss, parts = rts_loss(clf, x, masks, classes, real=real, **cfg.loss_kwargs())
        if any_rank(not bool(torch.isfinite(loss))):
            raise NumericalError(f"train-rts: the loss became {loss.item()}")
        lr = self.opt.param_groups[0]["lr"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.c["steps"] += 1
        for k in LOSS_PARTS:
            self.sums[k] += float(parts[k]) * len(y)
        self.c["seen"] += len(y)
        return {"epoch": epoch + 1, **{k: float(parts[k]) for k in LOSS_PARTS}, "lr": lr}


def _trainable_names(rts: RTS) -> set:
    """State-dict names of the masking model's own tensors (parameters and buffers), not the frozen
    classifier's or encoder's."""

    return {n for n in rts.state_dict() if not n.startswith(_FROZEN_PREFIXES)}


def _with_fake_labels(
    y: torch.Tensor, num_classes: int, prob: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Replace a ``prob`` share of the labels by a random *other* class; returns (classes, real mask)."""
    if prob <= 0 or num_classes < 2:
        return y, None
    fake = torch.rand(len(y), generator=gen) < prob
    shift = torch.randint(1, num_classes, (len(y),), generator=gen)
    classes = torch.where(fake.to(y.device), (y + shift.to(y.device)) % num_classes, y)
    return classes, ~fake.to(y.device)


@torch.no_grad()
# About 80 lines, half of them the docstring of what is measured.
def evaluate_rts(
    rts: RTS,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 128,
    boxes: Dict[int, Sequence[int]] | None = None,
    loss_kwargs: Dict[str, Any] | None = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """Measure a masking model on a data set, explaining the classifier's predicted classes.

    Args:
        rts: the (trained) masking model.
        dataset: items ``(image (3, H, W), label)`` or ``None`` (unreadable; skipped and counted).
        device: where to run.
        batch_size: images per forward.
        boxes: ``{dataset index: (x0, y0, x1, y1)}`` object boxes in image pixels, for the pointing game.
        loss_kwargs: eq-12 weights for the reported loss parts (default: :func:`rts_loss`'s).
        progress: show a tqdm bar.

    Under torchrun each rank measures a disjoint share of the images (every W-th) and the sums and counts
    are added over the ranks, so every rank returns the figures of the whole data set.

    Returns:
        ``loss`` (eq-12 parts, image means), ``mean_mask_area`` (mean mask value), ``classifier_accuracy``,
        ``images``, ``skipped``, and with ``boxes`` ``pointing_top20`` and ``pointing_images``.
    """
    rts.to(device).eval()
    sums = {k: 0.0 for k in LOSS_PARTS}
    correct = seen = skipped = 0
    area_sum = 0.0
    hits = pointed = 0.0
    mine = range(distributed.rank(), len(dataset), distributed.world_size())  # all of it alone
    progress = progress and distributed.is_main()
    for start in tqdm(
        range(0, len(mine), batch_size), desc="evaluate-rts", disable=not progress, leave=False
    ):
        items = [(i, dataset[i]) for i in mine[start : start + batch_size]]
        kept = [(i, item) for i, item in items if item is not None]
        skipped += len(items) - len(kept)
        if not kept:
            continue
        x = torch.stack([item[0] for _, item in kept]).to(device)
        y = torch.as_tensor([item[1] for _, item in kept], device=device)
        logits, masks = rts.explain(x)  # masks of the predicted classes, (N, H/4, W/4)
        pred = logits.argmax(1)
        _, parts = rts_loss(rts.classifier, x, masks, pred, **(loss_kwargs or {}))
        for k in LOSS_PARTS:
            sums[k] += float(parts[k]) * len(x)
        area_sum += float(masks.mean(dim=(1, 2)).sum())
        correct += int((pred == y).sum())
        seen += len(x)
        if boxes is not None:
            with_box = [j for j, (i, _) in enumerate(kept) if i in boxes]
            if with_box:
                up = upsample_maps(masks[with_box], x.shape[-2:])
                b = torch.tensor([boxes[kept[j][0]] for j in with_box], device=device)
                hits += pointing_game(up, b) * len(with_box)
                pointed += len(with_box)
    if distributed.world_size() > 1:  # sums and counts over the ranks
        total = distributed.all_reduce_sums(
            {
                **sums,
                "_correct": correct,
                "_seen": seen,
                "_skipped": skipped,
                "_area": area_sum,
                "_hits": hits,
                "_pointed": pointed,
            }
        )
        sums = {k: total[k] for k in LOSS_PARTS}
        correct, seen, skipped = (int(total[k]) for k in ("_correct", "_seen", "_skipped"))
        area_sum, hits, pointed = total["_area"], total["_hits"], total["_pointed"]
    out: Dict[str, Any] = {
        "loss": {k: sums[k] / max(seen, 1) for k in LOSS_PARTS},
        "mean_mask_area": area_sum / max(seen, 1),
        "classifier_accuracy": correct / max(seen, 1),
        "images": seen,
        "skipped": skipped,
    }
    if boxes is not None:
        out["pointing_top20"] = hits / pointed if pointed else None
        out["pointing_images"] = int(pointed)
    return out


# -- the command -------------------------------------------------------------------------------------
def load_explained_classifier(cfg: ClassifierConfig, *, classes: Sequence[str]) -> Classifier:
    """The classifier ``cfg`` names (checkpoint file or torchvision enum weights), checked against the data.

    Raises:
        CheckpointError: missing or unreadable file, another architecture than ``cfg.name``, or a class
            count / class names different from the data's.
    """

    weights = str(cfg.weights)
    path = Path(weights)
    is_file = path.suffix in _CHECKPOINT_SUFFIXES or "/" in weights or os.sep in weights or path.exists()
    meta: Dict[str, Any] = {}
    if is_file:
        if not path.is_file():
            raise CheckpointError(
                f"classifier checkpoint {weights!r} does not exist; train one with `juap train-classifier` "
                "and pass its classifier.safetensors as classifier.weights"
            )
        meta = read_metadata(path)
        if meta.get("format") not in (None, "juap.classifier"):
            raise CheckpointError(f"{path} is not a classifier checkpoint (format {meta.get('format')!r})")
    clf = build_classifier(cfg)
    if clf.num_classes != len(classes):
        raise CheckpointError(
            f"classifier {weights} has {clf.num_classes} classes but the data has {len(classes)} "
            f"({', '.join(list(classes)[:10])}{', ...' if len(classes) > 10 else ''}); "
            "use the classifier trained on this data"
        )
    saved = meta.get("classes")
    if isinstance(saved, list) and list(saved) != list(classes):
        raise CheckpointError(
            f"classifier checkpoint {path} was trained on classes {saved[:10]}, but the data has "
            f"{list(classes)[:10]}; use the checkpoint trained on this data"
        )
    return clf.eval()


# About 80 lines: the command's steps in order (data, classifier, train, measure, save), each short.
def run_train_rts(
    cfg: TrainRTSConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    checkpoint_every: int | None = None,
) -> Dict[str, Any]:
    """``juap train-rts``: train the RTS masking model for a classifier checkpoint, measure it, save it.

    Training checkpoints into ``run_dir`` every ``checkpoint_every`` steps; ``resume`` continues from there.

    Writes ``rts.safetensors`` (the masking model without the frozen classifier/encoder), ``split.json``,
    ``metrics.json`` and ``config.yaml`` into ``run_dir``.

    Returns:
        The metrics: training loss parts, test loss parts, ``mean_mask_area``, ``pointing_top20`` (data
        with object boxes, e.g. the synthetic set; else ``None``), timings.
    """

    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial masking model
    device = distributed.device_for_rank(resolve_device(cfg.device))
    with distributed.main_first():  # under torchrun, rank 0 fills the data cache, then the others read it
        splits = load_splits(cfg.data, augment_train=cfg.train.augment, progress=progress)
    require_classes(splits.train, splits.classes)
    clf = load_explained_classifier(cfg.classifier, classes=splits.classes)
    if distributed.is_main():  # under torchrun only rank 0 writes files
        save_split(run_dir / "split.json", splits.split)
    rts = RTS(
        clf.to(device),
        encoder=cfg.rts.encoder,
        encoder_weights=cfg.rts.encoder_weights,
        width=cfg.rts.width,
        image_size=cfg.data.image_size,
    ).to(device)
    if distributed.world_size() > 1:  # the model is built: per-rank RNG (augmentation, fake labels)
        torch.manual_seed(distributed.rank_seed(cfg.seed))
    loader = make_loader(
        splits.train,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        drop_last=drop_last_for(len(splits.train), cfg.train.batch_size),
    )
    run_log = RunLog(run_dir, tensorboard=cfg.log.tensorboard, title="juap train-rts")
    metrics = train_rts(
        rts,
        loader,
        cfg.train,
        device=device,
        progress=progress,
        checkpoint=Checkpointing(run_dir, checkpoint_every, resume),
        log=run_log,
    )
    if distributed.is_main():
        run_log.finish()
    boxes = boxes_by_test_index(splits) if cfg.data.name == "synthetic" else None
    ev = evaluate_rts(
        rts, splits.test, device=device, boxes=boxes, loss_kwargs=cfg.train.loss_kwargs(), progress=progress
    )
    if distributed.is_main():
        save_rts(rts, run_dir / "rts.safetensors", classes=splits.classes)
    metrics.update(
        test_loss=ev["loss"],
        mean_mask_area=ev["mean_mask_area"],
        pointing_top20=ev.get("pointing_top20"),
        pointing_images=ev.get("pointing_images", 0),
        classifier_test_accuracy=ev["classifier_accuracy"],
        test_images=ev["images"],
        skipped_images=ev["skipped"],
        classifier=str(cfg.classifier.weights),
        classifier_arch=clf.arch,
        encoder=cfg.rts.encoder,
        classes=splits.classes,
        data=cfg.data.name,
        data_root=splits.root,
        data_summary=data_summary(splits, train=splits.train, test=splits.test),
    )
    finish_run(run_dir, config=to_dict(cfg), metrics=metrics)
    return metrics
