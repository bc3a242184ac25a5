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

from . import distributed
from .classifiers import Classifier
from .config import TrainConfig

log = logging.getLogger(__name__)

# -- data-parallel helpers (torchrun; see juap.distributed) -------------------------------------------
# Under torchrun every rank trains a DistributedDataParallel copy on its own shard of each global batch.
# A loss that is a mean over a rank's slice, averaged over the ranks by DDP, is the mean over the global
# batch when the slices are equal (train.batch_size divisible by the number of processes). BatchNorm:
# on CUDA the model's BatchNorm layers become SyncBatchNorm for the training (batch statistics over the
# global batch, as in one process) and are put back afterwards; on CPU/gloo (no SyncBatchNorm there)
# each rank normalises with its own slice's statistics -- a smaller effective BN batch, the usual
# data-parallel behaviour -- and rank 0's running statistics are kept (DDP broadcasts them every step
# and once more at the end), so every rank ends with the same model.


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce); ``flag`` itself alone."""
    if distributed.world_size() == 1:
        return flag
    t = distributed.global_count(int(bool(flag)), device=distributed._collective_device())
    return bool(t.item() > 0)


def shard_train_loader(loader):
    """This rank's view of a training loader: the same number of *global* steps, a disjoint share of each.

    An :class:`~juap.data.InMemoryLoader` yields this rank's contiguous slice of every global batch (the
    same batches and augmentation draws as one process); a ``DataLoader`` is rebuilt with a
    ``DistributedSampler`` (seeded with the loader's seed; call ``sampler.set_epoch`` every epoch) and
    ``batch_size / world_size`` images per rank. Alone (one process) the loader itself.

    Raises:
        ConfigError: another kind of loader (it cannot be shared out between the ranks).
    """
    import copy

    from torch.utils.data import DistributedSampler, RandomSampler

    from .data import InMemoryLoader
    from .errors import ConfigError

    w = distributed.world_size()
    if w == 1:
        return loader
    if isinstance(loader, InMemoryLoader):
        out = copy.copy(loader)  # shares the generator: the global batch order is drawn as in one process
        out.shard = True
        return out
    if isinstance(loader, DataLoader) and loader.batch_size is not None:
        distributed.check_divisible(loader.batch_size, "train.batch_size")
        seed = int(loader.generator.initial_seed()) if loader.generator is not None else 0
        sampler = DistributedSampler(
            loader.dataset,
            num_replicas=w,
            rank=distributed.rank(),
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
            drop_last=loader.drop_last,
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size // w,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            generator=torch.Generator().manual_seed(distributed.rank_seed(seed)),  # worker seeds per rank
        )
    raise ConfigError(
        f"a training loader of type {type(loader).__name__} cannot be shared out between torchrun ranks: "
        "use a torch DataLoader with a batch_size, or juap.data.InMemoryLoader"
    )


def set_epoch(loader, epoch: int) -> None:
    """Tell a ``DistributedSampler`` (of a :func:`shard_train_loader` loader) which epoch starts."""
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


class _RankStride(torch.utils.data.Sampler):
    """Indices ``rank, rank + W, rank + 2W, ...`` of a data set: disjoint shares covering it once."""

    def __init__(self, n: int) -> None:
        self.indices = range(distributed.rank(), n, distributed.world_size())

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def shard_eval_loader(loader):
    """A ``DataLoader`` over this rank's disjoint share of the images (no padding: every image is counted
    once over the ranks); the loader itself alone, or when it is not a plain batched DataLoader."""
    if distributed.world_size() == 1 or not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=_RankStride(len(loader.dataset)),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def _local_eval_batches(loader):
    """This rank's slice of every ``(x, y, n_skipped)`` batch; rank 0 counts the skipped images."""
    for x, y, n_skip in loader:
        lo, hi = distributed.slice_bounds(len(y))
        yield x[lo:hi], y[lo:hi], (n_skip if distributed.is_main() else 0)


def gather_rank_states(state: Dict) -> list | None:
    """Every rank's ``state`` (a list, rank order) for a checkpoint; None alone."""
    if distributed.world_size() == 1:
        return None
    from .checkpoint import cpu_copy

    out: list = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, cpu_copy(state))
    return out


