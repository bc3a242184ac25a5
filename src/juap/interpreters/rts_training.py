"""Training and measuring the RTS masking model (eq 12), in the loop engine
(:func:`~juap.runtime.loop.run_epochs`).

:class:`RTSTrainer` is the masking model's :class:`~juap.runtime.loop.Trainer` (Adam on eq 12, the classifier
and encoder frozen); :func:`train_rts` trains an :class:`~juap.interpreters.rts.RTS` in place with it (the
way in from Python; ``juap train-rts`` calls it); :func:`evaluate_rts` measures one on a data set (eq-12 loss
parts, mean mask area, and with object boxes the pointing game) from sums and counts added over the
torchrun ranks. The settings are keyword arguments; the YAML sections that give them belong to the command
(:mod:`juap.commands.train_rts`). This module builds on :mod:`juap.interpreters.rts`, never the reverse.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._validate import check_choice, check_range
from ..errors import CheckpointError, ConfigError, NumericalError
from ..metrics import MetricSums, pointing_game
from ..runtime import distributed
from ..runtime.config import signature_defaults
from ..runtime.distributed import any_rank
from ..runtime.loop import Checkpointing, EpochBatches, Trainer, broadcast_buffers, run_epochs
from .base import upsample_maps
from .rts import RTS, rts_loss

logger = logging.getLogger(__name__)

LOSS_PARTS = ("total", "preserve", "destroy", "area", "tv")
"""The eq-12 loss parts :func:`train_rts` and :func:`evaluate_rts` report."""

LOSS_WEIGHTS = tuple(k for k in signature_defaults(rts_loss) if k != "real")
"""The eq-12 settings of :func:`~juap.interpreters.rts.rts_loss` a training takes (its defaults are
``rts_loss``'s)."""


# -- training ----------------------------------------------------------------------------------------
def train_rts(
    rts: RTS,
    train_loader: Any,
    *,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
    checkpoint: Optional[Checkpointing] = None,
    log: Any = None,
    batch_size: Optional[int] = None,
    **settings: Any,
) -> Dict[str, Any]:
    """Train the masking model in place with Adam on eq 12 (:class:`RTSTrainer`); the classifier and
    encoder stay frozen.

    Args:
        rts: the masking model (its classifier is the one explained).
        train_loader: batches ``(x (N, 3, H, W) in [0, 1], y (N,), n_skipped)``, e.g. a
            :func:`~juap.data.make_loader` loader or a list of such tuples; the masks explain the predicted
            classes, or ``y`` with ``target="label"``.
        device: where to train (default: where the masking model is).
        progress: show a tqdm bar with the live loss.
        checkpoint: where and how often (default: every epoch or 200 steps, whichever is sooner) to save
            the masking model, Adam, schedule, data position, RNG states and loss history, and whether to
            resume; NaN/Inf losses are rolled back to the last good state with the lr halved, up to
            ``checkpoint.max_rollbacks`` times.
        log: receives one history row per step (the eq-12 loss parts and the lr), e.g. a run's history log.
        batch_size: the loader's global batch (default: its ``batch_size``), checked under torchrun.
        **settings: :class:`RTSTrainer`'s (``epochs``, ``lr``, ``fake_label_prob``, the eq-12 weights, ...).

    Under torchrun (:mod:`juap.runtime.distributed`) the masking model trains as DistributedDataParallel, each
    rank on its share of every global batch (:func:`~juap.runtime.distributed.shard_train_loader`; the batch
    size must divide by the number of processes) with its own fake-label draws; the schedule counts global
    steps, the loss history is sums and counts added over the ranks, the time bound stops every rank at
    the same step, rank 0 alone writes checkpoints. The masking model's BatchNorm layers normalise with
    each rank's slice (plain BatchNorm per rank; rank 0's running statistics are kept).

    Returns:
        Metrics: ``train_loss`` (loss parts, mean over the last epoch), ``first_loss`` (first epoch),
        ``loss_history`` (total per epoch), ``train_seconds``, ``steps``, ``epochs_done``,
        ``stopped_early`` (time bound reached). The model is left in eval mode.

    Example:
        >>> rts = juap.create_interpreter("rts", clf)
        >>> train_rts(rts, [(x, y, 0)], epochs=2, device="cpu", progress=False)
    """
    where = torch.device(device) if device is not None else next(rts.bottleneck.parameters()).device
    rts.to(where).train()
    trainer = RTSTrainer(rts, device=where, **settings)
    metrics = run_epochs(
        "train-rts", trainer, train_loader, batch_size=batch_size, checkpoint=checkpoint, log=log,
        progress=progress,
    )  # fmt: skip
    broadcast_buffers(rts)  # under torchrun: rank 0's BatchNorm statistics everywhere
    rts.eval()
    return metrics


class RTSTrainer(Trainer):
    """Adam on eq 12 for an RTS masking model, on a cosine schedule; the classifier and encoder frozen.

    Args:
        rts: the masking model; trained in place.
        epochs: passes over the training data.
        lr: Adam's learning rate (the cosine schedule ends at 5% of it).
        weight_decay: Adam's weight decay.
        fake_label_prob: the share of samples trained with a random wrong class selector, whose mask must
            vanish (as Dabkowski & Gal do).
        target: the class the masks learn to explain: ``"predicted"`` (the classifier's prediction, as an
            attack and the evaluation use them) or ``"label"`` (the true label, as D&G do).
        max_minutes: the time bound; the training stops at the first step past it.
        device: where the batches go (default: the masking model's device).
        **loss_weights: eq 12's settings of :func:`~juap.interpreters.rts.rts_loss` (:data:`LOSS_WEIGHTS`:
            ``tv_weight`` l1, ``area_weight`` l2, ``destroy_weight`` l3, ``destroy_power`` l4, ``area_power``,
            ``tv_power``, ``blur_sigma``); default: ``rts_loss``'s.

    ``result()`` gives :func:`train_rts`'s metrics.
    """

    per_rank = ("seen", "sums", "fake_labels", "data", "rng")

    def __init__(
        self,
        rts: RTS,
        *,
        epochs: int = 2,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        fake_label_prob: float = 0.2,
        target: str = "predicted",
        max_minutes: float = 60.0,
        device: Optional[torch.device] = None,
        **loss_weights: Any,
    ) -> None:
        unknown = sorted(set(loss_weights) - set(LOSS_WEIGHTS))
        if unknown:
            allowed = ", ".join(LOSS_WEIGHTS)
            raise ConfigError(f"RTSTrainer got unknown settings {unknown}; eq 12's are {allowed}")
        check_range("epochs", epochs, low=1)
        check_range("lr", lr, low=0, low_open=True)
        check_range("fake_label_prob", fake_label_prob, low=0, high=1)
        check_choice("target", target, ("predicted", "label"))
        check_range("max_minutes", max_minutes, low=0, low_open=True)
        self.rts, self.epochs, self.lr, self.weight_decay = rts, int(epochs), lr, weight_decay
        self.fake_label_prob, self.target, self.max_minutes = fake_label_prob, target, max_minutes
        self.loss_weights = dict(loss_weights)
        self.device = device if device is not None else next(rts.bottleneck.parameters()).device
        self.per_epoch = 1
        self.done = False
        # steps: optimiser steps taken (a skipped empty batch or a rolled-back one takes none)
        self.c: Dict[str, Any] = {"steps": 0, "epochs_done": 0, "seen": 0, "seconds": 0.0, "stopped": False}
        self.sums = {k: 0.0 for k in LOSS_PARTS}  # this epoch's, weighted by images
        self.epoch_losses: List[Dict[str, float]] = []  # the loss parts per epoch: means over every rank's

    @property
    def num_steps(self) -> int:
        return self.epochs * self.per_epoch

    def init(self, data: Any, val_data: Any = None, *, progress: bool = True) -> None:
        rts = self.rts
        params = rts.trainable_parameters()
        self.optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        self.per_epoch = max(1, len(data))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.num_steps, eta_min=self.lr * 0.05
        )
        self.gen = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**31))  # fake labels
        self.batches = EpochBatches(data, self.epochs)
        self.trained = set(rts.trainable_state_dict())  # the masking model's own tensors

    def begin(self) -> None:
        self.model = distributed.wrap_ddp(self.rts)  # averages the masking model's gradients
        self.t0 = time.perf_counter() - self.c["seconds"]
        self.deadline = time.perf_counter() + 60.0 * self.max_minutes - self.c["seconds"]

    def state_dict(self) -> Dict[str, Any]:
        return {
            **self.c,
            "sums": self.sums,
            "epochs": self.epoch_losses,
            "model": self.rts.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "fake_labels": self.gen.get_state(),
            "data": self.batches.position(),
        }

    def restore_state(self, s: Mapping[str, Any]) -> None:  # a roll-back: weights, Adam, schedule, labels
        try:
            self.rts.load_state_dict(s["model"], strict=False)
            self.optimizer.load_state_dict(s["optimizer"])
            self.scheduler.load_state_dict(s["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"the checkpoint does not fit this RTS model: {e}") from None
        self.gen.set_state(s["fake_labels"])

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        if set(s["model"]) != self.trained:
            raise CheckpointError(
                "the checkpoint is of another RTS model (other layers); resume with the same config"
            )
        self.restore_state(s)
        self.c.update({k: s[k] for k in self.c})
        self.sums.update(s["sums"])
        self.epoch_losses[:] = s["epochs"]
        self.batches.restore(s["data"])

    def converged(self) -> bool:
        return self.done  # the data is used up, or the time bound reached

    def end_epoch(self, epoch: int) -> None:
        sums = distributed.all_reduce_sums({**self.sums, "_seen": self.c["seen"]})  # over the ranks
        if sums["_seen"]:
            self.epoch_losses.append({k: sums[k] / sums["_seen"] for k in LOSS_PARTS})
        self.c["epochs_done"] += 0 if self.c["stopped"] else 1
        self.c["seen"] = 0
        self.sums.update({k: 0.0 for k in LOSS_PARTS})

    def step(self, i: int) -> Optional[Dict[str, float]]:
        item = self.batches.next()
        if item is None:  # no (more) batches
            self.done = True
            return None
        epoch, (x, y, _n_skip) = item
        self.c["seconds"] = time.perf_counter() - self.t0
        if any_rank(time.perf_counter() > self.deadline):  # under torchrun every rank stops at this step
            self.c["stopped"] = self.done = True
            logger.warning("train-rts stopped after %.1f minutes (max_minutes)", self.max_minutes)
            self.end_epoch(epoch)
            return None
        row = None if any_rank(len(y) == 0) else self._train(epoch, x.to(self.device), y.to(self.device))
        if i % self.per_epoch == 0:  # the epoch's last batch
            self.end_epoch(epoch)
        return row

    def _train(self, epoch: int, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        clf = self.rts.classifier
        if self.target == "predicted":
            with torch.no_grad():
                y = clf(x).argmax(1)
        classes, real = _with_fake_labels(y, clf.num_classes, self.fake_label_prob, self.gen)
        masks = self.model(x, classes)  # (N, H/4, W/4)
        loss, parts = rts_loss(clf, x, masks, classes, real=real, **self.loss_weights)
        if any_rank(not bool(torch.isfinite(loss))):
            raise NumericalError(f"train-rts: the loss became {loss.item()}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.c["steps"] += 1
        for k in LOSS_PARTS:
            self.sums[k] += float(parts[k]) * len(y)
        self.c["seen"] += len(y)
        return {"epoch": epoch + 1, **{k: float(parts[k]) for k in LOSS_PARTS}, "lr": lr}

    def result(self) -> Dict[str, Any]:
        epochs, c = self.epoch_losses, self.c
        return {
            "train_loss": epochs[-1] if epochs else {},
            "first_loss": epochs[0] if epochs else {},
            "loss_history": [h["total"] for h in epochs],
            "train_seconds": round(time.perf_counter() - self.t0, 2),
            "steps": c["steps"],
            "epochs_done": c["epochs_done"],
            "stopped_early": c["stopped"],
        }


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


# -- measuring ---------------------------------------------------------------------------------------
@torch.no_grad()
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

    Under torchrun each rank measures a disjoint share of the images
    (:func:`~juap.runtime.distributed.shard_eval_loader`) and the sums and counts are added over the ranks,
    so every rank returns the figures of the whole data set.

    Returns:
        ``loss`` (eq-12 parts, image means), ``mean_mask_area`` (mean mask value), ``classifier_accuracy``,
        ``images``, ``skipped``, and with ``boxes`` ``pointing_top20`` and ``pointing_images``.
    """
    rts.to(device).eval()
    sums = MetricSums()
    loader = DataLoader(  # its own generator: measuring leaves the global RNG alone
        _Indexed(dataset), batch_size=batch_size, collate_fn=_collate_indexed, generator=torch.Generator()
    )
    batches = distributed.shard_eval_loader(loader)  # this rank's share; all of it alone
    show = progress and distributed.is_main()
    for idx, x, y, n_skip in tqdm(batches, desc="evaluate-rts", disable=not show, leave=False):
        sums.add("skipped", n_skip)
        if not idx:
            continue
        x, y = x.to(device), y.to(device)
        logits, masks = rts.explain(x)  # masks of the predicted classes, (N, H/4, W/4)
        pred = logits.argmax(1)
        _, parts = rts_loss(rts.classifier, x, masks, pred, **(loss_kwargs or {}))
        for k in LOSS_PARTS:
            sums.add(f"loss/{k}", float(parts[k]) * len(x))
        sums.add("area", float(masks.mean(dim=(1, 2)).sum()))
        sums.add("correct", int((pred == y).sum()))
        sums.add("images", len(x))
        if boxes is not None:
            _add_pointing(sums, idx, masks, boxes, x.shape[-2:])
    s = sums.all_reduce().sums if distributed.world_size() > 1 else sums.sums  # sums over the ranks
    seen = int(s.get("images", 0))
    out: Dict[str, Any] = {
        "loss": {k: s.get(f"loss/{k}", 0.0) / max(seen, 1) for k in LOSS_PARTS},
        "mean_mask_area": s.get("area", 0.0) / max(seen, 1),
        "classifier_accuracy": int(s.get("correct", 0)) / max(seen, 1),
        "images": seen,
        "skipped": int(s.get("skipped", 0)),
    }
    if boxes is not None:
        pointed = s.get("pointed", 0.0)
        out["pointing_top20"] = s["hits"] / pointed if pointed else None
        out["pointing_images"] = int(pointed)
    return out


def _add_pointing(sums: MetricSums, idx: List[int], masks: torch.Tensor, boxes, size) -> None:
    """Add the pointing game's hits and images of one batch (the images that have a box) to ``sums``."""
    with_box = [j for j, i in enumerate(idx) if i in boxes]
    if with_box:
        up = upsample_maps(masks[with_box], size)
        b = torch.tensor([boxes[idx[j]] for j in with_box], device=masks.device)
        sums.add("hits", pointing_game(up, b) * len(with_box))
        sums.add("pointed", len(with_box))


class _Indexed(Dataset):
    """``(index, item)`` of a data set, so a batch knows which images (and boxes) it holds."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return i, self.dataset[i]


def _collate_indexed(batch):
    """``(indices, x (N, 3, H, W), y (N,), n_skipped)`` of the readable items (``None``: skipped)."""
    kept = [(i, item) for i, item in batch if item is not None]
    if not kept:
        return [], None, None, len(batch)
    x = torch.stack([item[0] for _, item in kept])
    y = torch.as_tensor([item[1] for _, item in kept])
    return [i for i, _ in kept], x, y, len(batch) - len(kept)
