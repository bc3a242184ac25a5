"""The parts generator attacks compose (juap.attacks.parts): the joint loss with an extra term, its
per-image form against JAP's former formula, the interpreter wiring and the selection rule."""

from __future__ import annotations

import pytest
import torch

import juap
from juap.attacks.parts import Adversarial, Benign, InterpreterWiring, JointLoss, Selection, Term
from juap.errors import ConfigError
from juap.losses import fooling_loss, fooling_terms, map_distance, map_distances

g = torch.Generator().manual_seed(0)
LOGITS = torch.randn(6, 4, generator=g)
ADV_LOGITS = torch.randn(6, 4, generator=g)
MAPS, ADV_MAPS = torch.rand(6, 7, 7, generator=g), torch.rand(6, 7, 7, generator=g)
X_HAT = torch.rand(6, 3, 8, 8, generator=g)


def _sides(objective="untargeted", logits=ADV_LOGITS):
    loss = JointLoss(objective=objective, fool_loss="mean_log", hinge="image", delta=-0.5)
    benign = Benign(LOGITS, LOGITS.argmax(1) if objective == "untargeted" else LOGITS.argmin(1), MAPS)
    return loss, benign, Adversarial(X_HAT, logits, ADV_MAPS)


def test_the_batch_loss_is_eq16_and_an_extra_term_adds_with_its_own_weight():
    """Eq 16 is the hinged fooling term plus lambda times the map distance; an extra Term (e.g. an adaptive
    attacker's detector score) adds ``weight * value``, is logged by name and carries gradients."""
    logits = ADV_LOGITS.clone().requires_grad_(True)
    loss, benign, adv = _sides(logits=logits)
    value, fool, parts = loss(benign, adv, lam=0.3)
    ref_fool = fooling_loss(logits, benign.classes, objective="untargeted", form="mean_log", delta=-0.5,
                            hinge="image")  # fmt: skip
    assert torch.equal(fool, ref_fool)
    assert torch.equal(value, ref_fool + 0.3 * map_distance(ADV_MAPS, MAPS))
    assert set(parts) == {"map_loss"}

    def detector(b: Benign, a: Adversarial) -> torch.Tensor:
        return a.logits.softmax(1)[:, 0].mean()  # stands in for a detector's score of x_hat

    extended = JointLoss(objective="untargeted", fool_loss="mean_log", hinge="image", delta=-0.5,
                         terms=[Term("detector", 2.0, detector)])  # fmt: skip
    value2, _, parts2 = extended(benign, adv, lam=0.3)
    assert torch.allclose(value2, value + 2.0 * detector(benign, adv))
    assert parts2["detector"] == pytest.approx(detector(benign, adv).item())
    (grad,) = torch.autograd.grad(value2 - value, logits)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("delta", [-0.5, None])
@pytest.mark.parametrize("objective", ["untargeted", "least_likely"])
def test_the_per_image_loss_is_japs_former_formula_bit_for_bit(objective, delta):
    """JAP's loss before the parts: ``max{mean_log term_i, delta} + lam * map_distances`` (N,)."""
    loss, benign, adv = _sides(objective)
    loss.delta = delta
    fool = fooling_terms(ADV_LOGITS, benign.classes, objective=objective, form="mean_log")
    if delta is not None:
        fool = torch.clamp(fool, min=delta)
    assert torch.equal(loss.per_image(benign, adv, lam=0.7), fool + 0.7 * map_distances(ADV_MAPS, MAPS))
    no_maps = Adversarial(X_HAT, ADV_LOGITS)
    assert torch.equal(loss.per_image(benign, no_maps, lam=0.7), fool)
    with pytest.raises(ConfigError, match="per-image"):
        JointLoss(hinge="batch").per_image(benign, adv, lam=0.7)


def test_at_hinge_counts_what_each_hinge_stops():
    loss, benign, adv = _sides()
    terms = fooling_terms(ADV_LOGITS, benign.classes, objective="untargeted", form="mean_log")
    fool = loss(benign, adv, lam=0.0)[1]
    assert loss.at_hinge(benign, ADV_LOGITS, fool) == (terms <= -0.5).sum()
    batch = JointLoss(objective="untargeted", hinge="batch", delta=10.0)  # a hinge every batch is under
    assert batch.at_hinge(benign, ADV_LOGITS, torch.tensor(1.0)) == len(LOGITS)
    no_hinge = JointLoss(delta=None)
    assert no_hinge.at_hinge(benign, ADV_LOGITS, fool) == 0 and not no_hinge.has_hinge
    assert JointLoss(hinge="margin").hinge_level is None and JointLoss(delta=-0.3).hinge_level == -0.3


def test_the_wiring_checks_the_interpreter_and_picks_the_surrogate():
    clf = juap.create_classifier("small_resnet", num_classes=3, widths=(4, 8, 8))
    with pytest.raises(ConfigError, match="juap Interpreter"):
        InterpreterWiring.check(object())
    assert InterpreterWiring.check(None).trainer(clf) is None
    for name in juap.list_interpreters():
        cls = juap.INTERPRETERS.get(name)
        if cls.requires_checkpoint:
            with pytest.raises(ConfigError, match="untrained"):
                InterpreterWiring.check(cls.create(clf))
            continue
        interp = cls.create(clf)
        wiring = InterpreterWiring.check(interp)
        assert wiring.use_surrogate == cls.needs_surrogate  # "auto"
        trainer = wiring.trainer(clf)
        assert (trainer is interp) != cls.needs_surrogate
        if cls.needs_surrogate:  # a copy that explains the surrogate; the judge is unchanged
            assert trainer.classifier is not clf and interp.classifier is clf
        assert InterpreterWiring.check(interp, surrogate=False).trainer(clf) is interp


def test_the_selection_rules():
    val = {"fooling_ratio": 0.5, "iou": 0.4, "target_success_rate": 0.25}
    assert Selection("fooling_ratio").score(val) == 0.5
    assert Selection("fooling_ratio", targeted=True).score(val) == 0.25
    assert Selection("joint").score(val) == pytest.approx(0.5 * 1.4)
    constrained = Selection("constrained")
    assert constrained.score(val, 0.4) == pytest.approx(1.4)  # the target kept: 1 + IoU
    assert constrained.score(val, 0.6) == pytest.approx(-0.1)  # missed: the shortfall
    best = {"score": 0.6}
    assert not Selection("fooling_ratio").prefers(val, best) and Selection("fooling_ratio").prefers(val, None)
    assert Selection("last").prefers(val, best)
    assert Selection.resolve("auto", constrained=False, joint=True) == "joint"
    assert Selection.resolve("auto", constrained=True, joint=True) == "constrained"
    assert Selection.resolve("auto", constrained=False, joint=False) == "fooling_ratio"
    with pytest.raises(ConfigError, match="fr_target"):
        Selection.resolve("constrained", constrained=False, joint=True)
