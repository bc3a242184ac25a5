"""Decoding any image PIL can open to RGB in [0, 1], scaled by the range of its mode (never clipped).

PIL's ``convert("RGB")`` is right for 8-bit images but clips the 16- and 32-bit integer modes to 255:
a 16-bit grayscale picture whose mean is 0.38 comes out almost white. Here:

| PIL mode | values | as RGB in [0, 1] |
|---|---|---|
| ``1`` | 0 / 1 | as they are |
| ``L``, ``LA``, ``La`` | 0..255 | L / 255 on every channel (alpha dropped) |
| ``P``, ``PA`` | palette indices | the palette's RGB / 255 (alpha dropped) |
| ``RGB``, ``RGBA``, ``RGBX``, ``RGBa`` | 0..255 | RGB / 255 (alpha dropped) |
| ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` | 0..255 | PIL's conversion to RGB, / 255 |
| ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` | 0..65535 | / 65535 |
| ``I`` (32-bit signed) | a TIFF's declared bits and sample format, else 0..65535 (16-bit PGM) | that range |
| ``F`` (32-bit float) | intensities | as they are, when in [0, 1] |

An ``I`` image outside [0, 65535] without a declared range, or an ``F`` image outside [0, 1] (or NaN), has
no range to scale it by: it is refused with a :class:`~juap.errors.DataError` rather than clipped.
16-bit RGB(A) PNGs are reduced to 8 bits per channel by PIL itself (correctly scaled, 1/255 precision).

The 8-bit modes stay PIL images (decoded exactly as before, so 8-bit results do not change); the
high-bit-depth modes become float tensors (3, H, W), which the transforms accept alike.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_EIGHT_BIT_VIA_RGBA = ("P", "PA", "RGBa", "La")  # palettes and premultiplied alpha: through RGBA
_TIFF_BITS, _TIFF_SAMPLE_FORMAT = 258, 339  # TIFF tags


def decode_rgb(im: Image.Image) -> Image.Image | torch.Tensor:
    """``im`` as RGB in [0, 1]: an 8-bit RGB PIL image, or a float tensor (3, H, W) for deeper modes.

    Raises:
        DataError: an ``I`` or ``F`` image whose values have no range to be scaled by (see the module).
    """
    mode = im.mode
    if mode in SIXTEEN_BIT:
        return _gray(np.asarray(im).astype(np.float32) / 65535.0)
    if mode == "I":
        return _gray(_scaled_int32(im))
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1:
            raise DataError(
                f"a 32-bit float image with values in [{lo:g}, {hi:g}]: float images are read as intensities "
                "in [0, 1] and are not clipped; save it rescaled to [0, 1] or as an integer image"
            )
        return _gray(a)
    if mode in _EIGHT_BIT_VIA_RGBA:
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")  # 1, L, LA, RGB(A/X), CMYK, YCbCr, LAB, HSV: 8-bit, PIL's conversions


def _scaled_int32(im: Image.Image) -> np.ndarray:
    """An ``I`` image over its declared range (a TIFF's bits and sample format), else as 16-bit."""
    a = np.asarray(im).astype(np.int64)
    tags = getattr(im, "tag_v2", None)
    bits = _first(tags.get(_TIFF_BITS)) if tags is not None else None
    if bits is not None and 0 < bits <= 32:
        signed = _first(tags.get(_TIFF_SAMPLE_FORMAT)) == 2
        if signed:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
            if bits == 32:
                a %= 2**32  # PIL keeps unsigned 32-bit samples in a signed int32 mode
        return ((a - lo) / float(hi - lo)).astype(np.float32)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise DataError(
            f"a 32-bit integer image with values in [{lo}, {hi}] and no declared bit depth: it cannot be "
            "scaled to [0, 1] without guessing; save it as an 8- or 16-bit image (or a TIFF that declares "
            "its bits per sample)"
        )
    return (a / 65535.0).astype(np.float32)


def _first(v):
    if isinstance(v, (tuple, list)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _gray(a: np.ndarray) -> torch.Tensor:
    """(H, W) floats in [0, 1] -> (3, H, W) float32 tensor."""
    return torch.from_numpy(np.array(a, dtype=np.float32)).unsqueeze(0).repeat(3, 1, 1)
