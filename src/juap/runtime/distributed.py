"""Data-parallel runs under ``torchrun``: the process group, batch slices, and all-reduced sums.

This module knows only torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
...), how to give each rank its share of a batch, and how to add sums and counts across ranks. Without
torchrun's variables every function is a single-process no-op, so library code calls them
unconditionally.

The scheme that makes a world of W processes compute what one process computes on the same global
batch: every rank draws the *same* global batches (same seed, same order) and keeps a contiguous slice
of each (:func:`local_slice`); a loss that is a mean over the global batch is computed from sums and
counts added across ranks with an autograd-aware all-reduce (:func:`global_sum`), so every rank holds
the global loss; DistributedDataParallel then averages the per-rank parameter gradients, which equals
the one-process gradient (see :func:`global_sum`). Metrics are sums and counts all-reduced
(:func:`all_reduce_sums`), never averages of averages.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import logging
import os
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch.distributed.nn.functional import all_reduce
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from ..errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_owns_group = False  # True when init_from_env created the process group (cleanup then destroys it)
_solo = 0  # > 0 inside main_first: the block runs on one rank at a time, as if alone (no collectives)

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when torchrun's variables (``RANK``, ``WORLD_SIZE``) are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group, and inside :class:`main_first`)."""
    return dist.get_world_size() if is_initialized() and not _solo else 1


def local_rank() -> int:
    """The rank on this node (``LOCAL_RANK``; picks the GPU), 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0: the only rank that writes files, prints and shows progress bars."""
    return rank() == 0


def init_from_env(backend: str = "auto", *, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment; a no-op without it.

    Args:
        backend: ``"auto"`` (NCCL when CUDA is available, else gloo), ``"gloo"`` or ``"nccl"``.
            ``JUAP_DIST_BACKEND`` overrides ``"auto"``.
        timeout_s: how long a collective waits for the other ranks before failing.

    Returns:
        True when this process is part of a group of more than one process.

    Raises:
        ConfigError: an unknown backend, NCCL without a CUDA GPU, more local ranks than GPUs, or a
            partial torchrun environment.
    """
    global _owns_group
    if backend == "auto":
        backend = os.environ.get("JUAP_DIST_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"distributed backend = {backend!r}; allowed values: {', '.join(BACKENDS)}")
    if is_initialized():
        return world_size() > 1
    present = [k for k in _ENV if k in os.environ]
    if not launched_by_torchrun():
        if present:
            raise ConfigError(
                f"the environment sets {', '.join(present)} but not both RANK and WORLD_SIZE: launch with "
                "`torchrun --nproc_per_node N -m juap ...`, or unset them for a single process"
            )
        if backend == "nccl" and not torch.cuda.is_available():
            raise _nccl_without_cuda()
        return False
    world = int(os.environ["WORLD_SIZE"])
    lrank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise _nccl_without_cuda()
        if lrank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {lrank} has no GPU: this node has {torch.cuda.device_count()} CUDA device(s); "
                "set torchrun's --nproc_per_node to at most the number of GPUs"
            )
        torch.cuda.set_device(lrank)
    if world == 1:
        return False
    # torch.distributed.nn.functional takes ``group=group.WORLD`` as default arguments, evaluated when it is
    # first imported (by DistributedDataParallel, say): imported after the group exists, it would hold the
    # group forever, so destroy_process_group could not free it and its gloo worker threads would outlive
    # the interpreter (see cleanup). Imported now, the defaults are None.
    importlib.import_module("torch.distributed.nn")

    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _owns_group = True
    log.debug("rank %d of %d joined the %s process group", rank(), world, backend)
    return True


def _nccl_without_cuda() -> ConfigError:
    return ConfigError(
        "the nccl backend needs CUDA GPUs, and none is available: use backend gloo (CPU) or "
        "JUAP_DIST_BACKEND=auto, or run on a machine with GPUs"
    )


def cleanup(*, wait_for_others: bool = False) -> None:
    """Leave the process group that :func:`init_from_env` created (safe to call more than once).

    The group is destroyed and freed here, while the interpreter is whole: freeing it joins the gloo
    backend's worker threads. A worker thread still alive when Python finalises can be caught releasing
    the last reference to a tensor of a finished collective; that release needs the GIL, which a
    finalising interpreter no longer hands out, and the process dies with SIGABRT ("terminate called
    without an active exception") after its work is done. So nothing may keep the group alive: objects
    left in reference cycles are collected first, and :func:`init_from_env` imports
    ``torch.distributed.nn`` before the group exists.

    Args:
        wait_for_others: meet the other ranks at a barrier first (the command finished on this rank), so
            no rank leaves while another still sends to it. A failed barrier (another rank has already
            failed and left) is logged, not raised: the error that matters is that rank's.
    """
    global _owns_group
    if _owns_group and is_initialized():
        if wait_for_others and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError as e:  # DistBackendError too: a rank that failed has closed its side
                log.debug("no final barrier: %s", e)
        gc.collect()  # objects in reference cycles (a DDP wrapper, say) may still hold the group
        dist.destroy_process_group()
        gc.collect()
    _owns_group = False


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def rank_seed(seed: int) -> int:
    """A seed for this rank derived from the run's ``seed`` (equal to ``seed`` on rank 0 and alone).

    Use it for randomness that must differ between ranks (augmentation); randomness that must agree
    (a generator's initialisation and noise, the global batch order) keeps the run's seed.
    """
    return (int(seed) + 1_000_003 * rank()) % (2**63 - 1)


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; other devices are kept."""
    if device.type == "cuda" and device.index is None and is_initialized():
        return torch.device("cuda", local_rank())
    return device


# -- batches -----------------------------------------------------------------------------------------
def check_divisible(batch_size: int, what: str = "batch_size") -> None:
    """A global batch must split into equal per-rank slices: refuse ``batch_size % world_size != 0``."""
    w = world_size()
    if batch_size % w:
        lo, hi = (batch_size // w) * w, -(-batch_size // w) * w
        raise ConfigError(
            f"{what} = {batch_size} is not divisible by the number of processes ({w}): each rank takes an "
            f"equal slice of every global batch; use {what} = {hi}" + (f" or {lo}" if lo else "")
        )


def slice_bounds(n: int, *, rank_: Optional[int] = None, world: Optional[int] = None) -> Tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous slice of a global batch of ``n`` items.

    Slices differ in size by at most one (the first ``n % world`` ranks get one more) and cover the batch
    exactly once, so sums over the slices equal sums over the batch.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def local_slice(x: T) -> T:
    """This rank's contiguous slice of a global batch (a tensor, or None); the batch itself alone."""
    if x is None or world_size() == 1:
        return x
    start, stop = slice_bounds(len(x))
    return x[start:stop]


def local_batches(
    batches: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]], *, skip_small: bool = False
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor], int, int]]:
    """This rank's slices of global batches: ``(x_local, y_local, start, n_global)``.

    Every rank must iterate the same global batches. ``skip_small`` drops a global batch with fewer items
    than ranks (all ranks drop it alike), for training steps where every rank needs data; otherwise a
    rank may get an empty slice.
    """
    w = world_size()
    for x, y in batches:
        n = len(x)
        if skip_small and n < w:
            log.debug("skipping a batch of %d images: fewer than the %d processes", n, w)
            continue
        start, stop = slice_bounds(n)
        yield x[start:stop], (y[start:stop] if y is not None else None), start, n


