"""The one training-loop engine every trainer runs in, the trainer base it drives, and the sharding/DDP
plumbing around them.

Every trainer (the universal attacks, ``train-classifier``'s
:class:`~juap.classifiers.training.ClassifierTrainer`, ``train-rts``'s
:class:`~juap.interpreters.rts_training.RTSTrainer`) is a :class:`Trainer`: it writes what is its own
(``init``, ``step``, ``state_dict`` / ``load_state_dict``, ``result``, ``num_steps``) and
:meth:`TrainLoop.train` does the rest, the same way for all of them:

- ``init(data, val_data)`` sets up a fit: the state before step 1;
- ``step(i) -> row``: one step (or epoch, pass); the row of scalars it returns goes into the history; a
  :class:`~juap.errors.NumericalError` it raises rolls the loop back;
- ``state_dict()`` and ``load_state_dict(state)``: everything needed to continue after this step (weights,
  optimiser, data position, best so far), and putting it back on resume;
- ``restore_state(state)``: what a NaN/Inf roll-back reloads (by default ``load_state_dict``).

The engine owns resume, the checkpoint cadence, NaN/Inf roll-back with a lower learning rate,
SIGINT/SIGTERM (a checkpoint at the next step boundary), the progress bar, the RNG states, the per-rank
part of the state under torchrun, and the history: every row is kept in ``loop.history`` (and in the
checkpoint, so a resumed run continues it) and handed to an optional ``log`` such as
:class:`~juap.app.history.RunLog`, which writes ``history.csv``, ``curves.png`` and TensorBoard events.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable, ClassVar, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, NumericalError
from . import distributed
from .checkpoint import (
    LoopCheckpoints,
    ResumableLoader,
    cpu_copy,
    lower_lr,
    lr_settings,
    rng_states,
    set_rng_states,
)
from .distributed import set_epoch, shard_train_loader


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where and how often a training loop saves itself, and whether it continues from there.

    Args:
        directory: folder for ``checkpoint.safetensors``; None keeps the last good state in memory only.
        every: save every this many steps (None: the loop's own default, e.g. its validation cadence),
            and always at the last step and on SIGINT/SIGTERM.
        resume: continue from the checkpoint in ``directory`` when there is one.
        max_rollbacks: NaN/Inf faults rolled back (with the learning rate halved) before giving up.
    """

    directory: Optional[str | os.PathLike] = None
    every: Optional[int] = None
    resume: bool = False
    max_rollbacks: int = 3


class Trainer(abc.ABC):
    """What every training loop writes of its own; :meth:`TrainLoop.train` drives it (module docstring).

    A subclass implements the abstract members; the others have defaults:

    - ``optimizer`` / ``scheduler``: whose learning rate a NaN/Inf roll-back lowers (None: none);
    - :meth:`begin` (once resumed, before the first step: a DDP wrap, a clock), :meth:`converged` (stop
      before ``num_steps``; checked on resume and after every step), :meth:`after_step` (after a step and
      its checkpoint: callbacks);
    - :meth:`checkpoint_identity` / :meth:`check_identity`: the settings a checkpoint must match to be
      resumed;
    - ``data_order``: the ``torch.Generator`` that draws the training data's order, saved with the state;
    - ``unit`` (``"step"``, ``"epoch"``, ``"pass"``), ``checkpoint_every`` (the default cadence) and
      ``per_rank`` (state keys that differ between the torchrun ranks).

    ``loop`` is the :class:`TrainLoop` driving the trainer (set before :meth:`init`).
    """

    unit: ClassVar[str] = "step"
    per_rank: ClassVar[Tuple[str, ...]] = ()
    checkpoint_every: int = 1
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    data_order: Optional[torch.Generator] = None
    loop: Optional[TrainLoop] = None

    @property
    @abc.abstractmethod
    def num_steps(self) -> int:
        """The loop's length: steps, epochs or passes (read after :meth:`init`)."""

    @abc.abstractmethod
    def init(self, data: Any, val_data: Any = None, *, progress: bool = True) -> None:
        """Set up a fit on ``data``: the state before step 1 (a resumed fit then loads its checkpoint)."""

    @abc.abstractmethod
    def step(self, i: int) -> Any:
        """Step ``i`` (1-based): a row of scalars for the history, ``(row, images)`` to log images with it,
        or None. A :class:`~juap.errors.NumericalError` it raises rolls the loop back."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue after this step (tensors, numbers, nested dicts)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back a :meth:`state_dict` (on resume)."""

    @abc.abstractmethod
    def result(self) -> Any:
        """What the training gives at its end (the loop returns it)."""

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """What a NaN/Inf roll-back reloads (by default all of :meth:`load_state_dict`)."""
        self.load_state_dict(state)

    def begin(self) -> None:  # noqa: B027  (a hook: doing nothing is its default)
        """Once resumed (or fresh), before the first step."""

    def converged(self) -> bool:
        """Stop before ``num_steps`` (checked on resume and after every step)."""
        return False

    def after_step(self, i: int) -> None:  # noqa: B027  (a hook: doing nothing is its default)
        """After step ``i`` and its checkpoint (if due)."""

    def checkpoint_identity(self) -> Dict[str, Any]:
        """The settings that must match for a checkpoint of this trainer to be resumed."""
        return {}

    def check_identity(self, saved: Mapping[str, Any]) -> None:
        """Refuse a checkpoint written with other settings (:meth:`checkpoint_identity`), naming them."""
        diff = {k: (saved.get(k), v) for k, v in self.checkpoint_identity().items() if saved.get(k) != v}
        if diff:
            kind = self.loop.kind if self.loop is not None else type(self).__name__
            raise CheckpointError(
                f"the {kind} checkpoint was written by another setup, so it cannot be resumed: "
                + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + ". Resume with the same config, or start a new run folder"
            )


