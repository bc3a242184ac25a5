"""The embedded synthetic data set: the default data of juap, generated locally with no downloads.

Every image shows one localised object (its shape is the class) at a random position, scale (35-60%
of the image side) and rotation (up to 30 degrees) on a cluttered background. The clutter (smooth
colour gradients, low/medium contrast colour blobs, thin random lines, pixel noise) is drawn
independently of the class, and every colour is random, so only the object's shape identifies the
class. Each image is rendered at ``_SUPERSAMPLE`` times its size with Pillow and box-filtered down
(``Image.reduce``), which gives smooth edges and keeps every trace of the object inside its recorded
bounding box.

Rendering is deterministic: image ``index`` of seed ``seed`` uses its own ``SeedSequence([seed, index])``,
so any image can be re-rendered alone (:func:`render_sample`) and nothing depends on generation order.

The data set is written once, atomically, in ImageFolder layout::

    root/<class_name>/<class_name>_<index:05d>.png
    root/boxes.json   {"circle/circle_00000.png": [x0, y0, x1, y1], ...}  (pixels, x1/y1 exclusive)
    root/meta.json    generator version and parameters

``CLASS_NAMES`` is sorted, so the class index used here equals the index torchvision's ``ImageFolder``
assigns (it sorts class folder names). This module does not import torch.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .._registry import DATASETS
from ..errors import ConfigError, DataError
from .base import DataSet

SYNTHETIC_VERSION: int = 1
"""Bump whenever rendering changes: it is part of the cache folder name and of ``meta.json``."""

CLASS_NAMES: Tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
"""Class names, sorted (ImageFolder order); the first ``num_classes`` of them are used."""

Box = Tuple[int, int, int, int]

_GENERATOR = "juap.data.synthetic"
_SUPERSAMPLE = 4
_MIN_IMAGE_SIZE = 16
_MAX_ROTATION = math.radians(30)  # objects are rotated uniformly in [-_MAX_ROTATION, _MAX_ROTATION]
_SIZE_RANGE = (0.35, 0.60)  # object extent (longest side of its box) as a fraction of the image side
_LINE_COUNT = (1, 5)  # thin clutter lines per image (inclusive range)
_BLOB_SIGMA = (5.0, 25.0)  # contrast of the smooth background colour blobs
_NOISE_SIGMA = (2.0, 6.0)  # pixel noise
_MIN_COLOUR_DISTANCE = 150.0  # RGB distance between object colour and the local background mean
_COLOUR_CANDIDATES = 16
_BOXES_FILE = "boxes.json"
_META_FILE = "meta.json"
_TMP_TAG = ".tmp-"


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int in ``[low, high]`` or raise a ConfigError naming the allowed range."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {allowed}, got {value}")
    return value


def _check_params(image_size: Any, num_classes: Any, seed: Any) -> Tuple[int, int, int]:
    image_size = _check_int("image_size", image_size, _MIN_IMAGE_SIZE)
    num_classes = _check_int("num_classes", num_classes, 2, len(CLASS_NAMES))
    seed = _check_int("seed", seed, 0)
    return image_size, num_classes, seed


# --------------------------------------------------------------------------------------------------
# shapes: unit polygons centred on 0, as (outer outline, optional hole)


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(2 * points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * radii[:, None]


def _cross(half_width: float = 0.22) -> np.ndarray:
    a, w = 1.0, half_width
    arm = np.array([(-w, -a), (w, -a), (w, -w)])  # one arm and the inner corner that follows it
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]])  # rotation by 90 degrees
    return np.concatenate([arm @ np.linalg.matrix_power(quarter, k).T for k in range(4)])


_SHAPES: Dict[str, Tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_regular(64), None),
    "cross": (_cross(), None),
    "ring": (_regular(64), _regular(64, radius=0.55)),
    "square": (_regular(4, phase=math.pi / 4), None),
    "star": (_star(), None),
    "triangle": (_regular(3), None),
}
assert set(_SHAPES) == set(CLASS_NAMES)


# --------------------------------------------------------------------------------------------------
# rendering


def _rngs(seed: int, index: int) -> Tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent generators for background, object and noise of image ``index``."""
    children = np.random.SeedSequence([seed, index]).spawn(3)
    bg, obj, noise = (np.random.default_rng(child) for child in children)
    return bg, obj, noise


