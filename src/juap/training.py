"""Training and evaluating classifiers (Table I): SGD with the paper's crop + flip augmentation."""

from __future__ import annotations

import logging
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .classifiers import Classifier
from .config import TrainConfig

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; an unavailable device is a clear error."""
    from .errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device = {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {device!r} was asked but no CUDA GPU is available; use device=cpu")
    return dev


@torch.no_grad()
def evaluate_accuracy(
    clf: Classifier, loader: DataLoader, *, device: torch.device, progress: bool = False
) -> Dict:
    """Top-1 accuracy of ``clf`` over ``loader`` (batches ``(x, y, n_skipped)``), as counts and a ratio."""
    clf.eval()
    correct = total = skipped = 0
    for x, y, n_skip in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        skipped += n_skip
        if len(y) == 0:
            continue
        pred = clf(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return {"correct": correct, "total": total, "skipped": skipped, "accuracy": correct / max(total, 1)}


def train_classifier(
    clf: Classifier,
    train_loader: DataLoader,
    test_loader: DataLoader | None,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
) -> Dict:
    """Train ``clf`` in place with SGD (Nesterov momentum, cosine schedule), then measure test accuracy.

    Args:
        clf: the classifier (its own normalisation inside); trained in place.
        train_loader: augmented training batches ``(x, y, n_skipped)``.
        test_loader: held-out batches for the final top-1 accuracy (Table I), or None.
        cfg: epochs, batch size, learning rate and regularisation.

    Returns:
        Metrics: ``test_accuracy``, ``train_accuracy`` (last epoch, on augmented data), timings, counts.
    """
    clf.to(device).train()
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
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="train-classifier", disable=not progress, dynamic_ncols=True)
    skipped = 0
    for epoch in range(cfg.epochs):
        clf.train()
        correct = seen = 0
        for x, y, n_skip in train_loader:
            skipped += n_skip
            if len(y) == 0:
                bar.update(1)
                sched.step()
                continue
            x, y = x.to(device), y.to(device)
            logits = clf(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{cfg.epochs}",
                loss=f"{loss.item():.3f}",
                acc=f"{correct / max(seen, 1):.3f}",
            )
            bar.update(1)
    bar.close()
    train_time = time.perf_counter() - t0
    metrics: Dict = {
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": round(train_time, 2),
        "epochs": cfg.epochs,
        "train_images": len(train_loader.dataset),
        "skipped_images": skipped,
    }
    if test_loader is not None:
        ev = evaluate_accuracy(clf, test_loader, device=device, progress=progress)
        metrics.update(
            test_accuracy=ev["accuracy"], test_images=ev["total"], skipped_images=skipped + ev["skipped"]
        )
    clf.eval()
    return metrics
