"""The transformations an image meets on its way to a model (juap.transforms), each as documented."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import tiny_trained_classifier
from juap.errors import ConfigError
from juap.evaluation import evaluate
from juap.transforms import parse_transform


def smooth(n: int = 4, size: int = 32) -> torch.Tensor:
    """Images of low-frequency colour gradients (what JPEG keeps well)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([xs, ys, (xs + ys) / 2])
    return torch.stack([(base * (0.5 + 0.1 * k)).clamp(0, 1) for k in range(n)])


def test_jpeg_at_quality_100_changes_little_and_75_more():
    x = smooth()
    d100 = (parse_transform("jpeg:100")(x) - x).abs().mean()
    d75 = (parse_transform("jpeg:75")(x) - x).abs().mean()
    assert d100 < 2 / 255 and d75 > d100
    assert parse_transform("jpeg:75")(x).shape == x.shape


def test_jpeg_does_not_print_torchvisions_codec_deprecation_per_call():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning the call lets out fails the test
        parse_transform("jpeg:90")(smooth(1))


def test_resize_and_crop_come_back_at_the_input_size():
    x = smooth(2, 40)
    for spec in ("resize:0.5", "resize:1.5", "crop:0.5", "random_crop:0.6", "blur:1.5"):
        assert parse_transform(spec)(x).shape == x.shape, spec
    assert torch.allclose(parse_transform("resize:1")(x), x, atol=1e-5)
    assert torch.allclose(parse_transform("crop:1")(x), x, atol=1e-6)
    quadrants = torch.zeros(1, 3, 40, 40)
    quadrants[..., 10:30, 10:30] = 1.0  # a white centre: the centre half crop is all white
    assert torch.allclose(parse_transform("crop:0.5")(quadrants), torch.ones(1, 3, 40, 40))


def test_a_random_crop_draws_by_seed_and_blur_keeps_the_mean():
    x = torch.rand(2, 3, 32, 32)
    t = parse_transform("random_crop:0.5")
    assert torch.equal(t(x, seed=3), t(x, seed=3)) and not torch.equal(t(x, seed=3), t(x, seed=4))
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(parse_transform("blur:2")(flat), flat, atol=1e-6)
    noisy = torch.rand(1, 3, 32, 32)
    assert parse_transform("blur:1")(noisy).std() < noisy.std()


@pytest.mark.parametrize(
    "spec,message",
    [("gzip:5", "unknown transformation 'gzip:5'"), ("jpeg", "needs a number"), ("jpeg:0", "1..100"),
     ("resize:0", "resize factor"), ("crop:1.5", "crop fraction"), ("blur:-1", "blur sigma")],
)  # fmt: skip
def test_a_bad_transformation_is_a_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_transform(spec)


def test_evaluate_applies_it_to_the_benign_and_the_adversarial_images_alike():
    clf, x, y = tiny_trained_classifier()
    n = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 24 / 255
    plain = evaluate(clf, n, [(x[:64], y[:64])])
    same = evaluate(clf, n, [(x[:64], y[:64])], transform=lambda t, seed=0: t)
    assert same["fooling_ratio"] == plain["fooling_ratio"]
    seen = []
    evaluate(clf, n, [(x[:64], y[:64])], transform=lambda t, seed=0: seen.append(t.clone()) or t)
    assert len(seen) == 2 and torch.allclose(seen[1], (seen[0] + n).clamp(0, 1))  # benign, then adversarial
