"""The demo's models: the classifier and its learned interpreter (RTS) shipped inside the package.

Float kernels differ between CPUs, so a demo classifier trained on each machine drifts, and so does every
figure after it (the headline verdicts flipped between an AVX512 machine and an AMD Zen 3). The package
therefore ships the two models as trained by ``juap train-classifier`` and ``juap train-rts`` (in
``juap/weights/demo/``, with their sha256 and the command lines that made them in ``manifest.json``; how
to remake them: ``juap/weights/demo/README.md``). `juap demo`, grid experiments that name ``weights: demo``
(``checkpoints: {rts: demo}``) and the benchmarks load them, checking the hash. A config other than the
shipped models' (``--set train.epochs=...``, ``demo.rts_epochs``) or ``retrain`` trains them on this
machine instead, once per config, into the cache (``JUAP_CACHE``, default ~/.cache/juap).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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
from ..errors import CheckpointError
from ..runtime import distributed
from ..runtime.config import config_hash, to_dict
from ..runtime.distributed import resolve_device
from ..runtime.io import write_json
from .build import build_classifier
from .train_classifier import TrainClassifierConfig, train_on_splits
from .train_rts import RTSTrainConfig, TrainRTSConfig, run_train_rts

RTS_EPOCHS = 2  # the demo's RTS model: enough on the embedded data (pointing game in its metrics.json)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "weights" / "demo"
RETRAIN_HINT = "or train the demo models on this machine instead: juap demo --set demo.retrain=true"


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """One demo model: its file, its training metrics and where it came from."""

    path: Path
    metrics: Dict[str, Any]
    source: str  # "shipped" (inside the package), "cache" (trained here earlier) or "trained" (just now)


# -- the shipped models ---------------------------------------------------------------------------------
def read_manifest(folder: Path = SHIPPED_DIR) -> Dict[str, Any]:
    """``manifest.json`` of the shipped demo models: per model its file, sha256, config key, command line
    and training metrics (``{}`` when the package ships none)."""
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_model(kind: str, key: str, folder: Path = SHIPPED_DIR) -> Optional[DemoModel]:
    """The shipped model ``kind`` (``classifier`` or ``rts``) when it was trained with the config whose
    key is ``key`` (:func:`classifier_key`, :func:`rts_key`); None when the package ships none for it.

    Raises:
        CheckpointError: the file is missing or its sha256 is not the manifest's (a damaged install).
    """
    entry = read_manifest(folder).get("models", {}).get(kind)
    if not entry or entry.get("key") != key:
        return None
    path = folder / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"the shipped demo {kind} {path} is missing: reinstall juap, {RETRAIN_HINT}")
    got = sha256_of(path)
    if got != entry["sha256"]:
        raise CheckpointError(
            f"the shipped demo {kind} {path} is damaged: its sha256 is {got}, manifest.json says "
            f"{entry['sha256']}. Reinstall juap, {RETRAIN_HINT}"
        )
    return DemoModel(path, dict(entry.get("metrics", {})), "shipped")


def classifier_key(cfg: TrainClassifierConfig) -> str:
    """What the demo classifier depends on: its training config without what only changes the logging."""
    return config_hash(_model_key(cfg))


def rts_key(cfg: TrainClassifierConfig, epochs: int, seed: Optional[int] = None) -> str:
    """What the demo RTS model depends on: its classifier's config, its epochs and its seed (when other
    than the classifier's)."""
    key: Dict[str, Any] = {"classifier": _model_key(cfg), "rts_epochs": epochs}
    if seed is not None and seed != cfg.seed:
        key["seed"] = seed
    return config_hash(key)


