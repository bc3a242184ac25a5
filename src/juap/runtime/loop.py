"""The training-loop plumbing shared by every trainer: sharding, DDP, per-rank state, checkpoints."""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import DataLoader

from . import distributed


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

    from ..data import InMemoryLoader
    from ..errors import ConfigError

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
    from ..errors import CheckpointError

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
