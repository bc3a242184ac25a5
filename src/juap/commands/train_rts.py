"""``juap train-rts``: train the RTS masking model (eq 12) for a classifier checkpoint and write a run folder.

``run_train_rts`` loads the classifier checkpoint a config names, refuses one that does not fit the data,
trains :class:`~juap.interpreters.rts.RTS` with :func:`~juap.interpreters.rts_training.train_rts`, measures
it on the test split with :func:`~juap.interpreters.rts_training.evaluate_rts` (loss parts, mean mask area,
and on data with object boxes the pointing game) and writes ``rts.safetensors``, ``metrics.json``,
``config.yaml`` and ``split.json`` into the run folder. The training itself lives in the core
(:mod:`juap.interpreters.rts_training`); this module holds the command's config (its YAML sections, whose
defaults are read from the core's signatures) and its steps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Literal, Sequence

import torch

from ..app.history import RunLog
from ..app.runs import finish_run
from ..classifiers import Classifier
from ..data import (
    DataSplits,
    data_set,
    data_summary,
    drop_last_for,
    load_splits,
    make_loader,
    require_classes,
    save_split,
)
from ..data.synthetic import boxes_by_test_index
from ..errors import CheckpointError, ConfigError
from ..interpreters.rts import ENCODERS, RTS, rts_loss, save_rts
from ..interpreters.rts_training import LOSS_WEIGHTS, RTSTrainer, evaluate_rts, train_rts
from ..runtime import distributed
from ..runtime.config import check_range, signature_defaults, to_dict
from ..runtime.distributed import resolve_device
from ..runtime.io import read_metadata
from ..runtime.loop import Checkpointing
from .build import build_classifier
from .configs import ClassifierConfig, DataConfig, LogConfig

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


# -- config -----------------------------------------------------------------------------------------
_MODEL = signature_defaults(RTS)  # the masking model's defaults: its constructor's
_TRAIN = {**signature_defaults(rts_loss), **signature_defaults(RTSTrainer)}  # eq 12's and the trainer's


@dataclasses.dataclass(frozen=True)
class RTSModelConfig:
    """The ``rts`` section: the masking model's encoder (the classifier's features, or a pretrained ResNet)
    and width (:class:`~juap.interpreters.rts.RTS`; the defaults are its constructor's)."""

    encoder: str = _MODEL["encoder"]
    encoder_weights: str | None = _MODEL["encoder_weights"]
    width: int = _MODEL["width"]

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
    """The ``train`` section: Adam on eq 12 (:class:`~juap.interpreters.rts_training.RTSTrainer`; the
    defaults are its constructor's and :func:`~juap.interpreters.rts.rts_loss`'s): ``tv_weight`` l1,
    ``area_weight`` l2, ``destroy_weight`` l3, ``destroy_power`` l4.

    ``blur_sigma`` (pixels; ``None``: 10 px at 224, scaled with the image side) blurs the replacement
    image; ``fake_label_prob`` is the share of samples trained with a random wrong class selector (whose
    mask must vanish, as Dabkowski & Gal do); ``target`` is the class the masks learn to explain: the
    classifier's prediction (as an attack and the evaluation use them) or the true label (as D&G do);
    ``batch_size`` and ``augment`` shape the training data; ``max_minutes`` bounds the training time.
    """

    epochs: int = _TRAIN["epochs"]
    batch_size: int = 64
    lr: float = _TRAIN["lr"]
    weight_decay: float = _TRAIN["weight_decay"]
    tv_weight: float = _TRAIN["tv_weight"]
    area_weight: float = _TRAIN["area_weight"]
    area_power: float = _TRAIN["area_power"]
    destroy_weight: float = _TRAIN["destroy_weight"]
    destroy_power: float = _TRAIN["destroy_power"]
    tv_power: float = _TRAIN["tv_power"]
    blur_sigma: float | None = _TRAIN["blur_sigma"]
    fake_label_prob: float = _TRAIN["fake_label_prob"]
    target: Literal["predicted", "label"] = _TRAIN["target"]
    augment: bool = True
    max_minutes: float = _TRAIN["max_minutes"]

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
        return {k: getattr(self, k) for k in LOSS_WEIGHTS}

    def trainer_settings(self) -> Dict[str, Any]:
        """The keyword settings of :func:`~juap.interpreters.rts_training.train_rts` (all but the data's)."""
        return {k: v for k, v in to_dict(self).items() if k not in ("batch_size", "augment")}


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


# The command's steps in order: data, classifier, train (train_rts), measure, save.
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
    loader = _train_loader(splits, cfg)
    run_log = RunLog(run_dir, tensorboard=cfg.log.tensorboard, title="juap train-rts")
    checkpoint = Checkpointing(run_dir, checkpoint_every, resume)
    metrics = train_rts(
        rts, loader, device=device, progress=progress, checkpoint=checkpoint, log=run_log,
        batch_size=cfg.train.batch_size, **cfg.train.trainer_settings(),
    )  # fmt: skip
    if distributed.is_main():
        run_log.finish()
    boxes = boxes_by_test_index(splits) if data_set(cfg.data.name).records_boxes else None
    ev = evaluate_rts(
        rts, splits.test, device=device, boxes=boxes, loss_kwargs=cfg.train.loss_kwargs(), progress=progress
    )
    if distributed.is_main():
        save_rts(rts, run_dir / "rts.safetensors", classes=splits.classes)
    metrics.update(
        _test_figures(ev),
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


def _train_loader(splits: DataSplits, cfg: TrainRTSConfig) -> Any:
    """The training batches ``(x, y, n_skipped)``: shuffled from ``cfg.seed``, whole batches only unless
    the split is one batch or less."""
    batch = cfg.train.batch_size
    return make_loader(
        splits.train,
        batch_size=batch,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        drop_last=drop_last_for(len(splits.train), batch),
    )


def _test_figures(ev: Dict[str, Any]) -> Dict[str, Any]:
    """The test split's figures of :func:`evaluate_rts`, under their ``metrics.json`` names."""
    return {
        "test_loss": ev["loss"],
        "mean_mask_area": ev["mean_mask_area"],
        "pointing_top20": ev.get("pointing_top20"),
        "pointing_images": ev.get("pointing_images", 0),
        "classifier_test_accuracy": ev["classifier_accuracy"],
        "test_images": ev["images"],
        "skipped_images": ev["skipped"],
    }
