"""Checkpoints and resume for long loops: periodic, atomic, safe to load, and honoured on Ctrl-C/SIGTERM.

A loop state is a nested structure of dicts, lists, tuples, scalars, strings, tensors and NumPy arrays
(model and optimiser state dicts, RNG states, the data position, the step, the best result so far).
:func:`save_checkpoint` writes it as one safetensors file: the tensors as tensors, everything else as
JSON in the file's metadata, so loading never unpickles anything. The file is written atomically
(temporary name, fsync, rename), so a kill at any moment leaves the previous checkpoint whole.

:class:`LoopCheckpoints` is what a training loop uses::

    ckpt = LoopCheckpoints(run_dir, every=50, kind="juap", resume=True)
    state = ckpt.resume_state()                # None: start fresh (then ckpt.remember(step-0 state))
    for step in ckpt.steps(range(start + 1, steps + 1)):   # SIGINT/SIGTERM only set a flag meanwhile
        try:
            ...one step...
        except NumericalError as e:
            good = ckpt.roll_back(e)           # the last good state; NumericalError after max tries
            ...load good, lower the learning rate (lr_settings before, lower_lr after)...
            continue
        ckpt.step_end(step, lambda: state_of_the_loop)   # saves when due; RunInterrupted on a signal

:class:`ResumableLoader` wraps a data loader so that its position (the RNG state at the start of the
current pass and the batches taken since) is part of the state and is restored exactly on resume.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, NumericalError
from . import distributed
from .io import PathLike, load_tensors, save_tensors

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "juap.checkpoint"


class RunInterrupted(KeyboardInterrupt):
    """A loop stopped on SIGINT/SIGTERM after saving a checkpoint (a KeyboardInterrupt: exit code 130).

    Attributes:
        step: the last completed step, saved in ``checkpoint``.
        checkpoint: the checkpoint file, or None when the loop had no checkpoint folder.
    """

    def __init__(self, message: str, *, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint

    def __str__(self) -> str:
        return str(self.args[0])


# -- encoding a nested state into tensors + JSON ------------------------------------------------------
def _encode(obj: Any, tensors: Dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        wide = np.int64 if obj.dtype.kind in "iub" else np.float64  # lossless, and always storable
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(wide))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{key}.k{i}"), _encode(v, tensors, f"{key}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint (at {key!r})")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_checkpoint(path: PathLike, state: Mapping[str, Any], *, kind: str) -> Path:
    """Write a loop state atomically as safetensors (tensors) + JSON metadata (everything else).

    Args:
        path: the file (``.safetensors``).
        state: nested dicts/lists/tuples of tensors, NumPy arrays and JSON scalars; ``state["step"]``,
            when present, is also readable without loading (``read_metadata(path)["step"]``).
        kind: what wrote it (e.g. ``"juap"``, ``"train-classifier"``); checked on load.
    """
    tensors: Dict[str, torch.Tensor] = {}
    tree = _encode(dict(state), tensors, "s")
    meta = {"format": FORMAT, "kind": kind, "step": state.get("step"), "state": tree}
    return save_tensors(path, tensors, meta)


def load_checkpoint(path: PathLike, *, kind: Optional[str] = None) -> Dict[str, Any]:
    """Read a state written by :func:`save_checkpoint` (never unpickles).

    Raises:
        CheckpointError: missing, truncated, not a juap checkpoint, or written by another ``kind``.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT or "state" not in meta:
        raise CheckpointError(f"{path} is not a juap loop checkpoint (format {meta.get('format')!r})")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(
            f"{path} is a checkpoint of {meta.get('kind')!r}, not of {kind!r}: resume it with the command "
            "that wrote it, or start a new run folder"
        )
    return _decode(meta["state"], tensors)


