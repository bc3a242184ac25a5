"""The objectives (eqs 7-9, 13, 16) against hand computations, and the two readings of eq 16's hinge."""

from __future__ import annotations

import math

import pytest
import torch

from juap.errors import ConfigError
from juap.losses import attack_classes, fooling_loss, joint_loss, map_distance

# Two images, three classes; CE by hand: image 0 against class 0, image 1 against class 2.
LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
CLASSES = torch.tensor([0, 2])


def _ce(row, c):
    return -row[c] + math.log(sum(math.exp(v) for v in row))


CE = [_ce([2.0, 0.0, -1.0], 0), _ce([0.5, 0.5, 3.0], 2)]


def test_attack_classes():
    assert attack_classes(LOGITS, objective="untargeted").tolist() == [0, 2]
    assert attack_classes(LOGITS, objective="least_likely").tolist() == [2, 0]
    assert attack_classes(LOGITS, objective="targeted", target=1).tolist() == [1, 1]
    with pytest.raises(ConfigError, match="out of range"):
        attack_classes(LOGITS, objective="targeted", target=3)


@pytest.mark.parametrize(
    "form, objective, expected",
    [
        ("log_mean", "untargeted", -math.log((CE[0] + CE[1]) / 2)),  # eq 7 on the batch mean
        ("log_mean", "least_likely", math.log((CE[0] + CE[1]) / 2)),  # eq 8 / 9
        ("mean_log", "untargeted", -(math.log(CE[0]) + math.log(CE[1])) / 2),
        ("mean_log1p", "untargeted", -(math.log(CE[0] + 1) + math.log(CE[1] + 1)) / 2),  # GUAP's code
        ("mean_log1p", "targeted", (math.log(CE[0] + 1) + math.log(CE[1] + 1)) / 2),
    ],
)
def test_fooling_loss_forms(form, objective, expected):
    got = fooling_loss(LOGITS, CLASSES, objective=objective, form=form)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_guap_public_loss_by_hand():
    """GUAP's ``run_imagenet.py``: ``-mean_i log(CE(f(x_hat_i), f(x_i)) + 1)``, with its gradient."""
    logits = LOGITS.clone().requires_grad_(True)
    loss = fooling_loss(logits, logits.detach().argmax(1), objective="untargeted", form="mean_log1p")
    ce = torch.nn.functional.cross_entropy(logits, logits.detach().argmax(1), reduction="none")
    ref = -torch.log(ce + 1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g, g_ref)


def test_batch_and_image_hinge():
    """``batch``: max{mean, delta}; ``image``: mean of max{term_i, delta}. They differ when one image is
    past the hinge and the other is not, and only the image hinge keeps the unfooled image's gradient."""
    classes = torch.tensor([0, 0])  # image 0 still predicted as class 0; image 1 far from it
    ce = [_ce([2.0, 0.0, -1.0], 0), _ce([0.5, 0.5, 3.0], 0)]
    terms = [-math.log(ce[0]), -math.log(ce[1])]
    delta = -0.5
    assert terms[0] > delta > terms[1]
    kw = dict(objective="untargeted", form="mean_log", delta=delta)
    batch = fooling_loss(LOGITS, classes, hinge="batch", **kw)
    image = fooling_loss(LOGITS, classes, hinge="image", **kw)
    assert batch.item() == pytest.approx(max(sum(terms) / 2, delta))
    assert image.item() == pytest.approx((terms[0] + delta) / 2)
    logits = LOGITS.clone().requires_grad_(True)
    fooling_loss(logits, classes, hinge="image", **kw).backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0  # only the unfooled one pulls
    # with the batch hinge past delta, no image pulls at all
    logits = LOGITS.clone().requires_grad_(True)
    fooling_loss(logits, classes, hinge="batch", **{**kw, "delta": 10.0}).backward()
    assert logits.grad.abs().sum() == 0
    # the paper's reading with log_mean: the hinge clamps the log of the batch-mean CE
    lm = fooling_loss(LOGITS, classes, objective="untargeted", form="log_mean", delta=-0.1, hinge="batch")
    assert lm.item() == pytest.approx(max(-math.log((ce[0] + ce[1]) / 2), -0.1))
    # log_mean with the image hinge clamps log CE_i image by image
    lm_i = fooling_loss(LOGITS, classes, objective="untargeted", form="log_mean", delta=delta, hinge="image")
    assert lm_i.item() == pytest.approx(image.item())


