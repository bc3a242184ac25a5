"""Registered classifiers and weight loading (torchvision enums, local checkpoints, or none)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
import torch.nn as nn

from .._registry import CLASSIFIERS
from ..errors import CheckpointError, ConfigError, WeightsUnavailableError
from ..runtime.io import load_tensors, read_metadata, save_tensors
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    DenseNetClassifier,
    ForwardFeaturesClassifier,
    HookedClassifier,
    ResNetClassifier,
)
from .small_resnet import SmallResNet

DEMO_MEAN = (0.5, 0.5, 0.5)
DEMO_STD = (0.25, 0.25, 0.25)
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def create_classifier(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    reset_head: bool = False,
    **kwargs: Any,
) -> Classifier:
    """Build a registered classifier, optionally with weights.

    Args:
        name: a registered name (``juap.list_classifiers()``), e.g. ``"resnet18"``, ``"densenet121"``,
            ``"small_resnet"``, ``"torchvision"`` (with ``arch=``) or ``"timm"`` (with ``arch=``).
        num_classes: outputs of the head. With pretrained or checkpoint weights of another class count,
            the head is replaced by a fresh one (enum weights) or ``reset_head=True`` is required (files).
        weights: ``None`` (random init), a torchvision weight enum name such as ``"IMAGENET1K_V1"`` or
            ``"DEFAULT"``, ``"pretrained"`` for timm, or the path of a local checkpoint (safetensors, or a
            state dict loaded with ``weights_only=True``).
        reset_head: load a checkpoint's backbone but start a new head (fine-tuning to other classes).
        **kwargs: architecture options (``arch`` for the adapters, ``widths`` for ``small_resnet``).

    Returns:
        A :class:`Classifier` in eval mode.
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    is_file = weights is not None and _looks_like_path(weights)
    file_tensors: Dict[str, torch.Tensor] = {}
    file_meta: Dict[str, Any] = {}
    if is_file:
        file_tensors, file_meta = load_tensors(weights)
        _check_meta(name, file_meta, weights, kwargs)
    builder = CLASSIFIERS.get(name)
    enum_weights = None if is_file else weights
    clf: Classifier = builder(num_classes=num_classes, weights=enum_weights, **kwargs)
    if is_file:
        _load_state(clf, file_tensors, weights, num_classes=num_classes, reset_head=reset_head)
    elif num_classes is not None and num_classes != clf.num_classes:
        clf.replace_head(num_classes)
    return clf.eval()


def save_classifier(clf: Classifier, path: str | os.PathLike, **metadata: Any) -> Path:
    """Save ``clf.model``'s state dict as safetensors with its architecture in the metadata."""
    meta = {"format": "juap.classifier", "arch": clf.arch, "num_classes": clf.num_classes}
    meta.update(getattr(clf, "build_kwargs", {}))
    meta.update(metadata)
    return save_tensors(path, clf.model.state_dict(), meta)


def load_classifier(path: str | os.PathLike, **overrides: Any) -> Classifier:
    """Load a classifier saved by :func:`save_classifier` (its architecture is read from the file)."""
    meta = read_metadata(path)
    name = overrides.pop("name", None) or meta.get("arch")
    if name is None:
        raise CheckpointError(
            f"{path} does not say its architecture; use create_classifier(name, weights=path)"
        )
    kwargs = {**_arch_kwargs(meta), **overrides}
    return create_classifier(name, weights=path, **kwargs)


# -- weights --------------------------------------------------------------------------------------


def _looks_like_path(weights: str | os.PathLike) -> bool:
    s = str(weights)
    return (
        isinstance(weights, os.PathLike)
        or os.sep in s
        or s.endswith(_CHECKPOINT_SUFFIXES)
        or Path(s).exists()
    )