# -- RNG states ---------------------------------------------------------------------------------------
def rng_states() -> Dict[str, Any]:
    """The global RNG states of Python ``random``, NumPy and torch (CPU and initialised CUDA devices)."""
    out: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only when the device count matches)."""
    random.setstate(_as_tuples(states["python"]))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_tuples(obj: Any) -> Any:
    return tuple(_as_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


# -- the data position --------------------------------------------------------------------------------
class ResumableLoader:
    """A re-iterable loader whose position can be saved and restored exactly.

    For a loader with a ``torch.Generator`` in ``.generator`` (juap's ``make_loader`` and
    ``InMemoryLoader``), the position is the generator's state at the start of the current pass plus
    the number of batches taken in it and the state now; on resume the pass is started from the first
    state, those batches are skipped (read again, at most one pass), then the state is set to the last.
    Other loaders are replayed from their first pass, which is exact
    when their order is deterministic.

    Args:
        loader: the loader (anything iterable more than once).
        position: a :meth:`position` saved earlier, applied on the first pass.
        roll_over: when the saved pass turns out used up, go on with the next pass in the same iteration
            (for step loops that take batches endlessly); without it that iteration is empty (for epoch
            loops, whose saved epoch is then over).
    """

    def __init__(
        self, loader: Any, position: Optional[Mapping[str, Any]] = None, *, roll_over: bool = False
    ) -> None:
        self.loader = loader
        self.roll_over = roll_over
        gen = getattr(loader, "generator", None)
        self._gen = gen if isinstance(gen, torch.Generator) else None
        self._pending = dict(position) if position else None
        self.passes = 0
        self.taken = 0
        self._pass_state: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        pending, self._pending = self._pending, None
        if pending is None:
            yield from self._pass()
            return
        if self._gen is not None and pending.get("generator") is not None:
            self._gen.set_state(pending["generator"])
        else:  # no generator to restore: replay the earlier passes
            for _ in range(max(0, int(pending["passes"]) - 1)):
                for _ in self.loader:
                    pass
        self.passes = int(pending["passes"]) - 1
        given = 0
        for batch in self._pass(pending):
            given += 1
            yield batch
        if not given and self.roll_over:  # the saved pass was used up: go on with the next one
            yield from self._pass()

    def _pass(self, pending: Optional[Mapping[str, Any]] = None) -> Iterator[Any]:
        skip = int(pending["taken"]) if pending is not None else 0
        self.passes += 1
        self._pass_state = self._gen.get_state() if self._gen is not None else None
        self.taken = 0
        it = iter(self.loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
            self.taken += 1
        if pending is not None:
            if skip and self._gen is not None and pending.get("now") is not None:
                self._gen.set_state(pending["now"])  # draws made since (e.g. validation passes over the data)
            if pending.get("rng") is not None:
                set_rng_states(pending["rng"])  # the skipped batches' random augmentations drew from these
        for batch in it:
            self.taken += 1
            yield batch

    def position(self) -> Dict[str, Any]:
        """Where the loader is (plain data, for a checkpoint): passes started, batches taken in this one,
        the generator's state when it started and now."""
        now = self._gen.get_state() if self._gen is not None else None
        return {
            "passes": self.passes,
            "taken": self.taken,
            "generator": self._pass_state,
            "now": now,
            "rng": rng_states(),
        }


_END = object()