def _stroke_scale(image_size: int) -> float:
    """Line and outline widths grow with the image above 64 px so they stay visible."""
    return max(1.0, image_size / 64.0)


def _render_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Clutter with no class evidence: gradient + colour blobs + thin lines. Returns float32 HxWx3."""
    big = image_size * _SUPERSAMPLE
    grid = int(rng.integers(3, 7))
    corners = rng.uniform(40, 215, 3) + rng.normal(0, 35, (2, 2, 3))
    t = np.linspace(0.0, 1.0, grid)
    rows, cols = t[:, None, None], t[None, :, None]
    left = corners[0, 0] * (1 - rows) + corners[1, 0] * rows
    right = corners[0, 1] * (1 - rows) + corners[1, 1] * rows
    gradient = left * (1 - cols) + right * cols
    blobs = rng.normal(0, rng.uniform(*_BLOB_SIGMA), (grid, grid, 3))
    low = np.clip(gradient + blobs, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(low, "RGB").resize((big, big), Image.Resampling.BICUBIC)

    draw = ImageDraw.Draw(canvas, "RGBA")
    for _ in range(int(rng.integers(_LINE_COUNT[0], _LINE_COUNT[1] + 1))):
        x0, y0, x1, y1 = (rng.uniform(-0.1, 1.1, 4) * big).tolist()
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        alpha = int(rng.integers(50, 150))
        width = max(1, round(rng.uniform(0.5, 1.5) * _stroke_scale(image_size) * _SUPERSAMPLE))
        draw.line([(x0, y0), (x1, y1)], fill=(*colour, alpha), width=width)
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)


def _place_shape(
    rng: np.random.Generator, class_name: str, image_size: int, outline_px: float
) -> List[np.ndarray]:
    """Rotate, scale and position the class polygon(s) in supersampled pixels.

    Returns:
        The placed polygons: the outer outline, then the hole if the shape has one.
    """
    big = image_size * _SUPERSAMPLE
    size_frac = rng.uniform(*_SIZE_RANGE)
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
    aspect = rng.uniform(0.9, 1.1)
    position = rng.random(2)

    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygons = [p * np.array([aspect, 1.0]) @ rotation.T for p in _SHAPES[class_name] if p is not None]
    low, high = polygons[0].min(axis=0), polygons[0].max(axis=0)
    scale = size_frac * big / float((high - low).max())
    span = (high - low) * scale
    margin = _SUPERSAMPLE + outline_px * _SUPERSAMPLE  # keeps the outline and 1 px of slack inside
    offset = margin + position * (big - 2 * margin - span) - low * scale
    return [p * scale + offset for p in polygons]


def _polygon_mask(polygons: List[np.ndarray], size: int, stroke: int = 0) -> Image.Image:
    """Supersampled "L" mask of the outer polygon minus the hole, optionally grown by ``stroke/2`` px."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for k, poly in enumerate(polygons):
        points = [tuple(p) for p in poly.tolist()]
        draw.polygon(points, fill=255 if k == 0 else 0)
        if stroke > 0:  # closed path, overlapping its first segment so every corner is rounded
            draw.line(points + points[:2], fill=255, width=stroke, joint="curve")
    return mask