def _arch_kwargs(meta: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    if "widths" in meta:
        out["widths"] = tuple(meta["widths"])
    if "adapter_arch" in meta:
        out["arch"] = meta["adapter_arch"]
    return out


def _check_meta(name: str, meta: Dict[str, Any], path: Any, kwargs: Dict[str, Any]) -> None:
    saved = meta.get("arch")
    if saved is not None and saved != name:
        raise CheckpointError(
            f"checkpoint {path} was saved for classifier {saved!r}, not {name!r}; "
            f"use name {saved!r} or a checkpoint of {name!r}"
        )
    if meta.get("adapter_arch") and kwargs.get("arch") and meta["adapter_arch"] != kwargs["arch"]:
        raise CheckpointError(f"checkpoint {path} holds {meta['adapter_arch']!r}, not {kwargs['arch']!r}")
    if "widths" in meta and "widths" not in kwargs:
        kwargs["widths"] = tuple(meta["widths"])


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _load_state(
    clf: Classifier, sd: Dict[str, torch.Tensor], path: Any, *, num_classes: int | None, reset_head: bool
) -> None:
    sd = _strip_prefixes(sd)
    fc_key = f"{clf._fc_name}.weight"
    head_keys = {f"{clf._fc_name}.weight", f"{clf._fc_name}.bias"}
    if fc_key in sd:
        saved_classes = sd[fc_key].shape[0]
        if reset_head:
            sd = {k: v for k, v in sd.items() if k not in head_keys}
        elif num_classes is not None and num_classes != saved_classes:
            raise CheckpointError(
                f"checkpoint {path} has {saved_classes} classes but num_classes={num_classes} was asked; "
                "drop num_classes to use the checkpoint's head, or pass reset_head=True to start a new head"
            )
        elif saved_classes != clf.num_classes:
            clf.replace_head(saved_classes)
    missing, unexpected = _diff_keys(clf.model.state_dict(), sd, ignore=head_keys if reset_head else set())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit classifier {clf.arch!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]}). It was probably saved for another architecture."
        )
    if reset_head and num_classes is not None and num_classes != clf.num_classes:
        clf.replace_head(num_classes)
    try:
        clf.model.load_state_dict(sd, strict=not reset_head)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path} does not fit classifier {clf.arch!r} (tensor shapes differ: "
            f"{first[1].strip() if len(first) > 1 else first[0]}). It was saved for another width or variant."
        ) from None


def _diff_keys(own: Dict[str, Any], sd: Dict[str, Any], ignore: set) -> tuple:
    missing = sorted(k for k in own if k not in sd and k not in ignore)
    unexpected = sorted(k for k in sd if k not in own)
    return missing, unexpected


def _torchvision_model(arch: str, weights: str | None) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise ConfigError(
            f"torchvision has no model {arch!r}; see torchvision.models.list_models()"
        ) from None
    if weights is None:
        return builder(weights=None)
    enum = torchvision.models.get_model_weights(arch)
    try:
        w = enum[str(weights)]
    except KeyError:
        names = ", ".join(["DEFAULT", *[m.name for m in enum]])
        raise ConfigError(
            f"{weights!r} is neither a checkpoint file nor a weight of {enum.__name__} (known: {names})"
        ) from None
    try:
        return builder(weights=w)
    except Exception as e:  # urllib/http/ssl/socket errors all mean the same thing to a user
        raise WeightsUnavailableError(
            f"could not fetch torchvision weights {enum.__name__}.{w.name} from {w.url} "
            f"({type(e).__name__}: {e}). This machine may be offline: download that file on a machine "
            "with internet and pass its path as weights=/path/to/file.pth"
        ) from None


# -- registered builders ---------------------------------------------------------------------------


def _register_torchvision(names: Sequence[str], cls: type) -> None:
    for arch in names:

        def build(*, num_classes=None, weights=None, arch=arch, mean=None, std=None) -> Classifier:
            model = _torchvision_model(arch, weights)
            return cls(model, arch=arch, mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)

        CLASSIFIERS.register(arch)(build)


