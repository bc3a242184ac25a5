"""Run folders: one per command invocation, holding the resolved config, metrics and artifacts."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import yaml

from ..errors import ConfigError
from ..runtime import distributed
from ..runtime.checkpoint import CHECKPOINT_NAME
from ..runtime.io import (
    DiskFullError,
    WriteError,
    remove_stale_temporaries,
    write_error,
    write_json,
    write_yaml,
)

log = logging.getLogger(__name__)


def new_run_dir(
    out: str | os.PathLike | None,
    *,
    command: str,
    overwrite: bool = False,
    base: str | os.PathLike = "runs",
    resume: bool = False,
) -> Path:
    """Create the run folder ``out`` (default ``runs/<command>-<timestamp>``).

    An existing non-empty folder is refused unless ``overwrite`` is set (then it is emptied) or
    ``resume`` is set (then the unfinished run of the same command in it is continued: see
    :func:`reopen_run_dir`).
    Under torchrun only rank 0 creates it; the other ranks get rank 0's path and write nothing.
    """
    if not distributed.is_main():
        return Path(distributed.broadcast_object(None))
    if resume and out is None:
        raise ConfigError("--resume needs --out DIR: the run folder to continue")
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(base) / f"{command}-{stamp}"
    path = Path(out)
    if resume:
        if overwrite:
            raise ConfigError("--resume continues a run folder and --overwrite empties it: pass only one")
        reopen_run_dir(path, command=command)
        distributed.broadcast_object(str(path))
        return path
    created = None  # the top folder this call creates: removed again if the run folder cannot be made
    try:
        _refuse_a_file(path)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise ConfigError(
                    f"output folder {str(path)!r} already exists and is not empty; choose another --out, "
                    "pass --overwrite to replace it, or --resume to continue the run in it"
                )
            shutil.rmtree(path)
        created = _first_missing(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(
            path / "run.json",
            {
                "command": command,
                "status": "running",
                "started": _dt.datetime.now().isoformat(timespec="seconds"),
                **({"world_size": distributed.world_size()} if distributed.world_size() > 1 else {}),
            },
        )
    except OSError as e:  # WriteError from write_json too: nothing half-made stays behind
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(e, DiskFullError):
            raise
        cause = e.__cause__ if isinstance(e, WriteError) and isinstance(e.__cause__, OSError) else e
        raise write_error(cause, path, doing="create the run folder", fix=_OUT_FIX) from cause
    distributed.broadcast_object(str(path))
    return path


_OUT_FIX = "Choose an --out you may write to (a new or empty folder), or fix that folder's permissions"


def _refuse_a_file(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--out {str(path)!r} is a file, not a folder: choose another --out (a new or empty folder)"
        )


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` creates)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def finish_run(path: Path, *, config: Dict[str, Any], metrics: Dict[str, Any], complete: bool = True) -> None:
    """Write ``config.yaml`` and ``metrics.json``, then mark the run ``complete`` (or ``partial``: a grid
    with cells left, e.g. one shard of several) in ``run.json``. Only rank 0 writes under torchrun."""
    if not distributed.is_main():
        return
    write_yaml(path / "config.yaml", config)
    write_json(path / "metrics.json", metrics)
    info = {
        "status": "complete" if complete else "partial",
        "finished": _dt.datetime.now().isoformat(timespec="seconds"),
    }

    run = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    run.update(info)
    write_json(path / "run.json", run)
    if complete:  # the loop checkpoint is only needed to resume an unfinished run
        (path / CHECKPOINT_NAME).unlink(missing_ok=True)


def reopen_run_dir(path: Path, *, command: str) -> Path:
    """Reopen the unfinished run of ``command`` in ``path`` for ``--resume``.

    Temporary files a killed process left behind are removed and ``run.json`` says ``running`` again
    (its ``resumed`` list records when).

    Raises:
        ConfigError: no run there, a run of another command, or a run that is already complete.
    """

    run_file = path / "run.json"
    try:
        run = json.loads(run_file.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"nothing to resume: {str(path)!r} holds no run (no run.json); drop --resume to start one"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot resume {str(path)!r}: its run.json is unreadable ({e})") from None
    if run.get("command") != command:
        raise ConfigError(
            f"cannot resume {str(path)!r} with `juap {command}`: "
            f"it holds a run of `juap {run.get('command')}`"
        )
    if run.get("status") == "complete":
        raise ConfigError(
            f"the run in {str(path)!r} is already complete: nothing to resume "
            "(pass --overwrite instead of --resume to run it again)"
        )
    try:
        remove_stale_temporaries(path)
    except OSError as e:
        raise write_error(e, path, doing="clean up the run folder", fix=_OUT_FIX) from e
    now = _dt.datetime.now().isoformat(timespec="seconds")
    run.update(status="running", resumed=[*run.get("resumed", []), now])
    run.pop("error", None)
    write_json(run_file, run)
    return path


def check_config(path: Path, config: Dict[str, Any], *, resume: bool) -> None:
    """Write the resolved ``config.yaml`` at the start of a run; on resume, refuse a different config.

    Raises:
        ConfigError: resuming with settings other than those the run started with (named key by key).
    """

    if not distributed.is_main():
        return
    saved_file = path / "config.yaml"
    if resume and saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text()) or {}
        now = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))
        diff = _diff(saved, now)
        if diff:
            shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in diff[:5])
            raise ConfigError(
                f"cannot resume {str(path)!r} with another config ({shown}); pass the same --config and "
                "--set options as the first time, or none to reuse its config.yaml"
            )
        return
    write_yaml(saved_file, config)


def _diff(a: Any, b: Any, where: str = "") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if a == b else [(where, a, b)]


class failed_on_error:
    """If the run raises, ``run.json`` says ``failed`` (or ``interrupted``) and why: no stale ``running``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and distributed.is_main():
            run_file = self.path / "run.json"
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            try:
                run = json.loads(run_file.read_text()) if run_file.exists() else {}
                run.update(
                    status=status,
                    error=f"{exc_type.__name__}: {exc}",
                    finished=_dt.datetime.now().isoformat(timespec="seconds"),
                )
                write_json(run_file, run)
            except (OSError, ValueError) as e:  # e.g. the folder became read-only: the run's error matters
                log.debug("could not record the %s run in %s: %s", status, run_file, e)
        return False


