"""Training and evaluating classifiers (Table I): SGD with the paper's crop + flip augmentation."""

from __future__ import annotations

import logging
import os
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .classifiers import Classifier
from .config import TrainConfig

log = logging.getLogger(__name__)


def _load_training_state(state: Dict, clf: Classifier, opt, sched) -> None:
    """Load a train-classifier checkpoint; one of another architecture or class count is refused."""
    from .errors import CheckpointError

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

    Returns:
        Metrics: ``test_accuracy``, ``train_accuracy`` (last epoch, on augmented data), timings, counts.
    """
    from .checkpoint import (
        LoopCheckpoints,
        ResumableLoader,
        cpu_copy,
        lower_lr,
        lr_settings,
        rng_states,
        set_rng_states,
    )
    from .errors import NumericalError

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
    ckpt = LoopCheckpoints(
        checkpoint_dir,
        every=checkpoint_every or min(200, max(1, len(train_loader))),
        kind="train-classifier",
        resume=resume,
        max_rollbacks=max_rollbacks,
    )
    state = ckpt.resume_state()
    loader = ResumableLoader(train_loader, state and state["data"])
    c = {"step": 0, "epoch": 0, "correct": 0, "seen": 0, "skipped": 0, "seconds": 0.0}

    def snapshot() -> Dict:
        return {
            **c,
            "arch": clf.arch,
            "num_classes": clf.num_classes,
            "model": clf.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data": loader.position(),
            "rng": rng_states(),
        }

    if state is not None:
        _load_training_state(state, clf, opt, sched)
        c.update({k: state[k] for k in c})
        set_rng_states(state["rng"])
    else:
        ckpt.remember(snapshot())
    t0 = time.perf_counter() - c["seconds"]
    bar = tqdm(
        total=steps, initial=c["step"], desc="train-classifier", disable=not progress, dynamic_ncols=True
    )
    for epoch in ckpt.steps(range(c["epoch"], cfg.epochs)):
        clf.train()
        if epoch != c["epoch"]:
            c.update(epoch=epoch, correct=0, seen=0)
        for x, y, n_skip in loader:
            c["step"] += 1
            c["skipped"] += n_skip
            if len(y) == 0:
                bar.update(1)
                sched.step()
                continue
            x, y = x.to(device), y.to(device)
            logits = clf(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
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
    correct, seen, skipped = c["correct"], c["seen"], c["skipped"]
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
