"""Safe, atomic artifact I/O: safetensors for tensors, JSON/YAML for metadata.

Every file appears whole or not at all: it is written to a temporary name in the same folder,
flushed and fsynced, then renamed over the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import CheckpointError, JuapError

PathLike = str | os.PathLike


class DiskFullError(JuapError, OSError):
    """A file could not be written for lack of space; nothing half-written was left behind."""


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    On any error the temporary file is removed, so no half-written file remains.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        _raise_if_full(e, path)
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            _raise_if_full(e, path)
        raise
    _fsync_dir(path.parent)


TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)
_FULL = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit was reached",
}


def _raise_if_full(e: OSError, path: Path) -> None:
    """Turn "no space left" (and quota / file-size limits) into a DiskFullError naming the file."""
    if e.errno in _FULL:
        raise DiskFullError(
            f"could not write {path}: {_FULL[e.errno]} ({e.strerror}); nothing was written (the partial "
            "temporary file was removed and any earlier version of the file is unchanged). Free some "
            "space, then run the command again (with --resume to continue from the last checkpoint)"
        ) from e


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete the temporary files a killed process left in ``folder`` (``.NAME.XXXX.tmp``); returns them."""
    gone = []
    for p in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: PathLike, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_tensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Dict[str, Any] | None = None
) -> Path:
    """Save tensors as safetensors, atomically. Metadata values are stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_bytes(path, save(tensors, metadata=meta))


def load_tensors(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load a checkpoint safely: safetensors, or a plain state dict via ``torch.load(weights_only=True)``.

    Returns:
        (tensors, metadata). A pickle that would run code is refused with a CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (check the path)")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated"
            ) from e
        return tensors, read_metadata(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that needs more than tensors to load "
            "(it could run code). "
            "Convert it to a plain state dict or safetensors on a machine where you trust the file."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({e}); it may be truncated"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), {}


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata of a safetensors file (``{}`` for other formats), without loading its tensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (check the path)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from e
    return {k: _maybe_json(v) for k, v in raw.items()}


def _maybe_json(v: str) -> Any:
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v
