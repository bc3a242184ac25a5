"""Evaluation-only interpreters from the peers: every pytorch-grad-cam method and Captum's attributions.

An inspector may explain the classifier with a method the attack never trained against. These
interpreters let juap measure that: they run through :func:`juap.evaluate` like CAM and Grad-CAM, so
the figures are the same (per-sample min-max normalisation, top-k IoU, L1 at the method's native
resolution). They are not differentiable (pytorch-grad-cam works in NumPy), so no attack trains
against them (``evaluation_only``).

Names (one scheme, ``<library>:<method>``, case-insensitive; ``juap.PEER_INTERPRETERS`` lists them):

* ``pgc:<method>``: pytorch-grad-cam (``pip install 'juap[xai]'``) at the classifier's CAM layer, or
  at another layer with ``layer=`` (``"pgc:layercam@layer3"`` in a config). Maps come at that layer's
  resolution (pytorch-grad-cam's own ReLU and min-max scaling, without its resize to the image).
* ``captum:<method>``: a Captum attribution of the input pixels, reduced to a map as SPEC section 6
  says: absolute value, summed over the colour channels, at the input resolution. Baselines are a
  black image (Integrated Gradients with 32 steps, DeepLift, Occlusion); Occlusion slides a square
  window of 1/8 of the image side, without overlap (64 forward passes per image).

Example:
    >>> interp = juap.create_interpreter("pgc:scorecam", clf)
    >>> juap.evaluate(clf, n_hat, x_test, interpreters={"cam": cam, "pgc:scorecam": interp})
"""

from __future__ import annotations

import importlib
import sys
import types
from contextlib import contextmanager
from typing import Callable, ClassVar, Dict, Iterator, Optional

import torch
import torch.nn as nn

from .._registry import INTERPRETERS, UnknownNameError
from ..classifiers.base import Classifier
from ..errors import ConfigError
from .base import Classes, Interpreter, resolve_classes
from .gradcam import _check_layer

# method name -> class name in pytorch_grad_cam (those that take target layers and a classifier target)
PGC_METHODS: Dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "gradcamelementwise": "GradCAMElementWise",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
}
# method name -> class name in captum.attr (attributions of the input pixels)
CAPTUM_METHODS: Dict[str, str] = {
    "saliency": "Saliency",
    "integrated_gradients": "IntegratedGradients",
    "input_x_gradient": "InputXGradient",
    "guided_backprop": "GuidedBackprop",
    "deeplift": "DeepLift",
    "occlusion": "Occlusion",
}
LIBRARIES = {"pgc": ("pytorch_grad_cam", "pytorch-grad-cam"), "captum": ("captum.attr", "Captum")}


def peer_names() -> list[str]:
    """Every peer interpreter's name, e.g. ``["captum:deeplift", ..., "pgc:xgradcam"]``."""
    return sorted([f"pgc:{m}" for m in PGC_METHODS] + [f"captum:{m}" for m in CAPTUM_METHODS])


def _library(prefix: str, name: str):
    module, pretty = LIBRARIES[prefix]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"interpreter {name!r} needs {pretty}, which is not installed: pip install 'juap[xai]'"
        ) from None


class PeerInterpreter(Interpreter):
    """An evaluation-only interpreter whose maps another library computes (see the module's text)."""

    evaluation_only: ClassVar[bool] = True
    prefix: ClassVar[str] = ""
    method: ClassVar[str] = ""  # the class's name in the peer library

    @classmethod
    def create(cls, classifier: Classifier, **options) -> Interpreter:
        _library(cls.prefix, cls.name)  # a missing extra: one clear line, before anything is built
        return super().create(classifier, **options)

    def explain(self, x: torch.Tensor, classes: Classes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C) of one forward, and the peer's maps (N, h, w) of ``classes`` (``None``: predicted).

        The maps carry no graph (evaluation only); the classifier's parameters are left without gradients.
        """
        if torch.is_inference_mode_enabled() or x.is_inference():
            raise ConfigError(
                f"interpreter {self.name!r} differentiates the classifier, which torch.inference_mode() "
                "forbids: use torch.no_grad() instead"
            )
        with torch.no_grad():
            logits = self.classifier(x)
        classes = resolve_classes(logits, classes)
        with torch.enable_grad(), _frozen(self.classifier):
            maps = self._maps(x.detach(), classes)
        return logits, maps.to(device=x.device, dtype=x.dtype)

    def _maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GradCamPeer(PeerInterpreter):
    """A pytorch-grad-cam method at the CAM layer (``layer=None``) or at ``layer`` in ``classifier.model``."""

    prefix = "pgc"
    option_names = ("layer",)

    def __init__(self, classifier: Classifier, *, layer: Optional[str] = None) -> None:
        super().__init__(classifier)
        if layer is not None:
            _check_layer(classifier, layer)
        self.layer = None if layer == classifier.cam_layer else layer

    def _maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        lib = _library(self.prefix, self.name)
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self.layer is None:  # the CAM layer itself, whatever module (or function) makes it
            model: nn.Module = _Split(self.classifier)
            target = model.features
        else:
            model, target = self.classifier, self.classifier.model.get_submodule(self.layer)
        training = self.classifier.training
        cam = getattr(lib, self.method)(model=model, target_layers=[target])
        try:
            store = cam.activations_and_grads  # its activations list is made anew on each forward
            # pytorch-grad-cam resizes each map to the image: ask for the layer's own size instead
            cam.get_target_width_height = lambda _x: tuple(store.activations[-1].shape[-1:-3:-1])
            with _quiet_bars():
                maps = cam(
                    input_tensor=x.requires_grad_(), targets=[ClassifierOutputTarget(int(c)) for c in classes]
                )
        finally:
            cam.activations_and_grads.release()
            self.classifier.train(training)
        return torch.from_numpy(maps).float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer!r}"


@contextmanager
def _quiet_bars() -> Iterator[None]:
    """pytorch-grad-cam's Score-CAM and Ablation-CAM draw a progress bar per call (``tqdm.tqdm`` over their
    channel batches); inside juap's own bar that is noise, so they iterate plainly here."""
    plain = types.SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)
    modules = [sys.modules.get(f"pytorch_grad_cam.{m}") for m in ("score_cam", "ablation_cam")]
    saved = [(m, m.tqdm) for m in modules if m is not None and hasattr(m, "tqdm")]
    for m, _ in saved:
        m.tqdm = plain
    try:
        yield
    finally:
        for m, bar in saved:
            m.tqdm = bar