# -- reductions --------------------------------------------------------------------------------------
def global_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks, differentiable (``torch.distributed.nn.functional.all_reduce``).

    Used to make a loss a function of the *global* batch on every rank: with ``S = sum_r s_r`` every rank
    computes the same ``L(S)``. Backward all-reduces the incoming gradient, so ``s_r`` receives
    ``W * dL/dS``; DistributedDataParallel averages the parameter gradients over the W ranks, which gives
    ``dL/dS * sum_r ds_r/dtheta``: the one-process gradient. Without DDP (plain autograd on every rank)
    divide the loss by :func:`world_size` before backward instead.
    """
    if world_size() == 1:
        return t

    if hasattr(fc, "all_reduce_backward"):  # recent torch: the functional collective has autograd
        out = fc.all_reduce(t, "sum", dist.group.WORLD)
        return out.wait() if hasattr(out, "wait") else out

    return all_reduce(t, op=dist.ReduceOp.SUM)


def global_count(n: int | torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """The number of items over all ranks as a float tensor (no gradient)."""
    t = torch.as_tensor(n, dtype=torch.float64, device=device).clone()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums(sums: Mapping[str, float], device: Optional[torch.device] = None) -> Dict[str, float]:
    """Add ``{key: value}`` sums and counts over the ranks (float64); keys may differ between ranks.

    The union of the keys is agreed first (a key missing on one rank counts as 0 there), so every rank
    returns the same dictionary. Ratios are taken *after* this, never before.
    """
    if world_size() == 1:
        return {k: float(v) for k, v in sums.items()}
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, sorted(sums))
    keys = sorted(set().union(*gathered))
    if not keys:
        return {}
    if device is None:
        device = _collective_device()
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (the object itself alone)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- models ------------------------------------------------------------------------------------------
def wrap_ddp(module: torch.nn.Module, **kw) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there is more than one rank, else ``module`` itself.

    The parameters are broadcast from rank 0 at construction and their gradients averaged over ranks in
    every backward. Keep the unwrapped module for ``state_dict`` and evaluation.
    """
    if world_size() == 1:
        return module

    p = next(iter(module.parameters()), None)
    ids = [p.device.index] if p is not None and p.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **kw)


