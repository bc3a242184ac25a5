"""RTS: a real-time saliency (masking) model in the spirit of Dabkowski & Gal (NeurIPS 2017), eq 12.

The masking model ``R`` maps an image and a class to a mask in [0, 1] at 1/4 of the image's resolution::

    feats = e(x)                                  # (N, K, h, w)  frozen, trained encoder
    z     = bottleneck(feats)                     # (N, D, h, w)  1x1 conv
    s     = sigmoid(<z, emb[c]> / sqrt(D))        # (N, 1, h, w)  class selector (D&G's embedding gate)
    mask  = sigmoid(decoder(cat(z * s, z * emb[c])))   # (N, H/4, W/4)

The encoder is, by default, the classifier's own feature extractor (``classifier.forward_features``);
optionally a named torchvision ResNet with pretrained weights (never a random one). Encoder and
classifier are frozen: their parameters do not require grad and stay in eval mode even in
``rts.train()``, but gradients w.r.t. the input flow through the whole model (the attack needs them).

The model is trained per classifier with :func:`rts_loss` (eq 12) by
:func:`~juap.interpreters.rts_training.train_rts` (which builds on this module; ``juap train-rts`` calls
it); :func:`save_rts` / :func:`load_rts` store only the trainable part (bottleneck, embedding, decoder) with
a fingerprint of the classifier's (and encoder's) weights, so a checkpoint is refused for any other
classifier. ``juap.create_interpreter("rts", clf)`` without ``checkpoint=`` gives
an *untrained* model: attacks and figures need a trained checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import INTERPRETERS
from .._validate import check_int
from ..classifiers.base import Classifier
from ..classifiers.factory import create_classifier
from ..errors import CheckpointError, ConfigError
from ..runtime.config import signature_defaults
from ..runtime.io import load_tensors, read_metadata, save_tensors
from ..runtime.provenance import check_classifier_record, classifier_record, fingerprint
from .base import Classes, Interpreter, check_options, resolve_classes

RTS_FORMAT = "juap.rts"
RTS_FORMAT_VERSION = 1
ENCODERS = ("classifier", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
"""Accepted ``encoder`` names: the classifier itself, or a pretrained torchvision ResNet."""

_FROZEN_PREFIXES = ("classifier.", "encoder_net.")


class _UpBlock(nn.Module):
    """x2 bilinear upsampling, then conv 3x3 + BatchNorm + ReLU: (N, C, h, w) -> (N, C', 2h, 2w)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = F.interpolate(z, scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(z)))


@INTERPRETERS.register("rts")
class RTS(Interpreter):
    """Real-time saliency masking model (Dabkowski & Gal 2017), the interpreter of eq 12 / eq 14.

    ``rts(x, classes)`` returns the mask ``R(x, c)`` (N, H/4, W/4) in [0, 1], differentiable w.r.t. ``x``.
    :meth:`encode` gives the encoder features ``e(x)`` used by the attack's extra loss
    ``||e(x_hat) - e(x)||_2`` (paper section IV-B5).

    Args:
        classifier: the explained :class:`~juap.classifiers.Classifier`. It is frozen in place
            (``requires_grad_(False)`` and eval mode, kept by :meth:`train`): the masking model explains a
            fixed classifier, and gradients w.r.t. the input still flow through it.
        encoder: ``"classifier"`` (default: the classifier's ``forward_features``) or a torchvision ResNet
            name (``"resnet18"`` ... ``"resnet152"``) whose ``layer4`` output is the bottleneck.
        encoder_weights: weights of a named encoder: a torchvision enum name (``"IMAGENET1K_V1"``,
            ``"DEFAULT"``) or a local checkpoint path. Required for a named encoder (a random encoder
            explains nothing); must be ``None`` for ``encoder="classifier"``.
        width: channels D of the bottleneck, the class embedding and the decoder.
        image_size: training image size, kept in the checkpoint's metadata (any size works at run time).

    Attributes:
        checkpoint: the file :func:`load_rts` read the trained weights from; ``None`` for an untrained
            model, whose masks mean nothing (attacks and figures need a trained checkpoint).

    Example:
        >>> rts = juap.create_interpreter("rts", clf, checkpoint="runs/rts/rts.safetensors")
        >>> logits, masks = rts.explain(x)       # (N, C), (N, H/4, W/4) for the predicted classes
        >>> feats = rts.encode(x)                # (N, K, h, w) encoder features e(x)
    """

    name = "rts"
    label = "RTS"
    option_names = ("encoder", "encoder_weights", "width", "image_size")
    requires_checkpoint = True  # an untrained masking model explains nothing

    @classmethod
    def create(cls, classifier: Classifier, **options) -> RTS:
        """``create_interpreter("rts", clf, checkpoint=path)`` loads a trained model; without, untrained."""
        checkpoint = options.pop("checkpoint", None)
        if checkpoint is not None:
            check_options("rts", options, ("encoder_weights",))
            return load_rts(checkpoint, classifier, **options)
        return super().create(classifier, **options)

    def __init__(
        self,
        classifier: Classifier,
        *,
        encoder: str = "classifier",
        encoder_weights: str | os.PathLike | None = None,
        width: int = 64,
        image_size: int | None = None,
    ) -> None:
        super().__init__(classifier)
        if encoder not in ENCODERS:
            raise ConfigError(f"RTS encoder {encoder!r} is not supported; allowed: {', '.join(ENCODERS)}")
        check_int("RTS width", width, low=1)
        self.encoder_name = encoder
        self.encoder_weights = None if encoder_weights is None else str(encoder_weights)
        self.width = width
        self.image_size = image_size
        self.checkpoint: str | None = None  # set by load_rts; None = untrained (attacks should refuse it)
        self.encoder_net = _build_encoder(encoder, encoder_weights)
        for module in (self.classifier, self.encoder_net):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        channels, stride = _probe_encoder(self._encoder)
        self.encoder_channels, self.encoder_stride = channels, stride
        self.bottleneck = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.embedding = nn.Embedding(classifier.num_classes, width)
        n_up = max(0, round(math.log2(stride / 4))) if stride > 4 else 0
        self.decoder = nn.Sequential(
            *[_UpBlock(2 * width if i == 0 else width, width) for i in range(n_up)],
            nn.Conv2d(2 * width if n_up == 0 else width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )
        self.to(next(self._encoder.parameters()).device)
        self.eval()  # like a created classifier: ready to explain; training code calls .train()

    # -- the face ---------------------------------------------------------------------------------
    @property
    def _encoder(self) -> Classifier:
        return self.classifier if self.encoder_net is None else self.encoder_net

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features e(x): images in [0, 1] (N, 3, H, W) -> (N, K, H/s, W/s), s the encoder stride."""
        return self._encoder.forward_features(x)

    def decode(self, feats: torch.Tensor, classes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Masks from encoder features.

        Args:
            feats: encoder features e(x), (N, K, h, w).
            classes: (N,) class indices selecting the embedding.
            size: the image size (H, W); masks come out at (H // 4, W // 4).

        Returns:
            Masks in [0, 1], (N, H // 4, W // 4).
        """
        z = self.bottleneck(feats)  # (N, D, h, w)
        emb = self.embedding(classes)[:, :, None, None]  # (N, D, 1, 1)
        select = torch.sigmoid((z * emb).sum(1, keepdim=True) / math.sqrt(self.width))  # (N, 1, h, w)
        z = torch.cat([z * select, z * emb], dim=1)  # (N, 2D, h, w)
        logits = self.decoder(z)  # (N, 1, h', w')
        out = (max(1, size[0] // 4), max(1, size[1] // 4))
        if tuple(logits.shape[-2:]) != out:
            logits = F.interpolate(logits, size=out, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits).squeeze(1)  # (N, H/4, W/4)

    def forward(self, x: torch.Tensor, classes: Classes = None) -> torch.Tensor:
        """Masks ``R(x, c)`` (N, H/4, W/4) in [0, 1] of ``classes`` (``None``: the predicted classes)."""
        if classes is None or self.encoder_net is None:
            return self.explain(x, classes)[1]
        # A separate encoder: the classifier is only needed to check the classes' range.
        probe = torch.empty(x.shape[0], self.classifier.num_classes, device=x.device)
        classes = resolve_classes(probe, classes)
        return self.decode(self.encode(x), classes, x.shape[-2:])

    def explain(self, x: torch.Tensor, classes: Classes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward: classifier logits (N, C) and masks (N, H/4, W/4) of ``classes`` (``None``: predicted).

        With the classifier as encoder, its feature map serves both the logits and the mask.
        """
        feats = self.classifier.forward_features(x)  # (N, K, h, w)
        logits = self.classifier.forward_head(feats)  # (N, C)
        classes = resolve_classes(logits, classes)
        enc = feats if self.encoder_net is None else self.encoder_net.forward_features(x)
        return logits, self.decode(enc, classes, x.shape[-2:])

    def train(self, mode: bool = True) -> RTS:
        """Train or eval the masking model; the frozen classifier and encoder always stay in eval mode."""
        super().train(mode)
        self.classifier.eval()
        if self.encoder_net is not None:
            self.encoder_net.eval()
        return self

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The masking model's own tensors (bottleneck, embedding, decoder), not the frozen networks."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_FROZEN_PREFIXES)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimiser should update (everything but the frozen classifier and encoder)."""
        return [p for n, p in self.named_parameters() if not n.startswith(_FROZEN_PREFIXES)]

    def save(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """:func:`save_rts` this model: ``create_interpreter("rts", clf, checkpoint=path)`` reads it."""
        return save_rts(self, path, **metadata)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, encoder={self.encoder_name!r}, width={self.width}, "
            f"stride={self.encoder_stride}"
        )


# -- eq 12 ------------------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (differentiable, torch only).

    Args:
        x: images (N, C, H, W).
        sigma: standard deviation in pixels; ``<= 0`` returns ``x``.

    Returns:
        Blurred images (N, C, H, W).
    """
    if sigma <= 0:
        return x
    c, h, w = x.shape[1:]
    radius = max(1, min(int(math.ceil(3 * sigma)), h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def blend(x: torch.Tensor, mask: torch.Tensor, alt: torch.Tensor) -> torch.Tensor:
    """Phi(x, M) = x * M_up + alt * (1 - M_up), M bilinearly upsampled to the image size.

    Args:
        x: images (N, 3, H, W).
        mask: masks (N, h, w) in [0, 1].
        alt: the replacement images (N, 3, H, W), e.g. a blurred copy of ``x``.

    Returns:
        (N, 3, H, W) blended images.
    """
    m = F.interpolate(mask.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x * m + alt * (1 - m)


def total_variation(mask: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """TV(M): mean over pixels of ``|dM/dx|^p + |dM/dy|^p`` per sample, (N, h, w) -> (N,)."""
    dx = (mask[:, :, 1:] - mask[:, :, :-1]).abs().pow(power).flatten(1).mean(1)
    dy = (mask[:, 1:, :] - mask[:, :-1, :]).abs().pow(power).flatten(1).mean(1)
    return dx + dy


def area(mask: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """AR(M): the mask's mean value (power 1, the paper), or D&G's ``mean((M + 5e-4)^p)``; (N,)."""
    if power == 1.0:
        return mask.flatten(1).mean(1)
    return (mask.flatten(1) + 5e-4).pow(power).mean(1)


def rts_loss(
    classifier: Classifier,
    x: torch.Tensor,
    mask: torch.Tensor,
    classes: torch.Tensor,
    *,
    tv_weight: float = 1.0,
    area_weight: float = 0.5,
    destroy_weight: float = 2.0,
    destroy_power: float = 0.3,
    area_power: float = 1.0,
    tv_power: float = 2.0,
    blur_sigma: float | None = None,
    real: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Eq 12 (Dabkowski & Gal): the masking model's training objective, averaged over the batch.

    ``L(M) = l1 TV(M) + l2 AR(M) - log f_c(Phi(x, M)) + l3 f_c(Phi(x, 1 - M))^l4``, with
    ``Phi(x, M) = x * M_up + blur(x) * (1 - M_up)`` and ``f_c`` the classifier's softmax probability.

    For a *fake* selector (``real[n]`` False, D&G's training with a random wrong class) the preserved
    image must not show the class: the preservation term is ``-log(1 - f_c(Phi(x, M)))`` and the
    destruction term is dropped, so the mask of a wrong class shrinks to nothing.

    Args:
        classifier: the explained classifier (eval mode; its parameters need not require grad).
        x: images in [0, 1], (N, 3, H, W).
        mask: masks M in [0, 1], (N, h, w) (upsampled bilinearly to H x W inside Phi).
        classes: (N,) the classes c the masks select.
        tv_weight: l1. area_weight: l2. destroy_weight: l3. destroy_power: l4.
        area_power: power inside AR (1: the mean of M as in the paper; D&G's code uses 0.3).
        tv_power: exponent of the mask's finite differences in TV (D&G use 2).
        blur_sigma: sigma of the Gaussian blur in pixels; ``None`` scales 10 px at 224 with the image side.
        real: (N,) bool, False where the selector is a fake class; ``None`` means all real.

    Returns:
        ``(loss, parts)``: the scalar loss and detached batch means of the unweighted terms ``tv``,
        ``area``, ``preserve`` (-log f_c), ``destroy`` (f_c^l4), and of the weighted ``total`` (= loss).
    """
    n, _, h, w = x.shape
    sigma = 10.0 * min(h, w) / 224.0 if blur_sigma is None else blur_sigma
    blurred = gaussian_blur(x, sigma)
    classes = classes.long().view(n, 1)
    preserved = F.log_softmax(classifier(blend(x, mask, blurred)), dim=1).gather(1, classes).squeeze(1)
    destroyed = F.softmax(classifier(blend(x, 1 - mask, blurred)), dim=1).gather(1, classes).squeeze(1)
    tv = total_variation(mask, tv_power)
    ar = area(mask, area_power)
    destroy = destroyed.clamp_min(1e-6).pow(destroy_power)
    preserve = -preserved
    if real is not None:
        real = real.to(x.device, torch.bool)
        # -log(1 - p) for a fake class, computed stably from log p.
        fake_term = -torch.log1p(-preserved.exp().clamp(max=1 - 1e-6))
        preserve = torch.where(real, preserve, fake_term)
        destroy = torch.where(real, destroy, torch.zeros_like(destroy))
    total = tv_weight * tv + area_weight * ar + preserve + destroy_weight * destroy
    loss = total.mean()
    parts = {
        "tv": tv.mean().detach(),
        "area": ar.mean().detach(),
        "preserve": preserve.mean().detach(),
        "destroy": destroy.mean().detach(),
        "total": loss.detach(),
    }
    return loss, parts


# -- checkpoints ------------------------------------------------------------------------------------


def save_rts(rts: RTS, path: str | os.PathLike, **metadata: Any) -> Path:
    """Save the masking model's trainable tensors (not the frozen classifier/encoder) as safetensors.

    The metadata records the classifier's architecture, class count and weight fingerprint (and the
    encoder's), so :func:`load_rts` refuses the checkpoint for any other classifier.
    """
    meta = {
        "format": RTS_FORMAT,
        "format_version": RTS_FORMAT_VERSION,
        **classifier_record(rts.classifier),
        "encoder": rts.encoder_name,
        "encoder_weights": rts.encoder_weights,
        "encoder_fingerprint": None if rts.encoder_net is None else fingerprint(rts.encoder_net),
        "width": rts.width,
        "image_size": rts.image_size,
    }
    meta.update(metadata)
    return save_tensors(path, rts.trainable_state_dict(), meta)


def load_rts(
    path: str | os.PathLike, classifier: Classifier, *, encoder_weights: str | os.PathLike | None = None
) -> RTS:
    """Load a masking model saved by :func:`save_rts` for ``classifier`` (the one it was trained for).

    Args:
        path: the ``rts.safetensors`` checkpoint.
        classifier: the explained classifier; it must have the checkpoint's architecture, class count
            and exactly the weights the model was trained with.
        encoder_weights: for a named encoder, where its weights are now (default: as saved).

    Returns:
        The trained :class:`RTS` in eval mode, on the classifier's device.

    Raises:
        CheckpointError: missing/corrupt file, not an RTS checkpoint, or trained for another classifier.
    """
    meta = read_metadata(path)
    if meta.get("format") != RTS_FORMAT:
        raise CheckpointError(
            f"{path} is not an RTS checkpoint (format {meta.get('format')!r}); "
            "train one with `juap train-rts` and pass its rts.safetensors"
        )
    if meta.get("format_version", 0) > RTS_FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer juap (format {meta['format_version']})")
    check_classifier_record(
        meta, classifier, path, what="RTS checkpoint", made="trained",
        fix="a masking model only explains the classifier it was trained with; train an RTS for this "
        "classifier with `juap train-rts`",
    )  # fmt: skip
    weights = encoder_weights if encoder_weights is not None else meta.get("encoder_weights")
    default = signature_defaults(RTS)  # what a checkpoint without the key was made with
    rts = RTS(
        classifier,
        encoder=meta.get("encoder", default["encoder"]),
        encoder_weights=weights,
        width=int(meta.get("width", default["width"])),
        image_size=meta.get("image_size"),
    )
    if rts.encoder_net is not None and meta.get("encoder_fingerprint") != fingerprint(rts.encoder_net):
        raise CheckpointError(
            f"RTS checkpoint {path} was trained with other {rts.encoder_name} encoder weights than "
            f"{weights!r}; pass the encoder weights it was trained with (encoder_weights=...)"
        )
    tensors, _ = load_tensors(path)
    own = rts.trainable_state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad_shape = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"RTS checkpoint {path} does not fit this masking model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shapes differ for {bad_shape[:3]}; "
            "it may be truncated or from another juap version"
        )
    rts.load_state_dict(tensors, strict=False)
    rts.checkpoint = str(path)
    device = next(classifier.parameters()).device
    return rts.to(device).eval()


# -- helpers ------------------------------------------------------------------------------------


def _build_encoder(name: str, weights: str | os.PathLike | None) -> Classifier | None:
    if name == "classifier":
        if weights is not None:
            raise ConfigError(
                "RTS encoder_weights only applies to a named encoder (e.g. encoder='resnet50'); "
                "the default encoder is the classifier itself, with its own weights"
            )
        return None
    if weights is None or str(weights) == "":
        raise ConfigError(
            f"RTS encoder {name!r} needs pretrained weights (encoder_weights='IMAGENET1K_V1', 'DEFAULT' or a "
            "checkpoint path): a randomly initialised encoder explains nothing. Or use "
            "encoder='classifier' (the default) to reuse the classifier's own trained features"
        )
    return create_classifier(name, weights=str(weights))


@torch.no_grad()
def _probe_encoder(encoder: Classifier) -> Tuple[int, int]:
    """Channels K and total stride of an encoder, from one forward of a 64x64 image."""
    p = next(encoder.parameters())
    feats = encoder.forward_features(torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype))
    if feats.dim() != 4:
        raise ConfigError(f"RTS encoder features must be (N, K, h, w), got {tuple(feats.shape)}")
    stride = 2 ** round(math.log2(64 / feats.shape[-1]))
    return int(feats.shape[1]), int(stride)
