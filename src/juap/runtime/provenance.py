"""Which classifier a saved artifact belongs to: a fingerprint of its weights, written with the artifact
(an RTS masking model, a detector) and checked when it is loaded for a classifier."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from typing import Any, Dict, Mapping

import torch
from torch import nn

from ..errors import CheckpointError


def fingerprint(module: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a module's state dict: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def juap_version() -> str:
    """The installed juap's version (``"unknown"`` when run from a tree that is not installed)."""
    try:
        return metadata.version("juap")
    except metadata.PackageNotFoundError:
        return "unknown"


def classifier_record(classifier) -> Dict[str, Any]:
    """The metadata that names ``classifier``: its architecture, class count and weight fingerprint."""
    return {
        "classifier_arch": classifier.arch,
        "num_classes": classifier.num_classes,
        "classifier_fingerprint": fingerprint(classifier),
    }


def check_classifier_record(
    meta: Mapping[str, Any], classifier, path: str | os.PathLike, *, what: str, made: str, fix: str
) -> None:
    """Refuse an artifact made for another classifier than ``classifier``.

    Args:
        meta: the artifact's metadata (:func:`classifier_record`'s keys).
        path: the artifact's file, for the message.
        what: the artifact, e.g. ``"detector"``; ``made``: how it was made, e.g. ``"fitted"``.
        fix: the end of the message, what to do instead.

    Raises:
        CheckpointError: another architecture or class count, or other weights.
    """
    arch, n = meta.get("classifier_arch"), meta.get("num_classes")
    if arch != classifier.arch or n != classifier.num_classes:
        raise CheckpointError(
            f"{what} {path} was {made} for classifier {arch!r} with {n} classes, not for this "
            f"{classifier.arch!r} with {classifier.num_classes} classes: {fix}"
        )
    own = fingerprint(classifier)
    if meta.get("classifier_fingerprint") != own:
        raise CheckpointError(
            f"{what} {path} was {made} for a classifier with other weights ({arch!r}, fingerprint "
            f"{meta.get('classifier_fingerprint')}, this one {own}): pass the classifier it was {made} "
            f"with, or {fix}"
        )
