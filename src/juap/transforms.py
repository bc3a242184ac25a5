"""What happens to an image on its way to a model: JPEG, resizing, cropping, blur.

A universal perturbation is added to a picture that is then saved, resized and cropped before a model sees
it. :func:`parse_transform` turns a spec such as ``"jpeg:75"`` into a function on a batch (N, 3, H, W) in
[0, 1] that returns a batch of the same shape (a resize or a crop is resized back to H x W, the model's
input size); :func:`juap.evaluation.evaluate` applies one to the benign and to the adversarial images alike
(``transform=``), so a fooled image is one whose prediction still differs after both went through it.

Specs (``name:value``):

========================  ==========================================================================
``jpeg:Q``                JPEG at quality Q (1-100; each image rounded to 8 bits, encoded, decoded)
``resize:F``              down (or up) by the factor F (antialiased bilinear), then back to H x W
``crop:F``                the centre F x F share of each side, resized back to H x W
``random_crop:F``         a random F x F box (one draw per batch, the same for a benign image and its
                          adversarial one), resized back; seeded by the batch's index
``blur:S``                Gaussian blur, standard deviation S pixels (kernel 2 * ceil(3 S) + 1)
========================  ==========================================================================
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

from .errors import ConfigError

Transform = Callable[..., torch.Tensor]  # (x, *, seed=0) -> x'


def _jpeg(quality: float) -> Transform:
    q = int(quality)
    if q != quality or not 1 <= q <= 100:
        raise ConfigError(f"jpeg quality must be a whole number in 1..100, got {quality:g}")

    def apply(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        pixels = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        from torchvision.io import decode_jpeg, encode_jpeg  # here: importing torchvision costs seconds

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs (for TorchCodec), per call
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            decoded = decode_jpeg(encode_jpeg(list(pixels), quality=q))
        return (torch.stack(decoded).float() / 255).to(x.device, x.dtype)

    apply.differentiable = False  # type: ignore[attr-defined]
    return apply


def _resize(factor: float) -> Transform:
    if not 0.05 <= factor <= 8:
        raise ConfigError(f"resize factor must be in [0.05, 8], got {factor:g}")

    def apply(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False, antialias=True)

    return apply


def _crop_box(h: int, w: int, fraction: float, gen=None) -> Tuple[int, int, int, int]:
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    if gen is None:
        return (h - ch) // 2, (w - cw) // 2, ch, cw
    top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    return top, left, ch, cw


def _crop(fraction: float, *, random: bool = False) -> Transform:
    if not 0.05 <= fraction <= 1:
        raise ConfigError(f"crop fraction must be in [0.05, 1], got {fraction:g}")

    def apply(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        h, w = x.shape[-2:]
        gen = torch.Generator().manual_seed(seed) if random else None
        top, left, ch, cw = _crop_box(h, w, fraction, gen)
        patch = x[..., top : top + ch, left : left + cw]
        return F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)

    return apply


def _blur(sigma: float) -> Transform:
    if not 0 < sigma <= 20:
        raise ConfigError(f"blur sigma must be in (0, 20] pixels, got {sigma:g}")
    kernel = 2 * math.ceil(3 * sigma) + 1

    def apply(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        k = min(kernel, 2 * (min(x.shape[-2:]) // 2) - 1)  # no wider than the image (odd)
        from torchvision.transforms.functional import gaussian_blur

        return gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])

    return apply


TRANSFORMS: Dict[str, Callable[[float], Transform]] = {
    "jpeg": _jpeg,
    "resize": _resize,
    "crop": _crop,
    "random_crop": lambda f: _crop(f, random=True),
    "blur": _blur,
}


def straight_through(transform: Transform) -> Transform:
    """``transform`` for training through it: as it is where it has a gradient (resize, crop, blur); the
    identity's gradient where it has none (JPEG: BPDA, Athalye et al. 2018)."""
    if getattr(transform, "differentiable", True):
        return transform

    def apply(x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        return x + (transform(x.detach(), seed=seed) - x).detach()

    return apply


def parse_transform(spec: str) -> Transform:
    """The transformation a spec names, e.g. ``"jpeg:75"``, ``"resize:0.5"``, ``"crop:0.875"``,
    ``"random_crop:0.8"``, ``"blur:1"``; a bad name or value is a ConfigError that lists the known ones."""
    name, _, value = str(spec).partition(":")
    if name not in TRANSFORMS:
        known = ", ".join(f"{n}:{_EXAMPLE[n]}" for n in TRANSFORMS)
        raise ConfigError(f"unknown transformation {spec!r}: use one of {known}")
    try:
        v = float(value)
    except ValueError:
        example = f"{name}:{_EXAMPLE[name]}"
        raise ConfigError(f"transformation {spec!r} needs a number after ':', e.g. {example}") from None
    return TRANSFORMS[name](v)


_EXAMPLE = {"jpeg": "75", "resize": "0.5", "crop": "0.875", "random_crop": "0.875", "blur": "1"}