_register_torchvision(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"], ResNetClassifier)
_register_torchvision(["densenet121", "densenet161", "densenet169", "densenet201"], DenseNetClassifier)


@CLASSIFIERS.register("small_resnet")
def _small_resnet(
    *, num_classes=None, weights=None, widths: Sequence[int] = (16, 32, 64), mean=DEMO_MEAN, std=DEMO_STD
) -> Classifier:
    """The demo classifier for the embedded 64x64 data (8x8 CAM map at 64x64)."""
    if weights is not None:
        raise ConfigError("small_resnet has no downloadable weights: pass a checkpoint path or train it")
    widths = tuple(int(w) for w in widths)
    if len(widths) != 3:
        raise ConfigError(f"small_resnet widths must have 3 entries, got {widths}")
    model = SmallResNet(num_classes=num_classes or 6, widths=widths)
    clf = ForwardFeaturesClassifier(
        model, fc=model.fc, arch="small_resnet", mean=mean, std=std, cam_layer="layer3"
    )
    clf.build_kwargs = {"widths": list(widths)}
    return clf


@CLASSIFIERS.register("torchvision")
def _torchvision_any(*, arch: str, num_classes=None, weights=None, mean=None, std=None) -> Classifier:
    """Any torchvision CNN whose head is global-average-pool + linear (ResNeXt, RegNet, MobileNetV2, ...)."""
    model = _torchvision_model(arch, weights)
    fc = _find_linear_head(model, arch)
    if isinstance(getattr(model, "avgpool", None), nn.AdaptiveAvgPool2d):
        layer, capture = "avgpool", "input"
    elif isinstance(getattr(model, "features", None), nn.Module):
        layer, capture = "features", "output"
    else:
        raise ConfigError(
            f"torchvision {arch!r} has neither 'avgpool' nor 'features': not a GAP + linear CNN"
        )
    clf = HookedClassifier(
        model,
        feature_layer=layer,
        capture=capture,
        fc=fc,
        arch="torchvision",
        mean=mean or IMAGENET_MEAN,
        std=std or IMAGENET_STD,
    )
    clf.build_kwargs = {"adapter_arch": arch}
    _verify_gap_linear(clf, arch)
    return clf


@CLASSIFIERS.register("timm")
def _timm_any(*, arch: str, num_classes=None, weights=None, mean=None, std=None) -> Classifier:
    """Any timm CNN whose head is global average pooling + linear (``weights="pretrained"`` downloads)."""
    try:
        import timm
    except ImportError:
        raise ConfigError("the 'timm' classifier needs the timm package: pip install timm") from None
    if weights not in (None, "pretrained"):
        raise ConfigError(f"timm weights must be None, 'pretrained' or a checkpoint path, got {weights!r}")
    try:
        model = timm.create_model(arch, pretrained=weights == "pretrained")
    except RuntimeError as e:
        raise ConfigError(f"timm has no model {arch!r} ({e})") from None
    except Exception as e:
        raise WeightsUnavailableError(
            f"could not fetch timm weights for {arch!r} ({type(e).__name__}: {e})"
        ) from None
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"timm {arch!r} head is {type(head).__name__}, not a linear layer")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    clf = ForwardFeaturesClassifier(
        model,
        fc=head,
        arch="timm",
        mean=mean or tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=std or tuple(cfg.get("std", IMAGENET_STD)),
    )
    clf.build_kwargs = {"adapter_arch": arch}
    _verify_gap_linear(clf, arch)
    return clf


def _find_linear_head(model: nn.Module, arch: str) -> nn.Linear:
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential):
        linears = [m for m in head if isinstance(m, nn.Linear)]
        others = [m for m in head if not isinstance(m, (nn.Linear, nn.Dropout, nn.Flatten, nn.Identity))]
        if len(linears) == 1 and not others:
            return linears[0]
    raise ConfigError(f"torchvision {arch!r} does not end in a single linear layer: not a GAP + linear CNN")


@torch.no_grad()
def _verify_gap_linear(clf: Classifier, arch: str) -> None:
    """Fail early if features -> GAP -> fc does not reproduce the network's own logits."""
    was_training = clf.training
    clf.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        ours = clf(x)
        theirs = clf.model(clf.normalize(x))
    finally:
        clf.train(was_training)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ConfigError(
            f"{arch!r} is not a global-average-pool + linear CNN: its feature map through GAP and the "
            "linear layer does not reproduce its logits, so CAM is undefined for it"
        )