def open_grid_dir(
    out: str | os.PathLike, *, experiment: str, overwrite: bool = False, command: str = "run"
) -> Path:
    """The run folder of ``juap run`` (or another resumable grid ``command``, e.g. ``evade``): created, or
    reopened to continue the same experiment.

    A folder holding another command's run or another experiment is refused unless ``overwrite``.
    Under torchrun only rank 0 opens it; the other ranks get its path.
    """

    if not distributed.is_main():
        return Path(distributed.broadcast_object(None))

    path = Path(out)
    run_file = path / "run.json"
    try:
        _refuse_a_file(path)
        reopen = path.exists() and any(path.iterdir()) and not overwrite
    except OSError as e:
        raise write_error(e, path, doing="open the run folder", fix=_OUT_FIX) from e
    if reopen:
        try:
            run = json.loads(run_file.read_text())
        except (OSError, ValueError):
            run = {}
        if run.get("command") != command or run.get("experiment") != experiment:
            raise ConfigError(
                f"output folder {str(path)!r} exists and holds something else than a run of experiment "
                f"{experiment!r}; choose another --out or pass --overwrite"
            )
        run.update(status="running", resumed=_dt.datetime.now().isoformat(timespec="seconds"))
        write_json(run_file, run)
        distributed.broadcast_object(str(path))
        return path
    path = new_run_dir(path, command=command, overwrite=overwrite)
    run = json.loads(run_file.read_text())
    run["experiment"] = experiment
    write_json(run_file, run)
    return path
