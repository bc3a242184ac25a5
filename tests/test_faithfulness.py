"""Deletion and insertion curves (juap.faithfulness): known curves on a hand-made model, the contract of
the areas, Quantus's pixel flipping as an independent reference, and the figures through juap.evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import juap
from helpers import tiny_trained_classifier
from juap.faithfulness import blurred, deletion_insertion


class OnePixel(nn.Module):
    """Two classes; the logit of class 0 is 8 x (the red value of pixel (row 2, col 5)), class 1's is 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 8 * x[:, 0, 2, 5]
        return torch.stack([z, torch.full_like(z, 4.0)], dim=1)


def test_a_map_on_the_only_informative_pixel_has_the_known_curves_and_beats_random_maps():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0, 2, 5] = 1.0
    model, classes = OnePixel(), torch.zeros(5, dtype=torch.long)
    good = torch.zeros(5, 8, 8)
    good[:, 2, 5] = 1.0
    out = deletion_insertion(model, x, good, classes, steps=4, baseline="black")
    high, low = torch.tensor([8.0, 4.0]).softmax(0)[0], torch.tensor([0.0, 4.0]).softmax(0)[0]
    # deletion: the pixel goes at the first step; insertion: it comes back at the first step
    torch.testing.assert_close(out["deletion_curve"], torch.tensor([high] + [low] * 4).expand(5, -1))
    torch.testing.assert_close(out["insertion_curve"], torch.tensor([low] + [high] * 4).expand(5, -1))
    torch.testing.assert_close(out["deletion"], torch.full((5,), (high / 2 + low * 3 + low / 2).item() / 4))
    random = deletion_insertion(model, x, torch.rand(5, 8, 8), classes, steps=4, baseline="black")
    assert (out["deletion"] <= random["deletion"]).all() and (out["insertion"] >= random["insertion"]).all()
    assert (out["deletion"] < random["deletion"]).any()


def test_curves_start_at_the_image_and_end_at_the_baseline():
    clf, x, _ = tiny_trained_classifier()
    x = x[:4]
    maps, classes = torch.rand(4, 4, 4), torch.tensor([0, 1, 2, 3])
    out = deletion_insertion(clf, x, maps, classes, steps=5)
    with torch.no_grad():
        p_image = clf(x).softmax(1)[torch.arange(4), classes]
        p_base = clf(blurred(x)).softmax(1)[torch.arange(4), classes]
    torch.testing.assert_close(out["deletion_curve"][:, 0], p_image)
    torch.testing.assert_close(out["deletion_curve"][:, -1], p_base)
    torch.testing.assert_close(out["insertion_curve"][:, 0], p_base)
    torch.testing.assert_close(out["insertion_curve"][:, -1], p_image)
    assert out["deletion"].shape == (4,) and ((out["deletion"] >= 0) & (out["deletion"] <= 1)).all()
    # at the image's resolution only the order of the map counts: a monotone map of it gives the same curves
    fine = torch.rand(4, 32, 32)
    same = [deletion_insertion(clf, x, m, classes, steps=5)["deletion"] for m in (fine, fine.exp() * 3)]
    torch.testing.assert_close(same[0], same[1])
    # batched or not, the same figures
    one = deletion_insertion(clf, x, maps, classes, steps=5, batch_size=1)
    torch.testing.assert_close(one["insertion"], out["insertion"])


def test_blur_leaves_a_flat_image_flat_and_smooths_a_busy_one():
    flat = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(blurred(flat), flat)
    busy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert blurred(busy).std() < 0.5 * busy.std()


class Grey(nn.Module):
    """A one-channel view of a classifier: every pixel one feature, as Quantus flips features."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x.expand(-1, 3, -1, -1))


def test_matches_quantus_pixel_flipping():
    """Quantus 0.6's PixelFlipping (baseline 0, 64 pixels per step) is the deletion curve after step 0.
    Quantus needs opencv-python, which conflicts with grad-cam's opencv-python-headless, so it is not a dev
    dependency: this test runs where Quantus is installed (``pip install --no-deps quantus`` with pandas
    and cachetools)."""
    quantus = pytest.importorskip("quantus")
    clf, x, _ = tiny_trained_classifier()
    model, x = Grey(clf).eval(), x[:6].mean(1, keepdim=True)
    with torch.no_grad():
        classes = model(x).argmax(1)
    maps = torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(2))  # distinct values: no ties
    steps = 16
    ours = deletion_insertion(model, x, maps, classes, steps=steps, baseline="black")["deletion_curve"]
    metric = quantus.PixelFlipping(
        features_in_step=32 * 32 // steps, perturb_baseline=0.0, normalise=False, disable_warnings=True
    )
    theirs = metric(
        model=model, x_batch=x.numpy(), y_batch=classes.numpy(), a_batch=maps[:, None].numpy(), device="cpu",
        softmax=True, channel_first=True,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(theirs), ours[:, 1:].numpy(), rtol=1e-4, atol=1e-6)


def test_bad_input_is_named():
    x, maps, classes = torch.rand(2, 3, 8, 8), torch.rand(2, 2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(juap.ConfigError, match="steps"):
        deletion_insertion(OnePixel(), x, maps, classes, steps=0)
    with pytest.raises(juap.ConfigError, match="maps"):
        deletion_insertion(OnePixel(), x, maps[:1], classes)
    with pytest.raises(juap.ConfigError, match="baseline"):
        deletion_insertion(OnePixel(), x, maps, classes, baseline="grey")


def test_evaluate_reports_benign_and_adversarial_areas_per_interpreter():
    clf, x, _ = tiny_trained_classifier()
    x = x[:8]
    n_hat = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) * (60 / 255)
    interps = {"cam": juap.create_interpreter("cam", clf), "gradcam": juap.create_interpreter("gradcam", clf)}
    ev = juap.evaluate(clf, n_hat, x, interpreters=interps, faithfulness=4, batch_size=5)
    with torch.no_grad():
        pb = clf(x).argmax(1)
        bm = interps["cam"](x, pb)
    by_hand = deletion_insertion(clf, x, bm, pb, steps=4)
    cam = ev["interpreters"]["cam"]
    assert cam["deletion_benign"] == pytest.approx(by_hand["deletion"].mean().item(), abs=1e-6)
    assert cam["insertion_benign"] == pytest.approx(by_hand["insertion"].mean().item(), abs=1e-6)
    for m in ev["interpreters"].values():
        assert set(m) >= set(juap.metrics.FAITHFULNESS_KEYS)
    assert "deletion_benign" not in juap.evaluate(clf, n_hat, x, interpreters=interps)["interpreters"]["cam"]
