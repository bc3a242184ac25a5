"""``juap train-rts``: train the RTS masking model (eq 12) for a classifier checkpoint and write a run folder.

``run_train_rts`` loads the classifier checkpoint a config names, refuses one that does not fit the data,
trains :class:`~juap.interpreters.rts.RTS` with :meth:`RTS.fit <juap.interpreters.rts.RTS.fit>`, measures
it on the test split with :func:`~juap.interpreters.rts_training.evaluate_rts` (loss parts, mean mask area,
and on data with object boxes the pointing game) and writes ``rts.safetensors``, ``metrics.json``,
``config.yaml`` and ``split.json`` into the run folder. The training itself lives in the core
(:mod:`juap.interpreters.rts_training`); this module holds the command's config and its steps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Sequence

import torch

from ..app.history import RunLog
from ..app.runs import finish_run
from ..classifiers import Classifier
from ..data import (
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
from ..interpreters.rts import RTS, save_rts
from ..interpreters.rts_training import (  # noqa: F401  (LOSS_PARTS, train_rts: their old home, re-exported)
    LOSS_PARTS,
    RTSModelConfig,
    RTSTrainConfig,
    evaluate_rts,
    train_rts,
)
from ..runtime import distributed
from ..runtime.config import to_dict
from ..runtime.distributed import resolve_device
from ..runtime.io import read_metadata
from ..runtime.loop import Checkpointing
from .build import build_classifier
from .configs import ClassifierConfig, DataConfig, LogConfig

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


# -- config -----------------------------------------------------------------------------------------
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


# The command's steps in order: data, classifier, train (RTS.fit), measure, save.
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
    checkpoint = Checkpointing(run_dir, checkpoint_every, resume)
    metrics = rts.fit(loader, cfg.train, device=device, progress=progress, checkpoint=checkpoint, log=run_log)
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
