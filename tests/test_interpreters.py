"""CAM and Grad-CAM: parity with pytorch-grad-cam and Captum, gradients, and the interpreter face."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import juap
from juap.errors import ConfigError
from juap.interpreters import GradCAM, Interpreter, make_surrogate, normalize_maps, upsample_maps

pgc = pytest.importorskip("pytorch_grad_cam")
captum_attr = pytest.importorskip("captum.attr")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

SIZES = [(64, 96), (96, 96)]
CLASSES = [3, 500, 999]


def _make(name: str, **kw) -> juap.Classifier:
    torch.manual_seed(0)
    return juap.create_classifier(name, **kw).eval()


@pytest.fixture(scope="module")
def classifiers() -> dict:
    return {"resnet18": _make("resnet18"), "densenet121": _make("densenet121")}


class DenseNetWithReLU(nn.Module):
    """torchvision DenseNet with its functional ``relu(features)`` as a module, so hooks see the CAM map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features, self.relu, self.classifier = net.features, nn.ReLU(), net.classifier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.relu(self.features(z)), 1).flatten(1))


def _reference(clf: juap.Classifier, layer: str | None) -> tuple[nn.Module, nn.Module]:
    """The raw network and the module whose output is the explained map, for the independent tools."""
    if clf.arch == "densenet121":
        net = DenseNetWithReLU(clf.model)
        return net, net.relu
    return clf.model, clf.model.get_submodule(layer or "layer4")


class NativeSizeGradCAM(pgc.GradCAM):
    """pytorch-grad-cam's GradCAM with its cv2 resize made the identity (target size = map size)."""

    def get_target_width_height(self, input_tensor):
        acts = self.activations_and_grads.activations[0]
        return acts.shape[-1], acts.shape[-2]


