"""Run folders: one per command invocation, holding the resolved config, metrics and artifacts."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Dict

from .errors import ConfigError
from .io import write_json, write_yaml


def new_run_dir(
    out: str | os.PathLike | None, *, command: str, overwrite: bool = False, base: str | os.PathLike = "runs"
) -> Path:
    """Create the run folder ``out`` (default ``runs/<command>-<timestamp>``).

    An existing non-empty folder is refused unless ``overwrite`` is set (then it is emptied).
    """
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(base) / f"{command}-{stamp}"
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output folder {str(path)!r} already exists and is not empty; "
                "choose another --out or pass --overwrite"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(
        path / "run.json",
        {
            "command": command,
            "status": "running",
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        },
    )
    return path


def finish_run(path: Path, *, config: Dict[str, Any], metrics: Dict[str, Any]) -> None:
    """Write ``config.yaml`` and ``metrics.json``, then mark the run complete in ``run.json``."""
    write_yaml(path / "config.yaml", config)
    write_json(path / "metrics.json", metrics)
    info = {"status": "complete", "finished": _dt.datetime.now().isoformat(timespec="seconds")}
    import json

    run = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    run.update(info)
    write_json(path / "run.json", run)


class failed_on_error:
    """If the run raises, ``run.json`` says ``failed`` (or ``interrupted``) and why: no stale ``running``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            import json

            run_file = self.path / "run.json"
            run = json.loads(run_file.read_text()) if run_file.exists() else {}
            status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            run.update(
                status=status,
                error=f"{exc_type.__name__}: {exc}",
                finished=_dt.datetime.now().isoformat(timespec="seconds"),
            )
            write_json(run_file, run)
        return False