def this_rank_state(state: Dict, kind: str) -> Dict | None:
    """This rank's part of a checkpoint written by :func:`gather_rank_states` (None: a one-process one).

    Raises:
        CheckpointError: the checkpoint was written by another number of processes.
    """
    from .errors import CheckpointError

    ranks = state.get("ranks")
    saved = len(ranks) if ranks else 1
    if saved != distributed.world_size():
        raise CheckpointError(
            f"the {kind} checkpoint was written by {saved} process(es) but this run has "
            f"{distributed.world_size()}: resume with the same number of processes (torchrun "
            "--nproc_per_node), or start a new run folder"
        )
    return ranks[distributed.rank()] if ranks else None


def open_loop_checkpoints(
    train_loader,
    *,
    checkpoint_dir,
    checkpoint_every: int | None,
    kind: str,
    resume: bool,
    max_rollbacks: int,
):
    """The checkpoints of an epoch loop (every ``checkpoint_every`` steps, default one epoch or 200
    steps), the state to resume from (this rank's part merged in) and the resumable training loader.

    Returns:
        ``(ckpt, state or None, loader)``.
    """
    from .checkpoint import LoopCheckpoints, ResumableLoader

    ckpt = LoopCheckpoints(
        checkpoint_dir,
        every=checkpoint_every or min(200, max(1, len(train_loader))),
        kind=kind,
        resume=resume,
        max_rollbacks=max_rollbacks,
        write=distributed.is_main(),
    )
    if resume:  # under torchrun: rank 0's last write is done before any rank reads
        distributed.barrier()
    state = ckpt.resume_state()
    mine = this_rank_state(state, kind) if state is not None else None
    if mine is not None:  # this rank's data position, RNG states and counts
        state = {**state, **mine}
    return ckpt, state, ResumableLoader(train_loader, state and state["data"])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank; nothing alone."""
    if distributed.world_size() == 1:
        return
    for b in module.buffers():
        torch.distributed.broadcast(b.data, src=0)


def to_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> list:
    """On CUDA under torchrun, swap ``module``'s BatchNorm layers for SyncBatchNorm (sharing their
    parameters and buffers); returns what :func:`restore_batchnorm` needs. Elsewhere nothing changes."""
    if distributed.world_size() == 1 or device.type != "cuda":
        return []
    swapped = []
    for name, m in list(module.named_modules()):
        if (
            name
            and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, torch.nn.SyncBatchNorm)
        ):
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
            setattr(parent, child, sync)
            swapped.append((parent, child, m))
    return swapped


def restore_batchnorm(swapped: list) -> None:
    """Put back the BatchNorm layers :func:`to_sync_batchnorm` swapped out (they share the trained
    parameters and statistics)."""
    for parent, child, original in swapped:
        original.train(getattr(parent, child).training)
        setattr(parent, child, original)


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
    """Top-1 accuracy of ``clf`` over ``loader`` (batches ``(x, y, n_skipped)``), as counts and a ratio.

    Under torchrun each rank classifies a disjoint share of a ``DataLoader``'s images (another iterable:
    its slice of every batch) and the counts are added over the ranks, so every rank returns the counts
    of the whole loader.
    """
    clf.eval()
    correct = total = skipped = 0
    world = distributed.world_size()
    batches = shard_eval_loader(loader)
    if world > 1 and batches is loader:  # not a DataLoader: this rank's slice of every batch
        batches = _local_eval_batches(loader)
    for x, y, n_skip in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        skipped += n_skip
        if len(y) == 0:
            continue
        pred = clf(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    if world > 1:
        sums = distributed.all_reduce_sums({"correct": correct, "total": total, "skipped": skipped})
        correct, total, skipped = (int(sums[k]) for k in ("correct", "total", "skipped"))
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

    Under torchrun (:mod:`juap.distributed`) the model trains as DistributedDataParallel, each rank on
    its share of every global batch of ``cfg.batch_size`` images (:func:`shard_train_loader`; the batch
    size must divide by the number of processes); the schedule counts global steps, the accuracies are
    sums and counts added over the ranks, rank 0 alone writes checkpoints and shows progress, and every
    rank reads the checkpoint on resume (with the same number of processes). See the note on BatchNorm
    at the top of this module.

    Returns:
        Metrics: ``test_accuracy``, ``train_accuracy`` (last epoch, on augmented data), timings, counts.
    """
    from .checkpoint import (
        cpu_copy,
        lower_lr,
        lr_settings,
        rng_states,
        set_rng_states,
    )
    from .errors import NumericalError

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
