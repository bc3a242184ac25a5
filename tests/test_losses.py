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