def refuse_multi_process(command: str) -> None:
    """Fail clearly where a command has no data-parallel path."""
    if world_size() > 1:
        raise ConfigError(
            f"{command} does not run data-parallel yet (this is a {world_size()}-process torchrun launch): "
            f"run it as a single process (`juap {command} ...` without torchrun)"
        )


class main_first:
    """Run a block on rank 0 first, then on the other ranks (e.g. filling a cache once, then reading it).

    Inside the block each rank runs alone: :func:`world_size` is 1 there, so code in it (e.g. training a
    model for a cache) takes the single-process path and makes no collective call that would wait for
    ranks held at the barrier.

    Example:
        >>> with distributed.main_first():
        ...     splits = load_splits(cfg.data)   # rank 0 generates the data set; the others reuse it
    """

    def __enter__(self) -> None:
        global _solo
        if not is_main():
            barrier()
        _solo += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        global _solo
        _solo -= 1
        if is_main() and exc_type is None:
            barrier()
        return False


def check_same_across_ranks(module: torch.nn.Module, what: str) -> None:
    """Refuse a model whose parameters differ between ranks (e.g. each rank built random weights).

    Compares a float64 checksum (sum and sum of squares of the parameters) across ranks.
    """
    if world_size() == 1:
        return
    params = [p.detach().double() for p in module.parameters()]
    local = torch.stack(
        [
            sum((p.sum() for p in params), torch.zeros((), dtype=torch.float64)).cpu(),
            sum(((p * p).sum() for p in params), torch.zeros((), dtype=torch.float64)).cpu(),
        ]
    ).to(_collective_device())
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise ConfigError(
            f"the {what} differs between the torchrun ranks: load the same weights on every rank (a "
            "checkpoint), or seed torch identically on every rank before building it"
        )


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; an unavailable device is a clear error."""

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device = {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {device!r} was asked but no CUDA GPU is available; use device=cpu")
    return dev


# -- sharding: each rank's share of the data ------------------------------------------------------------
def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce); ``flag`` itself alone."""
    if world_size() == 1:
        return flag
    t = global_count(int(bool(flag)), device=_collective_device())
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

    w = world_size()
    if w == 1:
        return loader
    if hasattr(loader, "sharded"):  # e.g. juap.data.InMemoryLoader: it slices its own batches
        return loader.sharded()
    if isinstance(loader, DataLoader) and loader.batch_size is not None:
        check_divisible(loader.batch_size, "train.batch_size")
        seed = int(loader.generator.initial_seed()) if loader.generator is not None else 0
        sampler = DistributedSampler(
            loader.dataset,
            num_replicas=w,
            rank=rank(),
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
            generator=torch.Generator().manual_seed(rank_seed(seed)),  # worker seeds per rank
        )
    raise ConfigError(
        f"a training loader of type {type(loader).__name__} cannot be shared out between torchrun ranks: "
        "use a torch DataLoader with a batch_size, or juap.data.InMemoryLoader"
    )


def set_epoch(loader, epoch: int) -> None:
    """Tell a ``DistributedSampler`` (of a :func:`shard_train_loader` loader) which epoch starts."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


class _RankStride(Sampler):
    """Indices ``rank, rank + W, rank + 2W, ...`` of a data set: disjoint shares covering it once."""

    def __init__(self, n: int) -> None:
        self.indices = range(rank(), n, world_size())

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def shard_eval_loader(loader):
    """A ``DataLoader`` over this rank's disjoint share of the images (no padding: every image is counted
    once over the ranks); the loader itself alone, or when it is not a plain batched DataLoader."""
    if world_size() == 1 or not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=_RankStride(len(loader.dataset)),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def local_eval_batches(loader):
    """This rank's slice of every ``(x, y, n_skipped)`` batch; rank 0 counts the skipped images."""
    for x, y, n_skip in loader:
        lo, hi = slice_bounds(len(y))
        yield x[lo:hi], y[lo:hi], (n_skip if is_main() else 0)
