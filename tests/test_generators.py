"""ResNet and U-Net perturbation generators (section IV-B2): their layers, options and messages.

The contract every registered generator keeps (keyword-only options, channels, the seed, input checks)
is asserted for each of them in tests/test_conformance_models.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import juap
from juap.budget import scale_to_budget
from juap.errors import ConfigError
from juap.generators import ImageGenerator, ResNetGenerator, UNetGenerator

NAMES = ["resnet", "unet"]
SMALL = {"resnet": {"ngf": 8, "n_blocks": 2}, "unet": {"ngf": 8}}


def _make(name: str, seed: int = 0, **kwargs) -> ImageGenerator:
    torch.manual_seed(seed)
    return juap.create_generator(name, **{**SMALL[name], **kwargs})


def _resnet_param_count(ngf: int, n_blocks: int, cin: int = 3, cout: int = 3) -> int:
    """Closed form for norm="batch": bias-free convs before BatchNorm (2 params per channel)."""
    conv = lambda a, b, k: a * b * k * k  # noqa: E731
    n = conv(cin, ngf, 7) + 2 * ngf
    n += conv(ngf, 2 * ngf, 3) + 2 * 2 * ngf + conv(2 * ngf, 4 * ngf, 3) + 2 * 4 * ngf
    n += n_blocks * 2 * (conv(4 * ngf, 4 * ngf, 3) + 2 * 4 * ngf)
    n += conv(4 * ngf, 2 * ngf, 3) + 2 * 2 * ngf + conv(2 * ngf, ngf, 3) + 2 * ngf
    return n + conv(ngf, cout, 7) + cout


def _unet_param_count(ngf: int, cin: int = 3, cout: int = 3) -> int:
    """Closed form for norm="batch"; the innermost down conv and the last up conv have biases."""
    w = [ngf, 2 * ngf, 4 * ngf, 8 * ngf, 8 * ngf]
    n = cin * w[0] * 16
    n += sum(w[i - 1] * w[i] * 16 + 2 * w[i] for i in (1, 2, 3))
    n += w[3] * w[4] * 16 + w[4]  # innermost: bias, no norm
    n += w[4] * w[3] * 16 + 2 * w[3]  # innermost up: 8ngf -> 8ngf
    n += sum(2 * w[i] * w[i - 1] * 16 + 2 * w[i - 1] for i in (3, 2, 1))
    return n + 2 * w[0] * cout * 16 + cout


def test_registered():
    assert {"resnet", "unet"} <= set(juap.list_generators())
    assert isinstance(juap.create_generator("resnet", ngf=4, n_blocks=1), ResNetGenerator)
    assert isinstance(juap.create_generator("unet", ngf=4), UNetGenerator)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size,batch", [(32, 2), (64, 2), (224, 1), ((32, 96), 1)])
def test_shape_and_range(name, size, batch):
    h, w = size if isinstance(size, tuple) else (size, size)
    g = _make(name)
    n = torch.rand(batch, 3, h, w)
    out = g(n)
    assert out.shape == (batch, 3, h, w)
    assert out.dtype == n.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 1e-3  # not collapsed to a constant
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_defaults_at_64(name):
    torch.manual_seed(0)
    g = juap.create_generator(name)
    assert g.norm == "batch"
    n = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = g.train()(n)
        out_eval = g.eval()(n)
    assert out.shape == (1, 3, 64, 64)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 1e-2
    # BatchNorm keeps no running statistics: the eval-mode perturbation is the trained one
    torch.testing.assert_close(out_eval, out)
    assert not any(b.numel() for b in g.buffers())


def test_default_resnet_parameter_count():
    g = ResNetGenerator()
    count = sum(p.numel() for p in g.parameters())
    assert count == _resnet_param_count(64, 6) == 7_841_411  # ~7.8M, CycleGAN's resnet_6blocks size
    assert isinstance(g.model[0], nn.ReflectionPad2d) and g.model[1].kernel_size == (7, 7)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in g.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 3 + 2 * 6 + 2
    assert isinstance(g.model[-1], nn.Tanh)


def test_default_unet_parameter_count():
    g = UNetGenerator()
    count = sum(p.numel() for p in g.parameters())
    assert count == _unet_param_count(64) == 16_659_587  # ~16.7M
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in g.modules()) == 5
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in g.modules()) == 5


def test_small_parameter_counts_match_closed_form():
    count = lambda g: sum(p.numel() for p in g.parameters())  # noqa: E731
    assert count(ResNetGenerator(ngf=8, n_blocks=3)) == _resnet_param_count(8, 3)
    assert count(UNetGenerator(ngf=8)) == _unet_param_count(8)
    assert count(ResNetGenerator(ngf=8, n_blocks=0, in_channels=1, out_channels=2)) == _resnet_param_count(
        8, 0, cin=1, cout=2
    )


def test_unet_batch_one_at_32_in_train_mode():
    g = _make("unet", norm="batch")
    g.train()
    out = g(torch.rand(1, 3, 32, 32))  # innermost map is 1x1: it must have no BatchNorm
    assert out.shape == (1, 3, 32, 32)
    out.sum().backward()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_gradients_reach_every_parameter(name, norm):
    g = _make(name, norm=norm)
    g.train()
    n = torch.rand(2, 3, 32, 32)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = (scale_to_budget(g(n), norm="l2", eps=500) - target / 10).pow(2).sum()
    loss.backward()
    params = dict(g.named_parameters())
    assert params
    for pname, p in params.items():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, f"{pname} gets an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_norm_options(name, norm):
    g = _make(name, norm=norm)
    kinds = {type(m) for m in g.modules()}
    assert (nn.BatchNorm2d in kinds) == (norm == "batch")
    assert (nn.InstanceNorm2d in kinds) == (norm == "instance")
    convs = [m for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if norm == "none":
        assert all(c.bias is not None for c in convs)
    out = g(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and out.abs().max() <= 1


def test_unknown_norm_is_a_config_error():
    for name in NAMES:
        with pytest.raises(ConfigError, match="batch, instance, none"):
            juap.create_generator(name, norm="group")


@pytest.mark.parametrize(
    "kwargs", [{"ngf": 0}, {"ngf": 8.0}, {"in_channels": 0}, {"init_std": 0.0}, {"init_std": float("nan")}]
)
def test_bad_hyperparameters(kwargs):
    for name in NAMES:
        with pytest.raises(ConfigError):
            juap.create_generator(name, **kwargs)


def test_bad_architecture_options():
    with pytest.raises(ConfigError, match="dropout"):
        UNetGenerator(dropout=1.0)
    with pytest.raises(ConfigError, match="n_blocks"):
        ResNetGenerator(n_blocks=-1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 3, 70, 64), (1, 3, 64, 48), (1, 3, 16, 16)])
def test_size_not_divisible_by_32(name, shape):
    g = _make(name)
    h, w = shape[-2:]
    expected = (
        f"generator '{name}' needs height and width divisible by 32, got {h}x{w}; "
        "resize images to e.g. 64 or 224"
    )
    with pytest.raises(ConfigError) as err:
        g(torch.rand(shape))
    assert str(err.value) == expected


def test_unet_dropout_only_when_asked():
    assert not any(isinstance(m, nn.Dropout) for m in UNetGenerator(ngf=4).modules())
    g = UNetGenerator(ngf=4, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 4
    g.eval()
    n = torch.rand(1, 3, 32, 32)
    assert torch.equal(g(n), g(n))  # dropout off in eval