class TrainLoop:
    """One training loop of ``total`` steps (see the module docstring).

    Args:
        kind: what the loop is (``"juap"``, ``"train-classifier"``, ...): the progress bar's label and the
            checkpoint's kind, checked on resume.
        total: the number of steps (or epochs, with ``unit="epoch"``); :meth:`train` sets it to the
            trainer's ``num_steps``.
        checkpoint: where and how often to save; None: in memory only, every ``default_every`` steps.
        default_every: the cadence when ``checkpoint.every`` is None.
        per_rank: state keys that differ between the ranks under torchrun (data position, RNG states,
            running counts): gathered into the checkpoint, and each rank gets its own back on resume.
        log: called as ``log(row, images)`` for every history row (rank 0 only); when it has them,
            ``log.restore(rows)`` on resume and ``log.flush()`` when the loop ends or is stopped; see
            :class:`~juap.app.history.RunLog`.
        progress: show a progress bar (rank 0 only).
    """

    def __init__(
        self,
        kind: str,
        total: int = 0,
        *,
        checkpoint: Optional[Checkpointing] = None,
        default_every: int = 1,
        per_rank: Sequence[str] = (),
        log: Any = None,
        progress: bool = True,
        unit: str = "step",
    ) -> None:
        c = checkpoint or Checkpointing()
        self.kind, self.total, self.unit, self.per_rank = kind, int(total), unit, tuple(per_rank)
        self.ckpt = LoopCheckpoints(
            c.directory,
            every=default_every if c.every is None else c.every,
            kind=kind,
            resume=c.resume,
            max_rollbacks=c.max_rollbacks,
            write=distributed.is_main(),
        )
        self.log = log if distributed.is_main() else None
        self.progress = progress and distributed.is_main()
        self.history: list = []
        self.bar = None
        self.finished = False  # a step sets it to end the loop after that step

    # -- the loop --------------------------------------------------------------------------------------
    def train(self, trainer: Trainer, data: Any, val_data: Any = None, *, progress: bool = True) -> Any:
        """Drive ``trainer`` (the same for every trainer): set it up on ``data``, resume from its checkpoint
        if asked, run its steps to ``trainer.num_steps`` (or until it converges); returns its ``result()``.

        Raises:
            TypeError: ``trainer`` is not a :class:`Trainer`.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"{type(trainer).__name__} is not a juap.runtime.loop.Trainer")
        trainer.loop = self
        trainer.init(data, val_data, progress=progress)
        self.total = int(trainer.num_steps)
        snapshot, load = (lambda: _trainer_state(trainer)), (lambda s: _load_trainer_state(trainer, s))
        start = self.start(snapshot, load)
        trainer.begin()
        self.finished = trainer.converged()
        if not self.finished:
            self.run(
                lambda i: self._trainer_step(trainer, i),
                snapshot=snapshot,
                load=load,
                restore=trainer.restore_state,
                optimizer=trainer.optimizer,
                scheduler=trainer.scheduler,
                after=trainer.after_step,
                start=start,
            )
        return trainer.result()

    def _trainer_step(self, trainer: Trainer, i: int) -> None:
        out = trainer.step(i)
        row, images = out if isinstance(out, tuple) else (out, None)
        self.finished = trainer.converged()
        if row is not None:
            self.record(i, row, images=images)

    def run(
        self,
        step: Callable[[int], Optional[Mapping[str, Any]]],
        *,
        snapshot: Callable[[], Dict[str, Any]],
        load: Callable[[Dict[str, Any]], None],
        restore: Optional[Callable[[Dict[str, Any]], None]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Any = None,
        after: Optional[Callable[[int], None]] = None,
        start: Optional[int] = None,
    ) -> int:
        """Run (or continue) the loop; returns the step it started after (0 for a fresh run).

        ``after(step)`` runs once the step's checkpoint (if due) is written: callbacks go there.
        ``start``: the result of an earlier :meth:`start` (a trainer that must know the resumed position
        before it builds its batches calls it first); None calls it here.
        """
        start = self.start(snapshot, load) if start is None else start
        try:
            for i in self.steps(start):
                try:
                    row = step(i)
                except NumericalError as e:  # back to the last good state with a lower lr; bounded tries
                    self.roll_back(e, restore or load, optimizer, scheduler, step=i)
                    continue
                if row is not None:
                    self.record(i, row)
                last = i == self.total or self.finished
                self.ckpt.step_end(i, lambda i=i: self._snapshot(snapshot, i), last=last)
                if after is not None:
                    after(i)
                if self.finished:  # a trainer that converged early (UAP at its target fooling rate)
                    break
        finally:  # also when stopped by a signal: the log's files hold what the checkpoint holds
            self.close()
            if hasattr(self.log, "flush"):  # a plain function as ``log`` has nothing to flush
                self.log.flush()
        return start

    def start(self, snapshot: Callable[[], Dict[str, Any]], load: Callable[[Dict[str, Any]], None]) -> int:
        """Load the checkpoint when resuming (returns its step) or remember the state before step 1 (0)."""
        if self.ckpt.resume:  # under torchrun: rank 0's last write is done before any rank reads
            distributed.barrier()
        state = self.ckpt.resume_state()
        if state is None:
            self.ckpt.remember(self._snapshot(snapshot, 0))
            return 0
        if self.per_rank:
            mine = this_rank_state(state, self.kind)
            state = {**state, **mine} if mine is not None else state
        if int(state["step"]) > self.total:
            raise CheckpointError(
                f"the {self.kind} checkpoint is at {self.unit} {state['step']}, beyond the {self.total} of "
                "this run: resume with the same config, or start a new run folder"
            )
        self.history = list(state.get("history") or [])
        load(state)
        set_rng_states(state["rng"])
        if hasattr(self.log, "restore"):
            self.log.restore(self.history)
        return int(state["step"])

    def steps(self, start: int) -> Iterator[int]:
        """Steps ``start + 1 .. total`` with a progress bar and SIGINT/SIGTERM turned into a checkpoint."""
        self.bar = tqdm(
            range(start + 1, self.total + 1),
            initial=start,
            total=self.total,
            desc=self.kind,
            unit=self.unit,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        yield from self.ckpt.steps(self.bar)

    def record(
        self, step: int, row: Mapping[str, Any], images: Optional[Mapping[str, torch.Tensor]] = None
    ) -> None:
        """Add a history row (``step`` first) and show its main figures on the progress bar."""
        row = {self.unit: step, **row}
        self.history.append(row)
        if self.log is not None:
            self.log(row, images or {})
        if self.bar is not None:
            shown = {k: v for k, v in row.items() if k in _SHOWN and isinstance(v, (int, float))}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)

    def checkpoint_due(self, step: int) -> bool:
        """Whether the loop saves a checkpoint after ``step`` (its cadence, the last step, a stop signal)."""
        return self.ckpt.due(step, last=step == self.total)

    def roll_back(self, error, restore, optimizer=None, scheduler=None, *, step: int) -> None:
        """A NaN/Inf fault: reload the last good state, multiply the lr by ``lr_factor``, note it."""
        lrs = lr_settings(optimizer, scheduler) if optimizer is not None else None
        good = self.ckpt.roll_back(error)  # NumericalError when the tries are used up
        restore(cpu_copy(good))
        if optimizer is not None:
            lower_lr(optimizer, lrs, self.ckpt.lr_factor, scheduler)
        self.history.append({self.unit: step, "rolled_back_to": good["step"], "error": str(error)})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _snapshot(self, snapshot: Callable[[], Dict[str, Any]], step: int) -> Dict[str, Any]:
        state = {**snapshot(), "step": step, "history": self.history, "rng": rng_states()}
        if self.per_rank:
            ranks = gather_rank_states({k: state[k] for k in self.per_rank})  # None in one process
            if ranks is not None:
                state["ranks"] = ranks
        return state


def _trainer_state(trainer: Trainer) -> Dict[str, Any]:
    """A trainer's checkpoint: its identity, its ``state_dict`` and its data order's RNG state."""
    order = trainer.data_order.get_state() if trainer.data_order is not None else None
    return {"identity": trainer.checkpoint_identity(), **trainer.state_dict(), "loader": order}


def _load_trainer_state(trainer: Trainer, state: Mapping[str, Any]) -> None:
    trainer.check_identity(state.get("identity", {}))
    if trainer.data_order is not None and state.get("loader") is not None:
        trainer.data_order.set_state(state["loader"])
    trainer.load_state_dict(state)


class EpochBatches:
    """``(epoch, batch)`` over ``epochs`` passes of a training loader, resumable mid-epoch.

    For the epoch trainers (``train-classifier``, ``train-rts``), whose loop engine counts global steps:
    :meth:`next` gives the next batch (None when the data is used up), calls ``on_epoch(epoch)`` when a
    new epoch starts and tells a ``DistributedSampler`` which epoch it is. :meth:`position` and
    :meth:`restore` go into the trainer's state.
    """

    def __init__(self, loader, epochs: int, on_epoch: Optional[Callable[[int], None]] = None) -> None:
        self.loader, self.epochs, self.on_epoch = loader, int(epochs), on_epoch
        self.epoch = 0
        self.source = ResumableLoader(loader)
        self._it: Optional[Iterator] = None

    def position(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "data": self.source.position()}

    def restore(self, position: Mapping[str, Any]) -> None:
        self.epoch = int(position["epoch"])
        self.source = ResumableLoader(self.loader, position["data"])
        self._it = None

    def next(self):
        """The next ``(epoch, batch)``, or None when every epoch is used up."""
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def _batches(self):
        first = self.epoch
        for epoch in range(first, self.epochs):
            if epoch != first and self.on_epoch is not None:
                self.on_epoch(epoch)
            self.epoch = epoch
            set_epoch(self.loader, epoch)
            for batch in self.source:
                yield epoch, batch


def run_epochs(
    kind: str,
    trainer: Trainer,
    train_loader,
    *,
    batch_size: Optional[int] = None,
    checkpoint: Optional[Checkpointing],
    log: Any = None,
    progress: bool = True,
) -> Any:
    """Run an epoch trainer (``train-classifier``, ``train-rts``) on this rank's share of ``train_loader``
    in the loop engine; returns its ``result()``.

    The loop counts global steps (the epochs times the batches per epoch) and checkpoints every epoch or
    200 steps by default. ``batch_size`` is the loader's global batch (default: its ``batch_size``), which
    under torchrun must divide by the number of processes.

    Raises:
        ConfigError: the loader gives no batch.
    """
    batch_size = getattr(train_loader, "batch_size", None) if batch_size is None else batch_size
    if distributed.world_size() > 1 and batch_size is not None:
        distributed.check_divisible(batch_size, "train.batch_size")
    sharded = shard_train_loader(train_loader)
    per_epoch = len(sharded)
    if per_epoch == 0:  # never report a finished training of zero steps
        raise ConfigError(
            f"{kind}: the training data gives no batch of train.batch_size={batch_size} (an empty split, or "
            "one smaller than a batch with drop_last): add images or lower train.batch_size"
        )
    loop = TrainLoop(
        kind,
        checkpoint=checkpoint,
        default_every=min(200, per_epoch),
        per_rank=trainer.per_rank,
        log=log,
        progress=progress,
    )
    return loop.train(trainer, sharded, progress=progress)


_SHOWN = ("loss", "batch_fooling_ratio", "val_fooling_ratio", "val_iou", "accuracy", "lam")


def gather_rank_states(state: Dict) -> list | None:
    """Every rank's ``state`` (a list, rank order) for a checkpoint; None alone."""
    if distributed.world_size() == 1:
        return None
    out: list = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, cpu_copy(state))
    return out


def this_rank_state(state: Dict, kind: str) -> Dict | None:
    """This rank's part of a checkpoint written by :func:`gather_rank_states` (None: a one-process one).

    Raises:
        CheckpointError: the checkpoint was written by another number of processes.
    """
    ranks = state.get("ranks")
    saved = len(ranks) if ranks else 1
    if saved != distributed.world_size():
        raise CheckpointError(
            f"the {kind} checkpoint was written by {saved} process(es) but this run has "
            f"{distributed.world_size()}: resume with the same number of processes (torchrun "
            "--nproc_per_node), or start a new run folder"
        )
    return ranks[distributed.rank()] if ranks else None


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
