"""The demo's models, trained once per config and kept in the cache (``JUAP_CACHE``, default ~/.cache/juap).

`juap demo`, grid experiments that name ``weights: demo`` and the benchmarks all load them from here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..classifiers import Classifier, load_classifier, save_classifier
from ..data import DataSplits, load_splits
from ..data.synthetic import default_cache_dir
from ..runtime import distributed
from ..runtime.config import config_hash, to_dict
from ..runtime.distributed import resolve_device
from ..runtime.io import write_json
from .build import build_classifier
from .train_classifier import TrainClassifierConfig, train_on_splits
from .train_rts import RTSTrainConfig, TrainRTSConfig, run_train_rts

RTS_EPOCHS = 2  # the demo's RTS model: enough on the embedded data (pointing game in its metrics.json)


def demo_classifier_path(cfg: TrainClassifierConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`cached_demo_classifier` keeps the classifier trained with ``cfg``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache / "demo" / f"classifier-{cfg.classifier.name}-{config_hash(_model_key(cfg))}.safetensors"


def cached_demo_classifier(
    cfg: TrainClassifierConfig, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Tuple[Classifier, DataSplits, Dict[str, Any], bool]:
    """Train the demo classifier once per config and reuse it from the cache afterwards.

    Returns:
        (classifier, splits, metrics, was_cached).
    """
    ckpt = demo_classifier_path(cfg, cache_dir)
    meta_path = ckpt.with_suffix(".json")
    splits = load_splits(cfg.data, augment_train=True, progress=progress)
    if ckpt.is_file() and meta_path.is_file():
        return load_classifier(ckpt), splits, json.loads(meta_path.read_text()), True
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    t0 = time.perf_counter()
    metrics = train_on_splits(clf, splits, cfg, device=device, progress=progress)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
    clf.cpu()
    save_classifier(clf, ckpt, classes=splits.classes)
    write_json(meta_path, metrics)
    return clf, splits, metrics, False


def cached_demo_rts(
    ccfg: TrainClassifierConfig, *, epochs: int, seed: int, cache: Path, progress: bool = True
) -> Tuple[Path, Dict[str, Any], bool]:
    """Train the demo classifier's RTS model once and reuse it; returns (checkpoint, metrics, was_cached)."""
    key = config_hash({"classifier": _model_key(ccfg), "rts_epochs": epochs})
    folder = cache / "demo" / f"rts-{key}"
    ckpt = folder / "rts.safetensors"
    if ckpt.is_file() and (folder / "metrics.json").is_file():
        return ckpt, json.loads((folder / "metrics.json").read_text()), True
    clf_ckpt = demo_classifier_path(ccfg, cache)
    cfg = TrainRTSConfig(
        data=ccfg.data,
        classifier=dataclasses.replace(ccfg.classifier, weights=str(clf_ckpt)),
        train=RTSTrainConfig(epochs=epochs),
        seed=seed,
        device=ccfg.device,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary folder: two runs training at once (e.g. two shards) never clobber each other.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    metrics = run_train_rts(cfg, tmp, progress=progress)
    try:
        tmp.rename(folder)
    except OSError:  # another run finished first: keep its model
        shutil.rmtree(tmp, ignore_errors=True)
        return ckpt, json.loads((folder / "metrics.json").read_text()), True
    return ckpt, metrics, False


def demo_models(*, cache_dir=None, need_rts: bool = True, progress: bool = True) -> Tuple[str, Optional[str]]:
    """Paths of the cached demo classifier and its RTS model (trained on first use, as ``juap demo`` does)."""
    return _demo_models(Path(cache_dir) if cache_dir else default_cache_dir(), need_rts, progress)


@functools.cache  # once per process and cache folder: every cell of a grid asks again
def _demo_models(cache: Path, need_rts: bool, progress: bool) -> Tuple[str, Optional[str]]:
    ccfg = TrainClassifierConfig()
    rts = None
    with distributed.main_first():  # under torchrun rank 0 trains and caches them, then the others load
        cached_demo_classifier(ccfg, cache_dir=cache, progress=progress and distributed.is_main())
        if need_rts:
            rts, _, _ = cached_demo_rts(
                ccfg, epochs=RTS_EPOCHS, seed=0, cache=cache, progress=progress and distributed.is_main()
            )
    return str(demo_classifier_path(ccfg, cache)), (str(rts) if rts else None)


def _model_key(cfg: TrainClassifierConfig) -> Dict[str, Any]:
    """What a cached model depends on: the config without what only changes the logging."""
    return {k: v for k, v in to_dict(cfg).items() if k != "log"}