# -- the demo's models: shipped, else trained once into the cache -------------------------------------
def demo_classifier(
    cfg: TrainClassifierConfig,
    splits: Optional[DataSplits] = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> DemoModel:
    """The demo classifier trained with ``cfg``: the shipped one (unless ``retrain``), else the cache's,
    else trained now into the cache on ``splits`` (default: ``cfg.data``'s, read when needed)."""
    shipped = None if retrain else shipped_model("classifier", classifier_key(cfg))
    if shipped is not None:
        return shipped
    ckpt = demo_classifier_path(cfg, cache_dir)
    meta_path = ckpt.with_suffix(".json")
    if ckpt.is_file() and meta_path.is_file():
        return DemoModel(ckpt, json.loads(meta_path.read_text()), "cache")
    if splits is None:
        splits = load_splits(cfg.data, augment_train=True, progress=progress)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    clf = build_classifier(cfg.classifier, num_classes=splits.num_classes)
    t0 = time.perf_counter()
    metrics = train_on_splits(clf, splits, cfg, device=device, progress=progress)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
    save_classifier(clf.cpu(), ckpt, classes=splits.classes)
    write_json(meta_path, metrics)
    return DemoModel(ckpt, metrics, "trained")


def demo_rts(
    cfg: TrainClassifierConfig,
    classifier: DemoModel,
    *,
    epochs: int = RTS_EPOCHS,
    seed: Optional[int] = None,
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> DemoModel:
    """The RTS model of the demo classifier (``classifier``, trained with ``cfg``), trained for ``epochs``
    with ``seed`` (default: ``cfg.seed``) by ``juap train-rts``: the shipped one (unless ``retrain``), else
    the cache's, else trained now into the cache."""
    key = rts_key(cfg, epochs, seed)
    shipped = None if retrain else shipped_model("rts", key)
    if shipped is not None:
        return shipped
    folder = _cache(cache_dir) / "demo" / f"rts-{key}"
    ckpt = folder / "rts.safetensors"
    if ckpt.is_file() and (folder / "metrics.json").is_file():
        return DemoModel(ckpt, json.loads((folder / "metrics.json").read_text()), "cache")
    rts_cfg = TrainRTSConfig(
        data=cfg.data,
        classifier=dataclasses.replace(cfg.classifier, weights=str(classifier.path)),
        train=RTSTrainConfig(epochs=epochs),
        seed=cfg.seed if seed is None else seed,
        device=cfg.device,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary folder: two runs training at once (e.g. two shards) never clobber each other.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    metrics = run_train_rts(rts_cfg, tmp, progress=progress)
    try:
        tmp.rename(folder)
    except OSError:  # another run finished first: keep its model
        shutil.rmtree(tmp, ignore_errors=True)
        return DemoModel(ckpt, json.loads((folder / "metrics.json").read_text()), "cache")
    return DemoModel(ckpt, metrics, "trained")


def demo_classifier_path(cfg: TrainClassifierConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`demo_classifier` keeps the classifier it trains with ``cfg`` in the cache."""
    return _cache(cache_dir) / "demo" / f"classifier-{cfg.classifier.name}-{classifier_key(cfg)}.safetensors"


def cached_demo_classifier(
    cfg: TrainClassifierConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> Tuple[Classifier, DataSplits, Dict[str, Any], bool]:
    """The demo classifier loaded (:func:`demo_classifier`) with its data's splits.

    Returns:
        ``(classifier, splits, metrics, not trained now)``; ``metrics["source"]`` says where it came from.
    """
    splits = load_splits(cfg.data, augment_train=True, progress=progress)
    model = demo_classifier(cfg, splits, cache_dir=cache_dir, retrain=retrain, progress=progress)
    clf = load_classifier(model.path)
    return clf, splits, {**model.metrics, "source": model.source}, model.source != "trained"


def cached_demo_rts(
    ccfg: TrainClassifierConfig,
    *,
    epochs: int,
    cache: Path,
    seed: Optional[int] = None,
    retrain: bool = False,
    progress: bool = True,
) -> Tuple[Path, Dict[str, Any], bool]:
    """The demo classifier's RTS model (:func:`demo_rts`); the classifier must be there already (shipped,
    or trained into ``cache`` by :func:`cached_demo_classifier`).

    Returns:
        ``(checkpoint, metrics, not trained now)``; ``metrics["source"]`` says where it came from.
    """
    clf = demo_classifier(ccfg, cache_dir=cache, retrain=retrain, progress=progress)
    model = demo_rts(ccfg, clf, epochs=epochs, seed=seed, cache_dir=cache, retrain=retrain, progress=progress)
    return model.path, {**model.metrics, "source": model.source}, model.source != "trained"


def demo_models(
    *,
    cache_dir=None,
    learned: bool = True,
    progress: bool = True,
) -> Tuple[str, Optional[str]]:
    """Paths of the demo classifier and of its learned interpreter's model (RTS; None unless ``learned``),
    as ``juap demo`` uses them: the shipped ones, else trained once into the cache."""
    return _demo_models(_cache(cache_dir), learned, progress)


@functools.cache  # once per process and cache folder: every cell of a grid asks again
def _demo_models(cache: Path, learned: bool, progress: bool) -> Tuple[str, Optional[str]]:
    ccfg = TrainClassifierConfig()
    progress = progress and distributed.is_main()
    with distributed.main_first():  # under torchrun rank 0 trains and caches them, then the others load
        clf = demo_classifier(ccfg, cache_dir=cache, progress=progress)
        rts = demo_rts(ccfg, clf, cache_dir=cache, progress=progress) if learned else None
    return str(clf.path), (str(rts.path) if rts else None)


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _model_key(cfg: TrainClassifierConfig) -> Dict[str, Any]:
    """What a cached model depends on: the config without what only changes the logging."""
    return {k: v for k, v in to_dict(cfg).items() if k != "log"}
