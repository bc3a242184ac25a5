"""Deletion and insertion curves and ROAD (juap.faithfulness): known curves on a hand-made model, the contract
of the areas and of the imputation, Quantus's pixel flipping and pytorch-grad-cam's ROAD as independent
references, and the figures through juap.evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import juap
from helpers import tiny_trained_classifier
from juap.faithfulness import blurred, deletion_insertion, noisy_linear_impute, road


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


def test_road_on_the_only_informative_pixel_has_the_known_curves_and_beats_random_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g)
    x[:, 0, 2, 5] = 1.0
    model, classes = OnePixel(), torch.zeros(5, dtype=torch.long)
    good = torch.rand(5, 8, 8, generator=g) * 0.5  # distinct values, the informative pixel on top
    good[:, 2, 5] = 1.0
    out = road(model, x, good, classes, noise=0.0)
    # least relevant first keeps the top pixel at every percentile: the image's own probability
    high = torch.tensor([8.0, 4.0]).softmax(0)[0]
    torch.testing.assert_close(out["lerf_curve"], torch.full((5, 9), high.item()))
    # most relevant first imputes it at every percentile, from neighbours well below 1
    assert (out["morf_curve"] < high - 0.1).all()
    # the 50th percentile by hand: the pixels at or above the median are imputed
    removed = good >= good.flatten(1).quantile(0.5, dim=1)[:, None, None]
    z = 8 * noisy_linear_impute(x, removed, noise=0.0)[:, 0, 2, 5]
    torch.testing.assert_close(
        out["morf_curve"][:, 4], torch.stack([z, torch.full_like(z, 4.0)], 1).softmax(1)[:, 0]
    )
    random = road(model, x, torch.rand(5, 8, 8, generator=g), classes, noise=0.0)
    assert (out["morf"] <= random["morf"] + 1e-6).all() and (out["lerf"] >= random["lerf"] - 1e-6).all()
    assert (out["combined"] > random["combined"]).all()


def test_imputation_keeps_the_kept_pixels_and_fills_with_the_neighbours_mean():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 20, 17, generator=g)
    removed = torch.rand(2, 20, 17, generator=g) > 0.4
    out = noisy_linear_impute(x, removed, noise=0.0)
    keep = ~removed[:, None].expand_as(x)
    assert torch.equal(out[keep], x[keep])
    # each imputed pixel is the weighted mean of its in-image neighbours (the system's equation)
    k = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])[None, None]
    flat = out.reshape(6, 1, 20, 17)
    mean = torch.nn.functional.conv2d(flat, k, padding=1) / torch.nn.functional.conv2d(
        torch.ones_like(flat), k, padding=1
    )
    torch.testing.assert_close(out[~keep], mean.reshape_as(out)[~keep], atol=2e-4, rtol=0)
    # a flat image stays flat; the noise is the generator's
    flat_img = torch.full((1, 3, 16, 16), 0.4)
    hole = torch.zeros(1, 16, 16, dtype=torch.bool)
    hole[0, 3:12, 2:15] = True
    torch.testing.assert_close(noisy_linear_impute(flat_img, hole, noise=0.0), flat_img, atol=1e-5, rtol=0)
    a, b = (noisy_linear_impute(x, removed, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, out)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NumPy 2 on pytorch-grad-cam's arrays
def test_imputation_and_road_match_pytorch_grad_cam(monkeypatch):
    """pytorch-grad-cam's ROAD (``pytorch_grad_cam.metrics.road``, from Rong et al.'s code: a sparse direct
    solve) with its noise set to 0 and the softmax target; its scores are differences to the image's."""
    pgc_road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 20, 24, generator=g)
    removed = torch.rand(3, 20, 24, generator=g) > 0.3
    theirs = torch.stack(
        [pgc_road.NoisyLinearImputer(noise=0.0)(x[i], (~removed[i]).float()) for i in range(3)]
    )
    tight = noisy_linear_impute(x, removed, noise=0.0, tol=1e-7)
    torch.testing.assert_close(tight, theirs, atol=2e-5, rtol=0)
    # the default tolerance: within a tenth of a grey level (the noise ROAD adds is 0.01)
    torch.testing.assert_close(noisy_linear_impute(x, removed, noise=0.0), theirs, atol=1e-3 / 2.55, rtol=0)

    class Noiseless(pgc_road.NoisyLinearImputer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(noise=0.0)

    monkeypatch.setattr(pgc_road, "NoisyLinearImputer", Noiseless)
    clf, x, _ = tiny_trained_classifier()
    x = x[:4]
    with torch.no_grad():
        classes = clf(x).argmax(1)
        p0 = clf(x).softmax(1)[torch.arange(4), classes]
    maps = torch.rand(4, 32, 32, generator=g)  # at the image's size: pytorch-grad-cam's maps are resized
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    ours = road(clf, x, maps, classes, noise=0.0)
    for kind, metric in (
        ("morf", pgc_road.ROADMostRelevantFirstAverage()),
        ("lerf", pgc_road.ROADLeastRelevantFirstAverage()),
    ):
        theirs = metric(x, maps.numpy(), targets, clf)
        np.testing.assert_allclose(ours[kind].numpy() - p0.numpy(), theirs, atol=1e-4)


def test_road_bad_input_is_named_and_a_flat_map_still_ranks():
    x, classes = torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(juap.ConfigError, match="maps"):
        road(OnePixel(), x, torch.rand(1, 2, 2), classes)
    with pytest.raises(juap.ConfigError, match="percentiles"):
        road(OnePixel(), x, torch.rand(2, 2, 2), classes, percentiles=(0, 50))
    with pytest.raises(juap.ConfigError, match="kept pixel"):
        noisy_linear_impute(x, torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(juap.ConfigError, match="removed"):
        noisy_linear_impute(x, torch.ones(2, 4, 4, dtype=torch.bool))
    out = road(OnePixel(), x, torch.zeros(2, 4, 4), classes, noise=0.0)  # a flat map (e.g. a zero CAM)
    assert torch.isfinite(out["combined"]).all()