def _inputs(size, n=3, seed=1, clf=None):
    """Images and classes to explain: fixed ones, or with ``clf`` image i's (i+1)-th most likely class.

    Random-weight nets give all-negative Grad-CAM maps (zeros after ReLU) for most classes; a likely
    class has a positive logit, hence a non-trivial map.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, *size, generator=g)
    if clf is None:
        return x, torch.tensor(CLASSES[:n])
    with torch.no_grad():
        ranked = clf(x).argsort(dim=1, descending=True)
    return x, ranked[torch.arange(n), torch.arange(n)]


def _grad_cam_lib(net, layer, z, classes):
    with NativeSizeGradCAM(net, [layer]) as cam:
        out = cam(z, [ClassifierOutputTarget(int(c)) for c in classes])
    return torch.from_numpy(out)


# -- parity ----------------------------------------------------------------------------------------


def test_reference_densenet_wrapper_matches_torchvision(classifiers):
    clf = classifiers["densenet121"]
    z = clf.normalize(_inputs((64, 64))[0])
    torch.testing.assert_close(DenseNetWithReLU(clf.model)(z), clf.model(z), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_gradcam_and_cam_match_pytorch_grad_cam(classifiers, arch, size):
    clf = classifiers[arch]
    x, classes = _inputs(size, clf=clf)
    net, layer = _reference(clf, None)
    theirs = _grad_cam_lib(net, layer, clf.normalize(x), classes)  # ReLU + min-max, native size
    assert (theirs.flatten(1).amax(1) > 0.99).all(), "degenerate reference maps: pick other classes"
    ours = juap.create_interpreter("gradcam", clf)(x, classes)
    assert ours.shape == theirs.shape == (3, size[0] // 32, size[1] // 32)
    torch.testing.assert_close(normalize_maps(ours), theirs, rtol=0, atol=1e-5)
    # GAP + linear head: Grad-CAM = ReLU(CAM) / (h w), so normalised they agree too.
    cam = juap.create_interpreter("cam", clf)(x, classes)
    torch.testing.assert_close(normalize_maps(F.relu(cam)), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_cam_and_gradcam_match_captum(classifiers, arch, size):
    clf = classifiers[arch]
    x, classes = _inputs(size, seed=2, clf=clf)
    net, layer = _reference(clf, None)
    lgc = captum_attr.LayerGradCam(net, layer)
    z = clf.normalize(x)
    with torch.no_grad():
        cam = juap.create_interpreter("cam", clf)(x, classes)
    h, w = cam.shape[-2:]
    # Without ReLU, Grad-CAM at the CAM layer of a GAP + linear head is CAM / (h w).
    raw = lgc.attribute(z, target=classes, relu_attributions=False).squeeze(1)
    torch.testing.assert_close(cam, raw * (h * w), rtol=1e-5, atol=1e-5 * cam.abs().max().item())
    theirs = lgc.attribute(z, target=classes, relu_attributions=True).squeeze(1)
    assert (theirs.flatten(1).amax(1) > 0).all(), "degenerate reference maps"
    ours = juap.create_interpreter("gradcam", clf)(x, classes)
    torch.testing.assert_close(normalize_maps(ours), normalize_maps(theirs), rtol=0, atol=1e-5)


def test_gradcam_at_inner_layer_matches_both_libraries(classifiers):
    clf = classifiers["resnet18"]
    x, classes = _inputs((64, 96), seed=3, clf=clf)
    net, layer = _reference(clf, "layer3")
    z = clf.normalize(x)
    ours = normalize_maps(juap.create_interpreter("gradcam", clf, layer="layer3")(x, classes))
    assert ours.shape == (3, 4, 6)
    torch.testing.assert_close(ours, _grad_cam_lib(net, layer, z, classes), rtol=0, atol=1e-5)
    theirs = captum_attr.LayerGradCam(net, layer).attribute(z, target=classes, relu_attributions=True)
    torch.testing.assert_close(ours, normalize_maps(theirs.squeeze(1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "arch, layer, smooth",
    [
        ("resnet18", None, False),
        ("resnet18", "layer3", False),
        ("resnet18", "layer3", True),
        ("densenet121", None, False),
    ],
)
def test_input_gradient_of_map_loss_matches_captum(classifiers, arch, layer, smooth):
    clf = classifiers[arch]
    if smooth:  # exercises the second-order path through alpha on both sides
        clf = make_surrogate(clf)
    x, classes = _inputs((64, 96), seed=4, clf=clf)
    map_size = (2, 3) if layer is None else (4, 6)
    weights = torch.rand(3, *map_size, generator=torch.Generator().manual_seed(5))

    def grad_of(maps_fn):
        xg = x.clone().requires_grad_()
        loss = (normalize_maps(maps_fn(xg)) * weights).sum()
        return torch.autograd.grad(loss, xg)[0]

    net, module = _reference(clf, layer)
    lgc = captum_attr.LayerGradCam(net, module)
    theirs = grad_of(
        lambda xg: lgc.attribute(
            clf.normalize(xg), target=classes, relu_attributions=True, grad_kwargs={"create_graph": True}
        ).squeeze(1)
    )
    interp = juap.create_interpreter("gradcam", clf, layer=layer)
    ours = grad_of(lambda xg: interp(xg, classes))
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


# -- the interpreter face --------------------------------------------------------------------------


FACE = {
    "resnet18": ({}, (2, 2)),
    "densenet121": ({}, (2, 2)),
    "small_resnet": ({"num_classes": 6}, (8, 8)),
    "torchvision": ({"arch": "mobilenet_v2"}, (2, 2)),
    "timm": ({"arch": "resnet18"}, (2, 2)),
}


@pytest.fixture(scope="module")
def face_classifiers(classifiers) -> dict:
    out = dict(classifiers)
    for name, (kw, _) in FACE.items():
        if name not in out:
            if name == "timm":
                pytest.importorskip("timm")
            out[name] = _make(name, **kw)
    return out


def test_registered_names():
    assert {"cam", "gradcam"} <= set(juap.list_interpreters())


@pytest.mark.parametrize("method", ["cam", "gradcam"])
@pytest.mark.parametrize("name", list(FACE))
def test_maps_shape_explain_and_gradients(face_classifiers, name, method):
    clf = face_classifiers[name]
    interp = juap.create_interpreter(method, clf)
    assert isinstance(interp, Interpreter) and isinstance(interp, nn.Module)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    logits, maps = interp.explain(x)
    assert maps.shape == (2, *FACE[name][1])
    torch.testing.assert_close(logits, clf(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, interp(x, logits.argmax(1)), rtol=0, atol=1e-6)
    weights = torch.rand(maps.shape, generator=torch.Generator().manual_seed(7))
    loss = (maps * weights).sum()
    gx, gw = torch.autograd.grad(loss, [x, clf.fc.weight])
    assert gx.abs().sum() > 0 and torch.isfinite(gx).all(), "no gradient reaches the images"
    assert gw.abs().sum() > 0, "no gradient reaches the classifier's parameters"
    norm = normalize_maps(maps)
    assert norm.min() >= 0 and norm.max() <= 1


@pytest.mark.parametrize("layer", [None, "layer3"])
def test_gradcam_with_frozen_classifier_input_without_grad_and_no_grad(layer):
    clf = _make("resnet18").requires_grad_(False)
    x, classes = _inputs((64, 64), n=2)
    interp = juap.create_interpreter("gradcam", clf, layer=layer)
    logits, maps = interp.explain(x, classes)
    assert maps.abs().sum() > 0
    with torch.no_grad():
        logits_ng, maps_ng = interp.explain(x, classes)
    assert not maps_ng.requires_grad and not logits_ng.requires_grad
    torch.testing.assert_close(maps_ng, maps, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_ng, logits, rtol=0, atol=1e-6)
    assert all(not m._forward_hooks for m in clf.modules()), "a hook was left behind"
    with torch.inference_mode(), pytest.raises(ConfigError, match="no_grad"):
        interp(x, classes)


def test_gradcam_at_layer_is_differentiable_through_input(classifiers):
    clf = classifiers["resnet18"]
    x = _inputs((64, 64), n=2)[0].requires_grad_()
    maps = juap.create_interpreter("gradcam", clf, layer="layer3")(x, torch.tensor([1, 2]))
    assert maps.shape == (2, 4, 4)
    (g,) = torch.autograd.grad(normalize_maps(maps).square().sum(), x)
    assert g.abs().sum() > 0


def test_gradcam_at_cam_layer_name_equals_default(classifiers):
    clf = classifiers["resnet18"]
    x, classes = _inputs((64, 64))
    hooked = GradCAM(clf, layer="layer4")
    torch.testing.assert_close(hooked(x, classes), GradCAM(clf)(x, classes), rtol=0, atol=0)


def test_normalize_maps():
    maps = torch.stack([torch.randn(3, 4), torch.full((3, 4), 2.5), torch.arange(12.0).view(3, 4)])
    maps.requires_grad_()
    out = normalize_maps(maps)
    assert out.shape == maps.shape and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    for i in (0, 2):
        assert out[i].detach().min() == 0 and float(out[i].detach().max()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(out[1], torch.zeros(3, 4))
    (g,) = torch.autograd.grad((out * torch.rand(3, 3, 4)).sum(), maps)
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0


def test_upsample_maps():
    maps = torch.rand(2, 3, 4)
    assert upsample_maps(maps, (64, 96)).shape == (2, 64, 96)
    assert upsample_maps(maps, 32).shape == (2, 32, 32)
    torch.testing.assert_close(upsample_maps(torch.ones(1, 2, 2), 8), torch.ones(1, 8, 8))


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_layer_names_the_top_level_layers(classifiers):
    with pytest.raises(ConfigError, match="layer5") as info:
        juap.create_interpreter("gradcam", classifiers["resnet18"], layer="layer5")
    for name in ("conv1", "layer3", "layer4", "fc"):
        assert name in str(info.value)


def test_bad_layers_and_options(face_classifiers):
    clf = face_classifiers["resnet18"]
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="more than once"):
        juap.create_interpreter("gradcam", clf, layer="layer1.0.relu")(x)
    with pytest.raises(ConfigError, match=r"not a \(N, K, h, w\)"):
        juap.create_interpreter("gradcam", clf, layer="fc")(x)
    with pytest.raises(ConfigError, match="not reached"):  # the adapter stops after its feature layer
        juap.create_interpreter("gradcam", face_classifiers["torchvision"], layer="classifier.0")(x)
    assert all(not m._forward_hooks for m in clf.modules())
    with pytest.raises(ConfigError, match="layer"):
        juap.create_interpreter("cam", clf, layer="layer3")
    with pytest.raises(ConfigError, match="Classifier"):
        juap.create_interpreter("cam", clf.model)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_bad_classes(classifiers, method):
    interp = juap.create_interpreter(method, classifiers["resnet18"])
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ConfigError, match=r"\[0, 1000\)"):
        interp(x, torch.tensor([0, 1000]))
    with pytest.raises(ConfigError, match=r"\[0, 1000\)"):
        interp(x, torch.tensor([-1, 3]))
    with pytest.raises(ConfigError, match="shape"):
        interp(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="integer"):
        interp(x, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(interp(x, 7), interp(x, torch.tensor([7, 7])))