def test_bad_form_and_hinge():
    with pytest.raises(ConfigError, match="fool_loss"):
        fooling_loss(LOGITS, CLASSES, objective="untargeted", form="nope")
    with pytest.raises(ConfigError, match="hinge"):
        fooling_loss(LOGITS, CLASSES, objective="untargeted", delta=-1.0, hinge="nope")


def test_map_distance_and_joint_loss_by_hand():
    """Eq 13 on min-max normalised maps: per-sample L2, batch mean; eq 16 adds lambda times it."""
    a = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])  # normalised: [0, .25, .5, 1]
    b = torch.tensor([[[4.0, 0.0], [0.0, 0.0]]])  # normalised: [1, 0, 0, 0]
    d = map_distance(a, b)
    assert d.item() == pytest.approx(math.sqrt(1 + 0.0625 + 0.25 + 1))
    fool = torch.tensor(-0.3)
    assert joint_loss(fool, d, lam=0.5).item() == pytest.approx(-0.3 + 0.5 * d.item())


def test_margin_hinge_stops_the_pull_of_images_fooled_by_kappa():
    """C&W's margin: an image fooled by at least kappa logits gets no gradient, the others keep theirs;
    the term keeps its value (the curves still show it)."""
    from juap.losses import logit_margins

    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.5, 0.0], [0.0, 0.4, 0.0]], requires_grad=True)
    classes = torch.tensor([0, 0, 0])  # the benign predictions: image 0 is not fooled, 1 and 2 are
    margins = logit_margins(logits, classes, objective="untargeted")
    assert margins.tolist() == pytest.approx([-3.0, 2.5, 0.4])
    loss = fooling_loss(logits, classes, objective="untargeted", form="mean_log1p", hinge="margin", kappa=1.0)
    (g,) = torch.autograd.grad(loss, logits)
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0  # not fooled / fooled by less than kappa
    assert g[1].abs().sum() == 0  # fooled by 2.5 >= kappa: it stops pulling
    plain = fooling_loss(logits, classes, objective="untargeted", form="mean_log1p")
    assert float(loss) == pytest.approx(float(plain))
    # towards a class (eq 8 / 9) the margin is that class's logit over the best other one
    reached = logit_margins(logits, torch.tensor([1, 1, 1]), objective="targeted")
    assert reached.tolist() == pytest.approx([-3.0, 2.5, 0.4])


def test_map_distance_on_some_images_only():
    a, b = torch.rand(4, 5, 5), torch.rand(4, 5, 5)
    every = map_distance(a, b, only=None)
    from juap.losses import map_distances

    d = map_distances(a, b)
    only = torch.tensor([True, False, True, False])
    assert float(map_distance(a, b, only=only)) == pytest.approx(float(d[only].mean()))
    assert float(every) == pytest.approx(float(d.mean()))
    none = map_distance(a.requires_grad_(), b, only=torch.zeros(4, dtype=torch.bool))
    assert float(none) == 0.0 and torch.isfinite(torch.autograd.grad(none, a)[0]).all()


def test_soft_topk_iou_is_the_metric_at_low_temperature_and_has_gradients():
    from juap.losses import soft_topk_iou
    from juap.metrics import IOU_KS, iou_topk

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 8, 8, generator=g), torch.rand(4, 8, 8, generator=g)
    hard = torch.stack([iou_topk(a, b, k) for k in IOU_KS]).mean(0)
    torch.testing.assert_close(soft_topk_iou(a, b, temperature=1e-4), hard, atol=1e-3, rtol=0)
    a.requires_grad_(True)
    loss = map_distance(a, b, form="soft_iou")
    assert float(loss) == pytest.approx(float(1 - soft_topk_iou(a, b).mean()))
    (grad,) = torch.autograd.grad(loss, a)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="map_loss"):
        map_distance(a, b, form="l3")
