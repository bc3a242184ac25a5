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
import pickletools
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..errors import CheckpointError, JuapError

PathLike = str | os.PathLike


class WriteError(JuapError, OSError):
    """A file or folder could not be created or written (no permission, a file in the way, a read-only or
    full disk, a name too long); the message names the path and what to do, and nothing half-written was
    left behind."""


class DiskFullError(WriteError):
    """A file could not be written for lack of space; nothing half-written was left behind."""


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    On any error the temporary file is removed, so no half-written file remains; a file-system error
    (``OSError``) becomes a :class:`WriteError` (or :class:`DiskFullError`) naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_error(e, path) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, JuapError):
            raise write_error(e, path) from e
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


# What an errno means for a path juap creates or writes ({where}: the folder where it happened).
_WHY = {
    errno.EACCES: "no permission to write in {where}",
    errno.EPERM: "no permission to write in {where}",
    errno.EROFS: "{where} is on a read-only file system",
    errno.EEXIST: "a file of that name is in the way",
    errno.EISDIR: "a folder of that name is in the way",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system",
}


_IN_THE_WAY = "Choose another --out, or move what is in the way"
_FIX = {  # fixes that do not depend on what juap was writing
    errno.ENAMETOOLONG: "Choose a shorter --out (most file systems allow 255 bytes per name)",
    errno.ENOTDIR: _IN_THE_WAY,
    errno.EEXIST: _IN_THE_WAY,
    errno.EISDIR: _IN_THE_WAY,
}


def write_error(e: OSError, path: PathLike, *, doing: str = "write", fix: str | None = None) -> WriteError:
    """A one-line :class:`WriteError` for an ``OSError`` raised while creating or writing ``path``.

    Args:
        e: the error.
        path: the file or folder juap was creating or writing.
        doing: what it was doing (``"write"``, ``"create the run folder"``, ...).
        fix: what the user can do (default: for an artifact of a run).
    """
    path = Path(path)
    if e.errno in _FULL and doing != "write":  # a run folder: nothing of it is left
        return DiskFullError(
            f"could not {doing} {path}: {_FULL[e.errno]} ({e.strerror}); nothing was written. Free some "
            "space, then run the command again"
        )
    if e.errno in _FULL:
        return DiskFullError(
            f"could not {doing} {path}: {_FULL[e.errno]} ({e.strerror}); nothing was written (the partial "
            "temporary file was removed and any earlier version of the file is unchanged). Free some "
            "space, then run the command again (with --resume to continue from the last checkpoint)"
        )
    if e.errno == errno.ENOTDIR:
        why = f"{_file_in_the_way(path)} is a file, not a folder"
    else:
        why = _WHY.get(e.errno, "{error}").format(where=_nearest_folder(path), error=e.strerror or e)
    fix = (
        _FIX.get(e.errno)
        or fix
        or (
            "Make the folder writable (or choose another --out), then run the command again (with --resume "
            "to continue from the last checkpoint)"
        )
    )
    return WriteError(f"could not {doing} {path}: {why} ({e.strerror or e}); nothing was written. {fix}")


def _nearest_folder(path: Path) -> Path:
    """``path`` if it is a folder, else its deepest existing ancestor folder."""
    for p in (path, *path.parents):
        try:
            if p.is_dir():
                return p
        except OSError:  # e.g. a name too long: keep climbing
            continue
    return path.parent


def _file_in_the_way(path: Path) -> Path:
    """The part of ``path`` that exists but is not a folder (for "not a directory" errors)."""
    for p in reversed((path, *path.parents)):  # from the root down
        try:
            if p.exists() and not p.is_dir():
                return p
        except OSError:
            break
    return path.parent


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
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"cannot read {path}: no permission to read it (check its permissions)")
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
    except pickle.UnpicklingError as e:  # refused by the weights-only unpickler: unsafe, or not a pickle
        if zipfile.is_zipfile(path) or _is_pickle_with_objects(path):
            raise CheckpointError(
                f"refused to load {path}: it is a pickle that needs more than tensors to load "
                "(it could run code). "
                "Convert it to a plain state dict or safetensors on a machine where you trust the file."
            ) from e
        raise CheckpointError(_not_a_checkpoint(path)) from e
    except (RuntimeError, EOFError, OSError) as e:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint") from e
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated"
        ) from e
    except Exception as e:  # garbage makes the unpickler fail anywhere (KeyError, ValueError, ...)
        raise CheckpointError(_not_a_checkpoint(path)) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), {}


def _is_pickle_with_objects(path: Path) -> bool:
    """Whether ``path`` starts with a well-formed pickle (decoded up to its STOP) that builds objects
    (imports names, calls them). Decodes the opcodes only (``pickletools.genops``), never runs them.
    """

    objects = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
    try:
        with open(path, "rb") as f:
            ops = {op.name for op, _, _ in pickletools.genops(f)}  # raises unless it reaches STOP
    except Exception:  # not a pickle: genops fails at a byte that is no opcode (ValueError, EOF, ...)
        return False
    return bool(ops & objects)


def _not_a_checkpoint(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    return (
        f"{path} is not a PyTorch checkpoint: it is neither a zip archive (torch.save) nor a pickle (it "
        f"starts with {head!r}); it may be corrupt, truncated or another kind of file. Give a .safetensors "
        "file or a state dict saved with torch.save"
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata of a safetensors file (``{}`` for other formats), without loading its tensors."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (check the path)")

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
