"""``juap configs``: the experiment and training files shipped inside the package (``juap/configs/``).

They install with ``pip install .``, so ``juap run embedded/claims.yaml`` works from any folder: a path
that does not exist is looked up among the shipped files. ``juap configs NAME --out DIR`` copies one
(or ``all``) out to edit, never overwriting a file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

from ..errors import ConfigError
from ..runtime.config import read_yaml_mapping

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def list_configs() -> List[str]:
    """The shipped files as ``folder/file.yaml`` names (bases ``_base.yaml`` included), sorted."""
    return sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def shipped_path(name: str) -> Path:
    """The shipped file ``name`` (``embedded/claims.yaml``; the ``.yaml`` may be left off).

    Raises:
        ConfigError: no shipped file has that name; the message lists the close ones.
    """
    key = name.strip().strip("/")
    key = key if key.endswith((".yaml", ".yml")) else key + ".yaml"
    names = list_configs()
    if key not in names:
        close = [n for n in names if Path(key).name in n or key in n][:8]
        hint = f"; did you mean {', '.join(close)}?" if close else "; `juap configs` lists them"
        raise ConfigError(f"no file {name!r} here and no shipped config of that name{hint}")
    return CONFIG_DIR / key


def resolve_config(path: str | Path) -> Path:
    """``path`` itself when it exists, otherwise the shipped file of that name."""
    p = Path(path)
    return p if p.exists() else shipped_path(str(path))


def _with_bases(path: Path) -> List[str]:
    """``path`` and the files it ``extends:``, in turn, as shipped names."""
    names: List[str] = []
    while path.is_file() and path.relative_to(CONFIG_DIR).as_posix() not in names:
        names.append(path.relative_to(CONFIG_DIR).as_posix())
        base = read_yaml_mapping(path).get("extends")
        if not isinstance(base, str):
            break
        path = (path.parent / base).resolve()
    return names


def copy_configs(name: str, out: str | Path) -> List[Path]:
    """Copy one shipped file (with the files it ``extends:``) or ``all`` of them into ``out``,
    keeping the ``folder/file.yaml`` layout so ``extends:`` still resolves.

    Returns:
        The paths written now.

    Raises:
        ConfigError: an unknown name, or a target that exists with other contents (nothing is written
            then; an identical file, e.g. a ``_base.yaml`` copied before, is left as it is).
    """
    names = list_configs() if name == "all" else _with_bases(shipped_path(name))
    targets = [(CONFIG_DIR / n, Path(out) / n) for n in names]
    taken = [str(t) for s, t in targets if t.exists() and t.read_bytes() != s.read_bytes()]
    if taken:
        raise ConfigError(f"refusing to overwrite {', '.join(taken)}; remove it or choose another --out")
    targets = [(src, dst) for src, dst in targets if not dst.exists()]
    for src, dst in targets:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return [t for _, t in targets]
