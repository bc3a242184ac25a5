"""Smoothed ReLU (eq 15) and the attack's surrogate classifier."""
from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import juap
from juap.errors import ConfigError
from juap.interpreters import (
    GradCAM,
    SmoothReLU,
    SmoothReLUMode,
    count_relus,
    make_surrogate,
    normalize_maps,
    relu_derivative,
    smooth_relu,
)

TAU = 1e-4
GRID = [-3.0, -0.5, -0.02, -0.005, -1e-3, -1e-6, 0.0, 1e-6, 1e-3, 0.005, 0.02, 0.5, 3.0]


def a_eq15(s: float, tau: float = TAU) -> float:
    """Eq 15, written out independently of the library."""
    r = s / math.sqrt(s * s + tau)
    return 1.0 + r if s < 0 else r


def _make(name: str, **kw) -> juap.Classifier:
    torch.manual_seed(0)
    return juap.create_classifier(name, **kw).eval()


@pytest.fixture(scope="module")
def resnet():
    return _make("resnet18")


@pytest.fixture(scope="module")
def densenet():
    return _make("densenet121")


def _x(n=2, size=(64, 64), seed=0):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# -- the function ----------------------------------------------------------------------------------


def test_value_is_relu_and_first_derivative_is_eq15():
    s = torch.tensor(GRID, dtype=torch.float64, requires_grad=True)
    out = smooth_relu(s)
    assert torch.equal(out, F.relu(s))
    (g,) = torch.autograd.grad(out.sum(), s)
    expected = torch.tensor([a_eq15(v) for v in GRID], dtype=torch.float64)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    assert g[GRID.index(0.0)] == 0 and g[GRID.index(-1e-6)] > 0.99  # eq 15 as written: a(0) = 0, a(0^-) = 1
    torch.testing.assert_close(relu_derivative(s.detach()), expected)