# -- signals ------------------------------------------------------------------------------------------
class StopSignals:
    """While active, SIGINT and SIGTERM set :attr:`requested` instead of stopping the process at once.

    The loop checks the flag at its next step boundary, saves a checkpoint and raises
    :class:`RunInterrupted`. A second signal stops at once (a plain KeyboardInterrupt). Outside the
    main thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False


# -- the loop helper ----------------------------------------------------------------------------------
class LoopCheckpoints:
    """Periodic checkpoints, resume, NaN/Inf roll-back and graceful stop for one training loop.

    Args:
        directory: where ``checkpoint.safetensors`` is written; ``None`` keeps the last good state in
            memory only (roll-back still works; an interruption loses the progress).
        every: save every this many steps (and at the last step, and on a stop signal).
        kind: what the loop is, stored in the file and checked on resume.
        resume: continue from the checkpoint in ``directory`` when there is one.
        max_rollbacks: how many NaN/Inf faults are rolled back before giving up.
        lr_factor: each roll-back multiplies the learning rate by this.
        write: write the file (False on the ranks other than 0 of a distributed run: they only read).
    """

    def __init__(
        self,
        directory: Optional[PathLike],
        *,
        every: int,
        kind: str,
        resume: bool = False,
        max_rollbacks: int = 3,
        lr_factor: float = 0.5,
        write: bool = True,
    ) -> None:
        if every < 1:
            raise ConfigError(f"checkpoint_every = {every} is out of range; use a positive number of steps")
        self.path = Path(directory) / CHECKPOINT_NAME if directory is not None else None
        self.every, self.kind, self.resume = int(every), kind, bool(resume)
        self.max_rollbacks, self.lr_factor = int(max_rollbacks), float(lr_factor)
        self.write = bool(write)
        self.rollbacks = 0
        self.good: Optional[Dict[str, Any]] = None
        self.signals = StopSignals()

    def resume_state(self) -> Optional[Dict[str, Any]]:
        """The saved state when resuming and a checkpoint exists, else None (start fresh)."""
        if not (self.resume and self.path is not None and self.path.is_file()):
            return None
        state = load_checkpoint(self.path, kind=self.kind)
        self.rollbacks = int(state.get("rollbacks", 0))
        self.good = state
        log.info("resuming %s from step %s (%s)", self.kind, state.get("step"), self.path)
        return state

    def stop_signals(self) -> StopSignals:
        """The context manager that turns SIGINT/SIGTERM into a stop at the next step boundary."""
        return self.signals

    def steps(self, steps: Iterable[int]) -> Iterator[int]:
        """Iterate ``steps`` with :meth:`stop_signals` active (the handlers go when the loop ends)."""
        with self.signals:
            yield from steps

    def due(self, step: int, *, last: bool = False) -> bool:
        return last or step % self.every == 0 or self.signals.requested is not None

    def remember(self, state: Dict[str, Any]) -> None:
        """Keep ``state`` in memory as the last good one (no file), e.g. the state before step 1."""
        state.setdefault("rollbacks", self.rollbacks)
        self.good = cpu_copy(state)

    def step_end(self, step: int, make_state: Callable[[], Dict[str, Any]], *, last: bool = False) -> None:
        """After step ``step``: save when due; on a pending stop signal, save and raise RunInterrupted."""
        stop = self._stop_agreed()
        if not (last or step % self.every == 0 or stop):
            return
        state = make_state()
        state["rollbacks"] = self.rollbacks
        self.good = cpu_copy(state)
        if self.path is not None and self.write:
            save_checkpoint(self.path, self.good, kind=self.kind)
        if stop:
            self.signals.__exit__(None, None, None)
            where = (
                f"a checkpoint was saved in {self.path}"
                if self.path is not None
                else "there was no checkpoint folder, so the progress is lost"
            )
            raise RunInterrupted(
                f"{self.kind} stopped by {self.signals.requested} after step {step}; {where}",
                step=step,
                checkpoint=self.path,
            )

    def _stop_agreed(self) -> bool:
        """Whether to stop now; under torchrun every rank stops at the same step if any got a signal
        (a rank leaving alone would leave the others waiting in a collective)."""

        stop = self.signals.requested is not None
        if distributed.world_size() > 1:
            flag = distributed.global_count(int(stop), device=distributed._collective_device())
            stop = bool(flag.item() > 0)
            if stop and self.signals.requested is None:
                self.signals.requested = "a signal to another process"
        return stop

    def roll_back(self, error: NumericalError) -> Dict[str, Any]:
        """A NaN/Inf fault: the last good state to load (then lower the lr), or NumericalError when
        the faults exceed ``max_rollbacks`` or no good state exists."""
        self.rollbacks += 1
        if self.good is None or self.rollbacks > self.max_rollbacks:
            self.signals.__exit__(None, None, None)
            raise NumericalError(
                f"{error} -- gave up after {self.rollbacks - 1} roll-back(s) to the last good checkpoint "
                f"with a lower learning rate; lower the learning rate or check the inputs"
            ) from error
        log.warning(
            "%s; rolling back to step %s and multiplying the learning rate by %g (try %d of %d)",
            error,
            self.good.get("step"),
            self.lr_factor,
            self.rollbacks,
            self.max_rollbacks,
        )
        return self.good


def cpu_copy(state: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (a snapshot that later steps cannot change)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [cpu_copy(v) for v in state]
    if isinstance(state, tuple):
        return tuple(cpu_copy(v) for v in state)
    if isinstance(state, np.ndarray):
        return state.copy()
    return state


LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def lr_settings(optimizer: torch.optim.Optimizer, scheduler: Any = None) -> Dict[str, Any]:
    """The learning-rate settings of ``optimizer`` (per group) and ``scheduler`` (``base_lrs``), to be
    scaled by :func:`lower_lr` after an older state was loaded."""
    groups = [
        {k: g[k] for k in LR_KEYS if isinstance(g.get(k), (int, float))} for g in optimizer.param_groups
    ]
    base = list(getattr(scheduler, "base_lrs", []) or [])
    return {"groups": groups, "base_lrs": base}


def lower_lr(
    optimizer: torch.optim.Optimizer, settings: Mapping[str, Any], factor: float, scheduler: Any = None
) -> None:
    """Set the learning rates to ``settings`` (from :func:`lr_settings`) times ``factor``."""
    for group, values in zip(optimizer.param_groups, settings["groups"], strict=True):
        for k, v in values.items():
            group[k] = v * factor
    if scheduler is not None and settings["base_lrs"]:
        scheduler.base_lrs = [v * factor for v in settings["base_lrs"]]


def check_finite_parameters(module: torch.nn.Module, what: str) -> None:
    """Raise NumericalError when a parameter of ``module`` holds NaN or Inf."""
    params = [p for p in module.parameters()]
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise NumericalError(f"{what}: a parameter became NaN or infinite")
