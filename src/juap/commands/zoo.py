"""``juap zoo``: perturbations shipped with the package, each with its provenance and recorded metrics.

Each entry is one exact 8-bit perturbation PNG (:func:`juap.app.artifacts.save_perturbation`) in
``juap/zoo/``: its metadata names the classifier (and the fingerprint of its weights), the input size,
the attack and its parameters, the seed, the images it was measured on and the metrics measured there.
``juap zoo`` lists them, ``juap zoo NAME`` shows one with the command that measures it again, and
``juap zoo NAME --out DIR`` copies it out (never overwriting another file).
"""

from __future__ import annotations

import shutil
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Dict, List

from ..app.artifacts import read_perturbation_metadata
from ..errors import ConfigError

ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"


def zoo_names() -> List[str]:
    return sorted(p.stem for p in ZOO_DIR.glob("*.png"))


def zoo_path(name: str) -> Path:
    """The shipped perturbation ``name`` (its file name without ``.png``).

    Raises:
        ConfigError: no entry has that name; the message lists the close ones.
    """
    key = Path(name.strip()).name.removesuffix(".png")
    if key not in zoo_names():
        close = get_close_matches(key, zoo_names(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"no perturbation {name!r} in the zoo{hint} (`juap zoo` lists them)")
    return ZOO_DIR / f"{key}.png"


def zoo_entry(name: str) -> Dict[str, Any]:
    """One entry: ``name``, ``path``, ``size_bytes`` and the file's metadata (``meta``), with the figures
    that ``juap zoo`` shows (``fooling_ratio``, ``iou``, ``interpreter``: as applied in 8 bits)."""
    path = zoo_path(name)
    meta = read_perturbation_metadata(path)
    measured = (meta.get("metrics") or {}).get("as_8bit") or meta.get("metrics") or {}
    return {
        "name": path.stem,
        "path": path,
        "size_bytes": path.stat().st_size,
        "meta": meta,
        "fooling_ratio": measured.get("fooling_ratio"),
        "iou": measured.get("iou"),
        "interpreter": measured.get("map_interpreter"),
        "n_images": (meta.get("metrics") or {}).get("n_images"),
    }


def list_zoo() -> List[Dict[str, Any]]:
    return [zoo_entry(n) for n in zoo_names()]


def measure_command(entry: Dict[str, Any]) -> str:
    """The ``juap evaluate`` command that measures a copied entry again on the images it records."""
    return f"juap evaluate -p {entry['name']}.png " + " ".join(f"--set '{s}'" for s in measure_sets(entry))


def measure_sets(entry: Dict[str, Any]) -> List[str]:
    """The ``--set`` values of :func:`measure_command`: the entry's model, weights, images and interpreter."""
    meta = entry["meta"]
    data = meta.get("data") or {}
    sets = [f"classifier.name={meta.get('classifier_arch')}"]
    if meta.get("classifier_weights"):  # a named set; else the user's own file (the fingerprint says which)
        sets.append(f"classifier.weights={meta['classifier_weights']}")
    sets += [f"data.{k}={v}" for k, v in data.items() if k in ("name", "image_size")]
    if entry.get("interpreter"):
        sets.append(f"evaluate.interpreters=[{entry['interpreter']}]")
    return sets


def copy_zoo(name: str, out: str | Path) -> Path | None:
    """Copy the entry ``name`` into the folder ``out``; None when an identical copy is there already.

    Raises:
        ConfigError: an unknown name, or another file of that name in ``out`` (nothing is written).
    """
    src = zoo_path(name)
    dst = Path(out) / src.name
    if dst.exists():
        if dst.read_bytes() == src.read_bytes():
            return None
        raise ConfigError(f"refusing to overwrite {dst}; remove it or choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