def _coverage(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def _tight_box(coverage: np.ndarray) -> Box:
    rows = np.flatnonzero(coverage.any(axis=1))
    cols = np.flatnonzero(coverage.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _pick_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    """First of a fixed number of random colours far enough from the background (else the farthest)."""
    candidates = rng.integers(0, 256, (_COLOUR_CANDIDATES, 3)).astype(np.float32)
    distance = np.linalg.norm(candidates - local_mean, axis=1)
    far = np.flatnonzero(distance >= _MIN_COLOUR_DISTANCE)
    return candidates[far[0] if far.size else int(distance.argmax())]


def _shaded_fill(rng: np.random.Generator, colour: np.ndarray, box: Box, image_size: int) -> np.ndarray:
    """The fill colour with a mild linear shading in a random direction (no class information)."""
    amplitude = rng.uniform(0, 25)
    angle = rng.uniform(0, 2 * math.pi)
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    t = np.clip(((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / half, -1, 1)
    return colour + amplitude * t[:, :, None]


def _outline_colour(rng: np.random.Generator, fill: np.ndarray) -> np.ndarray:
    luminance = float(fill @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    grey = rng.uniform(0, 50) if luminance > 128 else rng.uniform(205, 255)
    return np.full(3, grey, dtype=np.float32)


def _draw_object(
    rng: np.random.Generator, image: np.ndarray, class_name: str, image_size: int
) -> Tuple[np.ndarray, Box]:
    """Composite the class object onto ``image`` (float HxWx3). Returns the new image and its tight box."""
    with_outline = rng.random() < 0.6
    outline_px = rng.uniform(0.6, 1.4) * _stroke_scale(image_size) if with_outline else 0.0
    polygons = _place_shape(rng, class_name, image_size, outline_px)

    big = image_size * _SUPERSAMPLE
    alpha = _coverage(_polygon_mask(polygons, big))
    stroke = round(2 * outline_px * _SUPERSAMPLE)
    alpha_out = _coverage(_polygon_mask(polygons, big, stroke)) if with_outline else alpha
    box = _tight_box(alpha_out)

    x0, y0, x1, y1 = box
    colour = _pick_colour(rng, image[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0))
    fill = _shaded_fill(rng, colour, box, image_size)
    if with_outline:
        outline = _outline_colour(rng, colour)
        image = image * (1 - alpha_out[:, :, None]) + outline * alpha_out[:, :, None]
    image = image * (1 - alpha[:, :, None]) + fill * alpha[:, :, None]
    return image, box


def _render(
    index: int, *, seed: int = 0, image_size: int = 64, num_classes: int = 6, draw_object: bool = True
) -> Tuple[Image.Image, Box | None, int]:
    """Render image ``index``; with ``draw_object=False`` the same image without its object (box None).

    Background, object and noise use independent generators, so the clutter-only image is pixel-identical
    to the full one outside the object's box.
    """
    index = _check_int("index", index, 0)
    image_size, num_classes, seed = _check_params(image_size, num_classes, seed)
    label = index % num_classes
    bg_rng, obj_rng, noise_rng = _rngs(seed, index)

    image = _render_background(bg_rng, image_size)
    box = None
    if draw_object:
        image, box = _draw_object(obj_rng, image, CLASS_NAMES[label], image_size)
    sigma = noise_rng.uniform(*_NOISE_SIGMA)
    image = image + noise_rng.normal(0, sigma, image.shape).astype(np.float32)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), box, label


def render_sample(
    index: int, *, seed: int = 0, image_size: int = 64, num_classes: int = 6
) -> Tuple[Image.Image, Box, int]:
    """Render image ``index`` of the synthetic data set alone, exactly as :func:`generate_synthetic` saves it.

    Args:
        index: image index (>= 0); its class is ``index % num_classes``.
        seed: data set seed (>= 0).
        image_size: side of the square image in pixels (>= 16).
        num_classes: number of classes, 2..len(CLASS_NAMES); the first ``num_classes`` names are used.

    Returns:
        (RGB image, box ``(x0, y0, x1, y1)`` tight around the object in pixels, x1/y1 exclusive,
        class index into ``CLASS_NAMES``).

    Raises:
        ConfigError: (a ValueError) for an argument out of range.
    """
    image, box, label = _render(index, seed=seed, image_size=image_size, num_classes=num_classes)
    assert box is not None
    return image, box, label


# --------------------------------------------------------------------------------------------------
# the cached folder


def _relative_path(index: int, label: int) -> str:
    name = CLASS_NAMES[label]
    return f"{name}/{name}_{index:05d}.png"


def _meta(num_images: int, image_size: int, num_classes: int, seed: int) -> Dict[str, Any]:
    return {
        "generator": _GENERATOR,
        "version": SYNTHETIC_VERSION,
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
        "num_classes": num_classes,
        "class_names": list(CLASS_NAMES[:num_classes]),
        "box_format": "xyxy pixels, x1 and y1 exclusive",
    }


def _read_meta(root: Path) -> Dict[str, Any] | None:
    try:
        return json.loads((root / _META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, meta: Dict[str, Any]) -> bool:
    """True if ``root`` holds a finished data set with these parameters (meta.json is written last)."""
    return root.is_dir() and _read_meta(root) == meta and (root / _BOXES_FILE).is_file()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (always assumed on Windows, where kill would kill)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_tmp(root: Path) -> None:
    """Delete ``<root>.tmp-<pid>-*`` siblings left by killed runs (their process no longer exists)."""
    if not root.parent.is_dir():
        return
    prefix = root.name + _TMP_TAG
    for path in root.parent.glob(prefix + "*"):
        pid_text = path.name[len(prefix) :].split("-", 1)[0]
        if path.is_dir() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _make_tmp(root: Path) -> Path:
    """A new empty sibling folder ``<root>.tmp-<pid>-<random>``."""
    return Path(tempfile.mkdtemp(prefix=f"{root.name}{_TMP_TAG}{os.getpid()}-", dir=root.parent))


def _progress(items: Iterable[int], total: int, enabled: bool) -> Iterable[int]:
    if not enabled:
        return items
    return tqdm(items, total=total, desc="synthetic data", unit="img")


def _write_dataset(folder: Path, meta: Dict[str, Any], progress: bool) -> None:
    num_images = meta["num_images"]
    for name in meta["class_names"]:
        (folder / name).mkdir()
    boxes: Dict[str, List[int]] = {}
    for index in _progress(range(num_images), num_images, progress):
        image, box, label = render_sample(
            index, seed=meta["seed"], image_size=meta["image_size"], num_classes=meta["num_classes"]
        )
        relative = _relative_path(index, label)
        image.save(folder / relative, format="PNG", compress_level=1)
        boxes[relative] = list(box)
    lines = ",\n".join(f"{json.dumps(key)}: {json.dumps(box)}" for key, box in boxes.items())
    (folder / _BOXES_FILE).write_text("{\n" + lines + "\n}\n", encoding="utf-8")
    (folder / _META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _is_ours(root: Path) -> bool:
    """True if ``root`` is absent, an empty folder, or a (possibly outdated) juap synthetic data set."""
    if not root.exists():
        return True
    meta = _read_meta(root)
    if isinstance(meta, dict) and meta.get("generator") == _GENERATOR:
        return True
    return root.is_dir() and not any(root.iterdir())


def _check_target(root: Path) -> None:
    if not _is_ours(root):
        raise DataError(
            f"{root} exists and is not a juap synthetic data set; remove it or choose another folder"
        )


def _install(tmp: Path, root: Path) -> None:
    """Move the finished ``tmp`` folder to ``root``, replacing an empty folder or an outdated data set."""
    _check_target(root)
    if root.exists():
        trash = _make_tmp(root)  # removed by _remove_stale_tmp if we are killed before rmtree
        os.replace(root, trash / root.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, root)


def _checked_meta(
    num_images: int = 3000, image_size: int = 64, num_classes: int = 6, seed: int = 0
) -> Dict[str, Any]:
    """The ``meta.json`` of the data set with these parameters (the defaults of :func:`generate_synthetic`
    and :func:`synthetic_root`), each checked: a ConfigError names one out of range."""
    num_images = _check_int("num_images", num_images, 1)
    image_size, num_classes, seed = _check_params(image_size, num_classes, seed)
    return _meta(num_images, image_size, num_classes, seed)


def generate_synthetic(root: str | os.PathLike, *, progress: bool = False, **params: int) -> Path:
    """Write the synthetic data set to ``root`` (atomically) and return ``root``.

    The images are rendered into a temporary sibling folder ``<root>.tmp-<pid>-*`` which is renamed to
    ``root`` when complete, so ``root`` is either absent or whole. An existing complete folder with the
    same parameters (matching ``meta.json``) is reused without rewriting; an outdated juap data set is
    replaced; temporary folders left by killed runs are removed.

    Args:
        root: destination folder; ``root/<class_name>/<class_name>_<index:05d>.png``, ``root/boxes.json``
            and ``root/meta.json`` are written.
        progress: show a tqdm progress bar (if tqdm is installed).
        **params: the data set's parameters, by keyword:
            ``num_images`` (default 3000, >= 1; image ``i`` has class ``i % num_classes``),
            ``image_size`` (64: side of the square RGB images in pixels, >= 16),
            ``num_classes`` (6: 2..len(CLASS_NAMES)) and ``seed`` (0: the data set seed, >= 0).

    Returns:
        ``root`` as a Path.

    Raises:
        ConfigError: (a ValueError) for an argument out of range.
        DataError: if ``root`` exists and is something other than a juap synthetic data set.
    """
    root = Path(root)
    meta = _checked_meta(**params)
    if _is_complete(root, meta):
        return root

    _check_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = _make_tmp(root)
    try:
        _write_dataset(tmp, meta, progress)
        if _is_complete(root, meta):  # another process finished first
            return root
        try:
            _install(tmp, root)
        except OSError:
            if _is_complete(root, meta):  # lost a race against another process
                return root
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_cache_dir() -> Path:
    """Folder where juap caches generated data.

    Returns:
        ``$JUAP_CACHE`` if set and non-empty, else ``~/.cache/juap``.
    """
    env = os.environ.get("JUAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "juap"


def synthetic_root(
    *, cache_dir: str | os.PathLike | None = None, progress: bool = False, **params: int
) -> Path:
    """Path of the cached synthetic data set for these parameters, generated if missing.

    The folder name encodes the generator version and the parameters, e.g.
    ``<cache_dir>/synthetic-v1-n3000-s64-c6-seed0``, so a rendering change never reuses stale images.

    Args:
        cache_dir: cache folder; defaults to :func:`default_cache_dir`.
        progress: show a progress bar while generating.
        **params: ``num_images``, ``image_size``, ``num_classes`` and ``seed``, as for
            :func:`generate_synthetic` (with its defaults).

    Returns:
        The data set folder (ImageFolder layout plus ``boxes.json`` and ``meta.json``).
    """
    m = _checked_meta(**params)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = "synthetic-v{version}-n{num_images}-s{image_size}-c{num_classes}-seed{seed}".format(**m)
    return generate_synthetic(base / name, progress=progress, **params)


def load_boxes(root: str | os.PathLike) -> Dict[str, Box]:
    """Read the object boxes of a synthetic data set.

    Args:
        root: data set folder written by :func:`generate_synthetic`.

    Returns:
        ``{relative posix path: (x0, y0, x1, y1)}``, e.g. ``{"circle/circle_00000.png": (12, 9, 40, 37)}``;
        coordinates are pixels of the saved image, x1 and y1 exclusive.

    Raises:
        DataError: if ``boxes.json`` is missing or malformed.
    """
    path = Path(root) / _BOXES_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        boxes = {str(key): tuple(int(v) for v in value) for key, value in raw.items()}
    except FileNotFoundError:
        raise DataError(f"{path} not found: {root} is not a synthetic data set") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is malformed: {exc}") from None
    bad = [key for key, box in boxes.items() if len(box) != 4]
    if bad:
        raise DataError(f"{path} is malformed: box of {bad[0]!r} does not have 4 numbers")
    return boxes  # type: ignore[return-value]


def boxes_by_test_index(splits: Any) -> Dict[int, Sequence[int]] | None:
    """Object boxes of the test images, by test index (``None`` if the data set has none)."""

    try:
        boxes = load_boxes(splits.root)
    except DataError as e:
        logging.getLogger(__name__).warning("no pointing game: %s", e)
        return None
    root = Path(splits.root).resolve()
    out = {}
    for i in range(len(splits.test)):
        path = Path(splits.test.path(i))
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:  # already relative to the data root
            rel = path.as_posix()
        if rel in boxes:
            out[i] = boxes[rel]
    return out


@DATASETS.register("synthetic")
class Synthetic(DataSet):
    """The embedded data set (the default): generated into the cache on first use (``data.root``, if
    given, is the cache folder), with object boxes, small enough to decode once for training."""

    needs_root = False
    records_boxes = True
    in_memory = True

    @classmethod
    def root(cls, cfg, *, progress: bool = False) -> str:
        params = dict(num_images=cfg.num_images, image_size=cfg.image_size, num_classes=cfg.num_classes)
        cache = cfg.root or None
        return str(synthetic_root(cache_dir=cache, seed=cfg.synthetic_seed, progress=progress, **params))
