"""Grad-CAM (Selvaraju et al. 2017), eq 11, built inside autograd so a loss on the map reaches the input.

The channel weights are ``alpha_k = mean_ij d y_c / d A_k(i, j)``, computed with
``torch.autograd.grad(..., create_graph=True)``: the map's own input-gradient then also flows through
``alpha`` (which needs non-zero second derivatives: use :func:`~juap.interpreters.make_surrogate`).
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import INTERPRETERS
from ..classifiers.base import Classifier
from ..errors import ConfigError
from .base import Classes, Interpreter, resolve_classes


@INTERPRETERS.register("gradcam")
class GradCAM(Interpreter):
    """Grad-CAM, eq 11: ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial mean of ``d y_c / d A_k``.

    At the default layer (the classifier's CAM layer) ``A`` is
    ``classifier.forward_features(x)`` and the logits are ``classifier.forward_head(A)``: one forward,
    no hooks, and the gradient only goes back through the head. At another layer ``A`` is captured by a
    forward hook that is always removed.

    Works when neither the images nor the classifier's parameters require grad (the captured activation
    is then made a leaf that does), in eval mode, and under ``torch.no_grad()`` (the maps then carry no
    graph). In train mode BatchNorm couples the samples of a batch, so each map depends on the batch.

    Args:
        classifier: a global-average-pool + linear :class:`~juap.classifiers.Classifier`.
        layer: ``None`` for the CAM layer, or a dotted module name inside ``classifier.model``
            (e.g. ``"layer3"``) whose output is a (N, K, h, w) map and which runs once per forward.

    Example:
        >>> gc = juap.create_interpreter("gradcam", surrogate, layer="layer3")
        >>> logits, maps = gc.explain(x_hat)   # maps of the predicted classes, (N, h, w)
    """

    name = "gradcam"
    label = "GradCAM"
    option_names = ("layer",)
    needs_surrogate = True  # eq 11 differentiates the classifier: its ReLUs need eq 15 to pass a gradient

    def __init__(self, classifier: Classifier, *, layer: str | None = None) -> None:
        super().__init__(classifier)
        if layer is not None:
            _check_layer(classifier, layer)
        self.layer = None if layer == classifier.cam_layer else layer

    def channel_weights(
        self, logits: torch.Tensor, classes: torch.Tensor, acts: torch.Tensor, *, create_graph: bool
    ) -> torch.Tensor:
        """Eq 11: ``alpha`` (N, K), the spatial mean of d logits[n, classes[n]] / d acts[n] (N, K, h, w).

        The one hook a Grad-CAM variant overrides.
        """
        score = logits.gather(1, classes[:, None]).sum()  # samples are independent in eval mode
        (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph, allow_unused=True)
        if grads is None:
            raise ConfigError(f"the logits do not depend on layer {self.layer!r}: pick one on the main path")
        return grads.mean(dim=(2, 3))

    def explain(self, x: torch.Tensor, classes: Classes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward: logits (N, C) and Grad-CAM maps (N, h, w) of ``classes`` (``None``: predicted)."""
        if torch.is_inference_mode_enabled() or x.is_inference():
            raise ConfigError(
                "Grad-CAM differentiates the classifier, which torch.inference_mode() forbids: "
                "use torch.no_grad() instead (and x.clone() for a tensor made under inference_mode)"
            )
        grad_on = torch.is_grad_enabled()
        if self.layer is None:
            logits, classes, acts, alpha = self._weights_at_cam_layer(x, classes, grad_on)
        else:
            logits, classes, acts, alpha = self._weights_at_layer(x, classes, grad_on)
        maps = F.relu(torch.einsum("nk,nkhw->nhw", alpha, acts))  # (N, h, w); no graph if autograd is off
        return logits, maps

    def _weights_at_cam_layer(self, x: torch.Tensor, classes: Classes, grad_on: bool) -> tuple:
        clf = self.classifier
        feats = clf.forward_features(x)  # (N, K, h, w)
        logits = clf.forward_head(feats)  # (N, C)
        classes = resolve_classes(logits, classes)
        with torch.enable_grad():
            head_logits = logits
            if not feats.requires_grad:  # nothing upstream needs a gradient: differentiate the head alone
                feats.requires_grad_()
                head_logits = clf.forward_head(feats)
            alpha = self.channel_weights(head_logits, classes, feats, create_graph=grad_on)
        return logits, classes, feats, alpha

    def _weights_at_layer(self, x: torch.Tensor, classes: Classes, grad_on: bool) -> tuple:
        module = self.classifier.model.get_submodule(self.layer)
        with torch.enable_grad(), _capture_output(module, self.layer) as store:
            logits = self.classifier(x)  # (N, C)
        acts = store["output"]  # (N, K, h, w)
        classes = resolve_classes(logits, classes)
        with torch.enable_grad():
            alpha = self.channel_weights(logits, classes, acts, create_graph=grad_on)
        if not grad_on:
            # Only reached when the caller turned autograd off: the logits were built with grad enabled
            # (the hooked forward had to), and are handed back without their graph, like every output.
            logits = logits.detach()
        return logits, classes, acts, alpha

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer!r}"


@contextmanager
def _capture_output(module: nn.Module, name: str) -> Iterator[dict]:
    """Capture ``module``'s output (made to require grad) in ``store["output"]``; the hook is always removed.

    Downstream layers receive a clone, so their in-place ops cannot change the captured activation.
    """
    store: dict = {}

    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"Grad-CAM layer {name!r} outputs {got}, not a (N, K, h, w) feature map")
        if "output" in store:
            raise ConfigError(f"Grad-CAM layer {name!r} runs more than once per forward: pick one")
        if not out.requires_grad:  # neither the input nor the parameters require grad: start the graph here
            out.requires_grad_()
        store["output"] = out
        return out.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
    if "output" not in store:
        raise ConfigError(f"Grad-CAM layer {name!r} was not reached in the classifier's forward pass")


def _check_layer(classifier: Classifier, layer: str) -> None:
    try:
        classifier.model.get_submodule(layer)
    except AttributeError:
        top = ", ".join(name for name, _ in classifier.model.named_children())
        names = [n for n, _ in classifier.model.named_modules() if n]
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"Grad-CAM layer {layer!r} is not a module of classifier {classifier.arch!r}.{hint} "
            f"Top-level layers: {top} (nested ones are dotted, e.g. 'layer3.1'; None means the CAM layer)"
        ) from None