class CaptumPeer(PeerInterpreter):
    """A Captum attribution of the input pixels, reduced to |attribution| summed over channels, (N, H, W)."""

    prefix = "captum"

    def _maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        lib = _library(self.prefix, self.name)
        training = self.classifier.training
        model = _unique_modules(self.classifier, x) if self.method == "DeepLift" else self.classifier
        try:
            algo = getattr(lib, self.method)(model)
            attr = algo.attribute(x.requires_grad_(), target=classes, **self._attribute_options(x))
        finally:
            self.classifier.train(training)
        return attr.detach().abs().sum(dim=1)

    def _attribute_options(self, x: torch.Tensor) -> dict:
        if self.method in ("IntegratedGradients", "DeepLift"):
            opts = {"baselines": torch.zeros_like(x)}
            return (
                {**opts, "n_steps": 32, "internal_batch_size": len(x)}
                if self.method == "IntegratedGradients"
                else opts
            )
        if self.method == "Occlusion":
            side = max(1, min(x.shape[-2:]) // 8)
            return {"sliding_window_shapes": (x.shape[1], side, side), "strides": (x.shape[1], side, side),
                    "baselines": 0.0, "perturbations_per_eval": 8}  # fmt: skip
        return {}


def _unique_modules(classifier: Classifier, x: torch.Tensor) -> nn.Module:
    """``classifier``, or where it runs a module twice in one forward, a copy traced with torch.fx in which
    every call has its own module (DeepLift keeps per-call state on the module: torchvision's ResNet runs
    one ReLU twice per block)."""
    import copy

    import torch.fx as fx

    calls: Dict[nn.Module, int] = {}
    count = lambda m, _a, _o: calls.__setitem__(m, calls.get(m, 0) + 1)  # noqa: E731
    handles = [m.register_forward_hook(count) for m in classifier.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            classifier(x[:1])
    finally:
        for h in handles:
            h.remove()
    if all(n == 1 for n in calls.values()):
        return classifier
    try:
        graph = fx.symbolic_trace(_Traceable(copy.deepcopy(classifier)))
    except Exception as e:  # noqa: BLE001  (any tracing failure: say which model and why)
        raise ConfigError(
            f"captum:deeplift needs each module called once per forward; {classifier.arch!r} reuses some and "
            f"could not be traced to separate them ({type(e).__name__}): use captum:integrated_gradients"
        ) from None
    seen: set = set()
    for node in graph.graph.nodes:
        if node.op == "call_module":
            if node.target in seen:
                new = f"{node.target.replace('.', '_')}_call{len(seen)}"
                graph.add_submodule(new, copy.deepcopy(graph.get_submodule(node.target)))
                node.target = new
            seen.add(node.target)
    graph.recompile()
    return graph


class _Traceable(nn.Module):
    """``classifier``'s forward without its input checks (control flow that torch.fx cannot trace)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clf = self.classifier
        return clf.forward_head(clf.features((x - clf.mean) / clf.std))


class _Split(nn.Module):
    """``classifier`` as ``head(features(x))``: ``features`` is the module whose output is the CAM map."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.features = _Call(classifier.forward_features)
        self.head = _Call(classifier.forward_head)
        self.classifier = classifier  # so .parameters() finds the device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Call(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of ``module`` requires grad inside; each keeps its ``.grad`` (a peer leaves no trace)."""
    flags = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    for p, _, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag, grad in flags:  # pytorch-grad-cam calls model.zero_grad(): give back what was there
            p.requires_grad_(flag)
            p.grad = grad


def _resolver(prefix: str, methods: Dict[str, str], base: type) -> Callable[[str], type]:
    made: Dict[str, type] = {}

    def resolve(member: str) -> type:
        key = member.lower()
        if key not in methods:
            import difflib

            close = difflib.get_close_matches(key, list(methods), n=1)
            hint = f" Did you mean '{prefix}:{close[0]}'?" if close else ""
            known = ", ".join(f"{prefix}:{m}" for m in methods)
            raise UnknownNameError(f"unknown interpreter '{prefix}:{member}'.{hint} Known: {known}")
        if key not in made:
            label = f"{methods[key]} ({'pytorch-grad-cam' if prefix == 'pgc' else 'Captum'})"
            made[key] = type(methods[key] + "Peer", (base,),
                             {"name": f"{prefix}:{key}", "label": label, "method": methods[key]})  # fmt: skip
        return made[key]

    return resolve


INTERPRETERS.register_family("pgc", _resolver("pgc", PGC_METHODS, GradCamPeer))
INTERPRETERS.register_family("captum", _resolver("captum", CAPTUM_METHODS, CaptumPeer))