def test_second_derivative_is_nonzero_and_correct():
    s = torch.tensor(GRID, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(smooth_relu(s).sum(), s, create_graph=True)
    torch.testing.assert_close(g, torch.tensor([a_eq15(v) for v in GRID], dtype=torch.float64))
    (h,) = torch.autograd.grad(g.sum(), s)
    expected = torch.tensor([TAU / (v * v + TAU) ** 1.5 for v in GRID], dtype=torch.float64)
    torch.testing.assert_close(h, expected, rtol=1e-10, atol=1e-12)
    assert (h > 0).all()
    (g_relu,) = torch.autograd.grad(F.relu(s).sum(), s, create_graph=True)
    h_relu = torch.autograd.grad(g_relu.sum(), s, allow_unused=True)[0] if g_relu.requires_grad else None
    assert h_relu is None or (h_relu == 0).all()  # what eq 15 is for


def test_backward_is_differentiable_gradgradcheck():
    # The backward (grad * a(s)) is checked against finite differences of itself. A plain gradcheck must
    # fail: the first derivative is a surrogate, not the derivative of ReLU's value.
    s = torch.tensor([-2.0, -0.3, -0.01, 0.02, 0.4, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: smooth_relu(t, 0.05), (s,))
    assert not torch.autograd.gradcheck(lambda t: smooth_relu(t, 0.05), (s,), raise_exception=False)


def test_module_and_mode():
    s = torch.randn(50, requires_grad=True)
    assert torch.equal(SmoothReLU(tau=TAU)(s), torch.relu(s))
    expected = relu_derivative(s.detach())
    inplace = (lambda t: F.relu(t, inplace=True), lambda t: t.clone().relu_(), lambda t: torch.relu_(t + 0))
    for fn in (F.relu, torch.relu, torch.Tensor.relu, *inplace):
        with SmoothReLUMode(tau=TAU):
            out = fn(s)
        (g,) = torch.autograd.grad(out.sum(), s)
        torch.testing.assert_close(g, expected)
    (g,) = torch.autograd.grad(F.relu(s).sum(), s)  # outside the mode: plain ReLU again
    assert torch.equal(g, (s > 0).float())


def test_mode_is_thread_local():
    s = torch.linspace(-0.01, 0.01, 11, requires_grad=True)
    seen = {}

    def other_thread():
        (seen["g"],) = torch.autograd.grad(F.relu(s).sum(), s)

    with SmoothReLUMode(tau=TAU):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert torch.equal(seen["g"], (s > 0).float())


# -- the surrogate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [("resnet18", {}), ("densenet121", {}), ("small_resnet", {})])
def test_surrogate_logits_equal_and_no_relu_module_survives(request, name, kw):
    fixtures = {"resnet18": "resnet", "densenet121": "densenet"}
    clf = request.getfixturevalue(fixtures[name]) if name in fixtures else _make(name, **kw)
    n_relus = count_relus(clf)
    assert n_relus > 0
    sur = make_surrogate(clf)
    assert count_relus(sur) == 0 and count_relus(clf) == n_relus
    assert any(isinstance(m, SmoothReLU) for m in sur.modules())
    assert isinstance(sur, type(clf)) and isinstance(sur, juap.Classifier)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sur(x), clf(x), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in sur.parameters())


def test_surrogate_shared_inplace_relu_replaced_everywhere(resnet):
    block = resnet.model.layer1[0]
    assert isinstance(block.relu, nn.ReLU) and block.relu.inplace  # used twice per block in forward
    sur = make_surrogate(resnet)
    assert isinstance(sur.model.layer1[0].relu, SmoothReLU)
    assert isinstance(sur.model.relu, SmoothReLU)


def test_original_classifier_is_unchanged(resnet):
    x = _x(seed=1).requires_grad_()
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    types = [type(m) for m in resnet.modules()]
    cls, flags = type(resnet), [p.requires_grad for p in resnet.parameters()]
    logits = resnet(x)
    (g,) = torch.autograd.grad(logits[:, 0].sum(), x)
    sur = make_surrogate(resnet)
    sur(x)[:, 0].sum().backward()
    assert type(resnet) is cls and [type(m) for m in resnet.modules()] == types
    assert [p.requires_grad for p in resnet.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in resnet.state_dict().items())
    logits2 = resnet(x)
    (g2,) = torch.autograd.grad(logits2[:, 0].sum(), x)
    assert torch.equal(logits2, logits) and torch.equal(g2, g)
    (g_sur,) = torch.autograd.grad(sur(x)[:, 0].sum(), x)
    assert not torch.allclose(g_sur, g, rtol=1e-6, atol=0)  # the surrogate's first derivative is smoothed


def test_second_derivative_of_logits_is_zero_for_relu_and_nonzero_for_surrogate(resnet):
    x = _x(seed=2)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def hvp(clf):
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(clf(xg)[:, 5].sum(), xg, create_graph=True)
        if not g.requires_grad:
            return torch.zeros_like(x)
        (h,) = torch.autograd.grad((g * v).sum(), xg, allow_unused=True)
        return torch.zeros_like(x) if h is None else h

    assert hvp(resnet).abs().max() == 0
    assert hvp(make_surrogate(resnet)).abs().max() > 0


def test_densenet_functional_relu_is_smoothed(densenet):
    """DenseNet's CAM map is ``F.relu(norm5(...))`` (no module): its derivative is a(s) in the surrogate."""

    def d_feats_d_norm5(clf):
        store = {}
        handle = clf.model.features.norm5.register_forward_hook(lambda m, a, out: store.setdefault("s", out))
        try:
            feats = clf.forward_features(_x(seed=3).requires_grad_())
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(feats.sum(), store["s"])
        return store["s"], g

    s, g = d_feats_d_norm5(densenet)
    assert torch.equal(g, (s > 0).float())
    s, g = d_feats_d_norm5(make_surrogate(densenet))
    a = relu_derivative(s, TAU)
    torch.testing.assert_close(g, a)
    assert (a - (s > 0).float()).abs().max() > 0.1
    assert torch._C._len_torch_function_stack() == 0  # the mode does not leak out of the forward


def test_gradcam_alpha_path_is_zero_with_relu_and_nonzero_with_surrogate(resnet):
    """Below the CAM layer, d alpha / d x is zero through ReLU (eq 11's weights are piecewise constant)."""

    class DetachedAlpha(GradCAM):
        def channel_weights(self, *args, **kwargs):
            return super().channel_weights(*args, **kwargs).detach()

    class KeepAlpha(GradCAM):
        def channel_weights(self, *args, **kwargs):
            self.alpha = super().channel_weights(*args, **kwargs)
            return self.alpha

    x = _x(seed=4)
    classes = torch.tensor([1, 2])
    weights = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(5))

    def input_grad(interp):
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((normalize_maps(interp(xg, classes)) * weights).sum(), xg)
        return g

    def alpha_grad(clf):
        xg = x.clone().requires_grad_()
        gc = KeepAlpha(clf, layer="layer3")
        gc(xg, classes)
        (g,) = torch.autograd.grad(gc.alpha.sum(), xg, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    full = input_grad(GradCAM(resnet, layer="layer3"))
    detached = input_grad(DetachedAlpha(resnet, layer="layer3"))
    torch.testing.assert_close(full, detached, rtol=1e-6, atol=1e-9 * full.abs().max().item())
    assert alpha_grad(resnet).abs().max() == 0

    sur = make_surrogate(resnet)
    full, detached = input_grad(GradCAM(sur, layer="layer3")), input_grad(DetachedAlpha(sur, layer="layer3"))
    assert (full - detached).norm() > 1e-3 * full.norm()
    assert alpha_grad(sur).abs().max() > 0


def test_surrogate_options_and_warnings(resnet):
    with pytest.raises(ConfigError, match="tau"):
        make_surrogate(resnet, tau=0)
    with pytest.raises(ConfigError, match="Classifier"):
        make_surrogate(resnet.model)
    sur = make_surrogate(resnet, tau=1e-2, requires_grad=True)
    assert all(p.requires_grad for p in sur.parameters())
    assert all(m.tau == 1e-2 for m in sur.modules() if isinstance(m, SmoothReLU))
    assert type(make_surrogate(sur)) is type(sur)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_surrogate(resnet)
    mobilenet = _make("torchvision", arch="mobilenet_v2")
    with pytest.warns(UserWarning, match="ReLU6"):
        sur = make_surrogate(mobilenet)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sur(x), mobilenet(x), rtol=0, atol=1e-6)
    assert torch._C._len_torch_function_stack() == 0  # the adapter's stop-exception does not leak the mode
