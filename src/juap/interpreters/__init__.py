"""Interpreters: CAM (eq 10), Grad-CAM (eq 11), the map helpers, and the smoothed ReLU (eq 15).

Importing this package registers ``"cam"``, ``"gradcam"`` and ``"rts"`` for :func:`juap.create_interpreter`,
and the evaluation-only peers ``"pgc:<method>"`` and ``"captum:<method>"`` (:mod:`juap.interpreters.peers`).
"""
from .base import Interpreter, normalize_maps, resolve_classes, split_spec, upsample_maps
from .cam import CAM
from .gradcam import GradCAM
from .smooth_relu import (
    SmoothReLU,
    SmoothReLUMode,
    count_relus,
    make_surrogate,
    relu_derivative,
    replace_relus,
    smooth_relu,
)

__all__ = [
    "CAM",
    "GradCAM",
    "Interpreter",
    "SmoothReLU",
    "SmoothReLUMode",
    "count_relus",
    "make_surrogate",
    "normalize_maps",
    "relu_derivative",
    "replace_relus",
    "resolve_classes",
    "smooth_relu",
    "split_spec",
    "upsample_maps",
]

from .peers import peer_names  # noqa: E402,F401  (registers the "pgc:" and "captum:" families)
from .rts import RTS, load_rts, rts_loss, save_rts  # noqa: E402,F401  (registers "rts")
